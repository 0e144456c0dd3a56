"""Dataset formats: per-row converters to canonical records, with field checks whose errors name the field.

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

"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sacpo.data.records import BinaryExample, Message, PairedExample, Prompt

Example = PairedExample | BinaryExample


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


def flag(row: dict[str, Any], field: str) -> bool:
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
            prompt, _text(_get(row, f"response_{i}"), f"response_{i}"), flag(row, f"is_response_{i}_safe")
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
            flag(row, "label"),
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
