"""Dataset rows → canonical records (`PairedExample`, `BinaryExample`), with errors that name file, row, field.

Local .json/.jsonl files are parsed with Python's `json` module, so every value keeps its JSON type and an
error names the exact line (malformed JSON, non-UTF-8 bytes). `datasets`/pyarrow is not used for them: its
column type inference silently coerces values (``"1"`` → 1, 1 → 1.0 in a column that also holds 0.5,
``"2020-01-01"`` → a datetime), which accepted invalid rows, rejected valid ones and blamed the wrong row.
Parquet/CSV files and hub dataset names (when online) are read through `datasets`.

Formats (`data.format`):

==============  =======  ==========================================================================
name            kind     row → record
==============  =======  ==========================================================================
pku_helpful     paired   PKU-SafeRLHF: chosen = response_{better_response_id}
pku_safe        paired   PKU-SafeRLHF: chosen = response_{safer_response_id}
pku_safe_kto    binary   PKU-SafeRLHF: two records per row, desirable = is_response_{0,1}_safe
trl_paired      paired   TRL preference: prompt/chosen/rejected, plain or conversational, or implicit
                         prompt (no ``prompt`` column: the shared prefix of chosen and rejected)
trl_unpaired    binary   TRL unpaired preference: prompt/completion/label
==============  =======  ==========================================================================

Row numbers in messages are 1-based (the line number of a .jsonl file without blank lines).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sacpo.data.records import BinaryExample, Message, PairedExample, Prompt

log = logging.getLogger(__name__)

Example = PairedExample | BinaryExample
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Invalid training data; the message names the source, the row and the field."""


class RowError(ValueError):
    """A problem with one field of one row (converted into a DataError with the row number)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")
        self.field = field
        self.problem = problem


# --------------------------------------------------------------------------------------------- field checks
def _get(row: dict[str, Any], field: str) -> Any:
    if field not in row or row[field] is None:
        present = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
        raise RowError(field, f"missing (fields present: {present})")
    return row[field]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__} {_short(value)}")
    if not value.strip():
        raise RowError(field, "empty text")
    _unicode(value, field)
    return value


def _unicode(value: str, field: str) -> None:
    """JSON escapes can encode lone surrogates (``"\\ud800"``) that no tokenizer accepts: reject them here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(
            field, f"not valid Unicode (unpaired surrogate {value[e.start]!r} at character {e.start})"
        ) from None


def _binary_id(row: dict[str, Any], field: str) -> int:
    value = _get(row, field)
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
        raise RowError(field, f"expected 0 or 1, got {type(value).__name__} {_short(value)}")
    return value


def _flag(row: dict[str, Any], field: str) -> bool:
    value = _get(row, field)
    if not isinstance(value, bool):
        raise RowError(field, f"expected true or false, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any, n: int = 40) -> str:
    s = repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."


def _messages(value: Any, field: str) -> tuple[Message, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise RowError(field, f"expected a non-empty list of messages, got {_short(value)}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise RowError(f"{field}[{j}]", f"expected {{'role': str, 'content': str}}, got {_short(m)}")
        _unicode(m["role"], f"{field}[{j}].role")
        out.append({"role": m["role"], "content": _text(m["content"], f"{field}[{j}].content")})
    return tuple(out)


def _prompt(value: Any, field: str = "prompt") -> Prompt:
    """A plain string or a conversation (list of messages)."""
    if isinstance(value, list | tuple):
        return _messages(value, field)
    return _text(value, field)


def _response(value: Any, field: str) -> str:
    """A plain string, or a conversational completion: exactly one assistant message."""
    if isinstance(value, list | tuple):
        msgs = _messages(value, field)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise RowError(field, f"expected one assistant message, got roles {[m['role'] for m in msgs]}")
        return msgs[0]["content"]
    return _text(value, field)


def _distinct(chosen: str, rejected: str, fields: str) -> None:
    if chosen == rejected:
        raise RowError(fields, "chosen and rejected responses are identical (no preference signal)")


# ---------------------------------------------------------------------------------------------- converters
def _pku_pair(id_field: str) -> Callable[[dict[str, Any]], list[Example]]:
    def convert(row: dict[str, Any]) -> list[Example]:
        prompt = _text(_get(row, "prompt"), "prompt")
        responses = [_text(_get(row, f"response_{i}"), f"response_{i}") for i in (0, 1)]
        best = _binary_id(row, id_field)
        _distinct(responses[best], responses[1 - best], "response_0/response_1")
        return [PairedExample(prompt, responses[best], responses[1 - best])]

    return convert


def pku_safety_binary(row: dict[str, Any]) -> list[Example]:
    """Two KTO records per PKU row: (response_i, desirable = is_response_i_safe)."""
    prompt = _text(_get(row, "prompt"), "prompt")
    return [
        BinaryExample(
            prompt, _text(_get(row, f"response_{i}"), f"response_{i}"), _flag(row, f"is_response_{i}_safe")
        )
        for i in (0, 1)
    ]


def _common_prefix(chosen: Sequence[Any], rejected: Sequence[Any]) -> int:
    """Length of the shared prefix (TRL's `extract_prompt` rule: a trailing space stays with the responses)."""
    idx = 0
    while idx < min(len(chosen), len(rejected)) and chosen[idx] == rejected[idx]:
        idx += 1
    if isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    return idx


def trl_paired(row: dict[str, Any]) -> list[Example]:
    """TRL preference row; without a ``prompt`` column the prompt is the shared prefix of chosen and rejected."""
    chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
    if row.get("prompt") is not None:
        ex = PairedExample(
            _prompt(row["prompt"]), _response(chosen, "chosen"), _response(rejected, "rejected")
        )
    else:
        conversational = isinstance(chosen, list | tuple)
        if conversational:
            chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        else:
            chosen, rejected = _text(chosen, "chosen"), _text(rejected, "rejected")
        k = _common_prefix(chosen, rejected)
        if k == 0:
            raise RowError("prompt", "missing, and chosen/rejected share no prefix to take it from")
        if conversational:
            ex = PairedExample(
                chosen[:k], _response(list(chosen[k:]), "chosen"), _response(list(rejected[k:]), "rejected")
            )
        else:
            ex = PairedExample(chosen[:k], _text(chosen[k:], "chosen"), _text(rejected[k:], "rejected"))
    _distinct(ex.chosen, ex.rejected, "chosen/rejected")
    return [ex]


def trl_unpaired(row: dict[str, Any]) -> list[Example]:
    """TRL unpaired preference row: prompt/completion/label (label true = desirable)."""
    return [
        BinaryExample(
            _prompt(_get(row, "prompt")),
            _response(_get(row, "completion"), "completion"),
            _flag(row, "label"),
        )
    ]


@dataclass(frozen=True)
class FormatSpec:
    convert: Callable[[dict[str, Any]], list[Example]]
    kind: str  # "paired" | "unpaired" (as the loss kinds)
    fields: tuple[str, ...]
    help: str


_PKU_FIELDS = ("prompt", "response_0", "response_1")
FORMATS: dict[str, FormatSpec] = {
    "pku_helpful": FormatSpec(
        _pku_pair("better_response_id"), "paired", (*_PKU_FIELDS, "better_response_id"), "helpfulness pairs"
    ),
    "pku_safe": FormatSpec(
        _pku_pair("safer_response_id"), "paired", (*_PKU_FIELDS, "safer_response_id"), "safety pairs"
    ),
    "pku_safe_kto": FormatSpec(
        pku_safety_binary,
        "unpaired",
        (*_PKU_FIELDS, "is_response_0_safe", "is_response_1_safe"),
        "KTO safety examples (two per row)",
    ),
    "trl_paired": FormatSpec(trl_paired, "paired", ("chosen", "rejected"), "TRL prompt/chosen/rejected"),
    "trl_unpaired": FormatSpec(trl_unpaired, "unpaired", ("prompt", "completion", "label"), "TRL unpaired"),
}


def get_format(name: str) -> FormatSpec:
    try:
        return FORMATS[name]
    except KeyError:
        raise DataError(f"unknown data format {name!r}; valid formats: {', '.join(FORMATS)}") from None


# ------------------------------------------------------------------------------------------------- reading
def is_local(source: str) -> bool:
    """A file path rather than a hub name ("owner/name"): it exists, has a data-file suffix, starts like a path
    (``.``, ``/``, ``~``) or has more than one ``/``."""
    return (
        Path(source).expanduser().exists()
        or Path(source).suffix in LOCAL_BUILDERS
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
    )


def _json_lines(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Parse JSON lines (split on ``\\n`` only: U+2028 and friends may appear inside JSON strings); the first
    undecodable or malformed line raises a DataError naming it."""
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a byte-order mark
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}: line {lineno}: not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})"
            ) from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}: line {lineno}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def _python_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a local JSON/JSONL file, parsed with `json` (values keep their JSON types)."""
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        return _json_lines(path, data)
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except json.JSONDecodeError:
        return _json_lines(path, data)  # maybe JSON lines with a .json suffix
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a list of JSON objects (or JSON lines)")
    return obj


def load_rows(source: str, split: str = "train", max_rows: int | None = None) -> list[dict[str, Any]]:
    """Rows (dicts) of a local file or hub dataset (JSON parsed with `json`, the rest read with `datasets`)."""
    if is_local(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"{source}: file not found")
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(
                f"{source}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_BUILDERS)}"
            )
        if builder == "json":  # exact JSON types and line numbers (see the module docstring)
            rows = _python_rows(path)
            return rows[:max_rows] if max_rows is not None else rows
        datasets = _datasets()
        try:
            return _head(datasets.load_dataset(builder, data_files=str(path), split="train"), max_rows)
        except Exception as e:
            raise DataError(f"{source}: could not read {builder} file: {type(e).__name__}: {e}") from None
    else:
        datasets = _datasets()
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise DataError(
                f"{source}: could not load hub dataset (split {split!r}): {type(e).__name__}: {e}. "
                "Offline? Pass a local .jsonl/.json/.parquet/.csv file instead."
            ) from None
    return _head(ds, max_rows)


def _datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _head(ds: Any, max_rows: int | None) -> list[dict[str, Any]]:
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    return ds.to_list()


@dataclass
class Loaded:
    """Records of one source and the rows skipped (skip_invalid=True) with their reasons."""

    examples: list[Example]
    rows: int
    skipped: list[str]


def convert_rows(
    rows: Iterable[dict[str, Any]], format: str, source: str = "<rows>", skip_invalid: bool = False
) -> Loaded:
    """Apply the format's converter to every row; an invalid row raises `DataError` (or is counted and skipped)."""
    spec = get_format(format)
    examples: list[Example] = []
    skipped: list[str] = []
    n = 0
    for n, row in enumerate(rows, start=1):
        try:
            if not isinstance(row, dict):
                raise RowError("<row>", f"expected an object, got {type(row).__name__}")
            examples.extend(spec.convert(row))
        except RowError as e:
            msg = f"{source}: row {n}: {e}"
            if not skip_invalid:
                raise DataError(msg + " (set data.skip_invalid=true to skip invalid rows)") from None
            skipped.append(msg)
    if n == 0:
        raise DataError(f"{source}: no rows")
    if not examples:
        raise DataError(f"{source}: all {n} rows are invalid for format {format!r}; first: {skipped[0]}")
    return Loaded(examples, n, skipped)


def without_both_safe(rows: list[dict[str, Any]], source: str = "<rows>") -> list[dict[str, Any]]:
    """The rows that do not have two safe responses (PKU schema); a row without the flags raises `DataError`."""
    kept = []
    for n, row in enumerate(rows, start=1):
        try:
            flags = [_flag(row, f"is_response_{i}_safe") for i in (0, 1)]  # both read: a missing flag raises
        except RowError as e:
            raise DataError(
                f"{source}: row {n}: {e} (data.drop_both_safe needs the PKU safety flags)"
            ) from None
        if not all(flags):
            kept.append(row)
    log.info(
        "%s: dropped %d of %d rows whose two responses are both safe",
        source,
        len(rows) - len(kept),
        len(rows),
    )
    if not kept:
        raise DataError(f"{source}: every row has two safe responses; nothing left with data.drop_both_safe")
    return kept


def load_examples(
    source: str,
    format: str,
    split: str = "train",
    max_rows: int | None = None,
    skip_invalid: bool = False,
    drop_both_safe: bool = False,
) -> list[Example]:
    """Read `source` and convert it with `format` (see the module docstring); logs skipped rows.

    drop_both_safe (PKU formats): leave out the rows whose two responses are both safe (is_response_0_safe and
    is_response_1_safe true) — their safer_response_id ranks two responses the safety judgement calls equal, a
    label that is noise for a safety preference (docs/toyworld.md: half of the toyworld's safety pairs)."""
    get_format(format)  # fail on a bad name before reading anything
    rows = load_rows(source, split, max_rows)
    if drop_both_safe:
        rows = without_both_safe(rows, source)
    loaded = convert_rows(rows, format, source, skip_invalid)
    if loaded.skipped:
        log.warning(
            "%s: skipped %d of %d invalid rows; first: %s",
            source,
            len(loaded.skipped),
            loaded.rows,
            loaded.skipped[0],
        )
    log.info("%s: %d rows → %d %s records", source, loaded.rows, len(loaded.examples), format)
    return loaded.examples
