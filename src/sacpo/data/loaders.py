"""Dataset rows → canonical records (`PairedExample`, `BinaryExample`), with errors that name file, row, field.

Local .json/.jsonl files are parsed with Python's `json` module, so every value keeps its JSON type and an
error names the exact line (malformed JSON, non-UTF-8 bytes). `datasets`/pyarrow is not used for them: its
column type inference silently coerces values (``"1"`` → 1, 1 → 1.0 in a column that also holds 0.5,
``"2020-01-01"`` → a datetime), which accepted invalid rows, rejected valid ones and blamed the wrong row.
Parquet/CSV files and hub dataset names (when online) are read through `datasets`.

Formats (`data.format`) and their converters: `sacpo.data.formats`.

Row numbers in messages are 1-based (the line number of a .jsonl file without blank lines).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sacpo.data.formats import DataError, Example, RowError, flag, get_format

log = logging.getLogger(__name__)

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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
            flags = [flag(row, f"is_response_{i}_safe") for i in (0, 1)]  # both read: a missing flag raises
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
