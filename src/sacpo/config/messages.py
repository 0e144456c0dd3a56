"""How configs explain themselves: pydantic errors as one line per field (dotted path, bounds, choices) and the
field listing of `--help-config` (`describe`)."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A config file or override is invalid."""


@dataclasses.dataclass
class _Spot:
    """Where an error's `loc` points in the config type: the path without pydantic's union tags, the annotation
    there (Annotated and Optional unwrapped) with its constraints, and whether the loc went into a union member."""

    path: list[str | int]
    tp: Any
    metadata: list[Any]
    union: bool = False


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _field_info(cls: type, f: dataclasses.Field) -> FieldInfo:
    return FieldInfo.from_annotated_attribute(_hints(cls)[f.name], f)


def _unwrap(tp: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """Annotated[X, ...] → X (its constraints added to metadata); X | None → X."""
    while True:
        if get_origin(tp) is Annotated:
            info = FieldInfo.from_annotation(tp)
            tp, metadata = info.annotation, [*metadata, *info.metadata]
        elif _is_union(tp) and type(None) in get_args(tp) and len(get_args(tp)) == 2:
            tp = next(a for a in get_args(tp) if a is not type(None))
        else:
            return tp, metadata


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _locate(cls: type, loc: tuple[str | int, ...]) -> _Spot:
    """Follow a pydantic error `loc` through the type hints of `cls` (dataclass fields, list items, dict values)."""
    path: list[str | int] = []
    tp, metadata = cls, []
    for i, part in enumerate(loc):
        tp, metadata = _unwrap(tp, metadata)
        origin, args = get_origin(tp), get_args(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else {}
        if _is_union(tp):
            return _Spot(path, tp, metadata, union=True)
        if part in fields:
            info = _field_info(tp, fields[part])
            tp, metadata = info.annotation, list(info.metadata)
        elif origin in (list, tuple, set, frozenset) and isinstance(part, int):
            tp, metadata = (args[0] if args else Any), []
        elif origin is dict and part != "[key]":
            tp, metadata = (args[1] if len(args) == 2 else Any), []
        else:
            return _Spot(path + [p for p in loc[i:] if p != "[key]"], None, [])
        path.append(part)
    return _Spot(path, *_unwrap(tp, metadata))


def _dotted(path: list[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


_EXPECTED = {
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), "int"),
    **dict.fromkeys(("float_type", "float_parsing"), "float"),
    **dict.fromkeys(("bool_type", "bool_parsing"), "bool"),
    "string_type": "str",
    **dict.fromkeys(("list_type", "tuple_type", "set_type"), "a list"),
    **dict.fromkeys(("dict_type", "dataclass_type", "model_type"), "a mapping"),
}
_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
_GROUPED = {"unexpected_keyword_argument": "unknown", "extra_forbidden": "unknown", "missing": "missing"}


def error_lines(cls: type, errors: list[dict[str, Any]], data: dict[str, Any]) -> list[str]:
    """One line per error; unknown and missing keys grouped per mapping, a union's failed members per field."""
    groups: dict[tuple, tuple[dict[str, Any], _Spot, list[str]]] = {}
    for e in errors:
        loc = e["loc"][1:]  # drop the field of the wrapping model
        kind = _GROUPED.get(e["type"])
        spot = _locate(cls, loc[:-1] if kind else loc)  # unknown/missing keys: the mapping that holds them
        kind = "union" if spot.union else kind
        key = (kind, tuple(spot.path)) if kind else (e["type"], len(groups))
        _, _, names = groups.setdefault(key, (e, spot, []))
        if kind in ("unknown", "missing"):
            names.append(str(loc[-1]))
    return [_message(cls, kind, e, spot, names, data) for (kind, _), (e, spot, names) in groups.items()]


def _message(cls: type, kind: str, e: dict[str, Any], spot: _Spot, names: list[str], data: Any) -> str:
    path = _dotted(spot.path)
    owner = path or cls.__name__
    if kind == "unknown":
        valid = (
            sorted(f.name for f in dataclasses.fields(spot.tp)) if dataclasses.is_dataclass(spot.tp) else []
        )
        return f"{owner}: unknown key(s) {sorted(names)}; valid keys: {', '.join(valid)}"
    if kind == "missing":
        return f"{owner}: missing required key(s) {names}"
    if kind == "union":
        return f"{path}: {_value_at(data, spot.path)!r} matches none of {_type_name(spot.tp)}"
    value = e.get("input")
    if kind in _EXPECTED:
        return f"{path}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind == "literal_error":
        word = next((p for p in reversed(spot.path) if isinstance(p, str)), "value")
        choices = ", ".join(str(a) for a in get_args(spot.tp)) or e["ctx"]["expected"]
        return f"unknown {path} {value!r}; valid {_plural(word)}: {choices}"
    if kind in _BOUNDS:
        return f"{path} must be {_bounds_text(spot.metadata) or e['msg']}, got {value!r}"
    if kind in ("too_short", "too_long", "string_too_short", "string_too_long"):
        return f"{path} must be {_bounds_text(spot.metadata)}, got {value!r}"
    if kind == "value_error" and isinstance(error := e["ctx"]["error"], ConfigError):
        return str(error)  # the class's own check: its message names what it checks
    if kind == "value_error":
        return f"{owner}: {error}"
    return f"{owner}: {e['msg']}"


def _value_at(data: Any, path: list[str | int]) -> Any:
    for p in path:
        data = data[p]
    return data


def _plural(word: str) -> str:
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def _bounds_text(metadata: list[Any]) -> str:
    """'> 0 and finite', 'in [0, 1)', '>= 1', 'non-empty' … from pydantic/annotated-types constraint objects."""
    c = {k: v for m in metadata for k, v in _constraint_items(m)}
    lo = (">=", c["ge"]) if c.get("ge") is not None else (">", c["gt"]) if c.get("gt") is not None else None
    hi = ("<=", c["le"]) if c.get("le") is not None else ("<", c["lt"]) if c.get("lt") is not None else None
    parts = []
    if lo and hi:
        parts.append(f"in {'[' if lo[0] == '>=' else '('}{lo[1]}, {hi[1]}{']' if hi[0] == '<=' else ')'}")
    elif lo or hi:
        parts.append(f"{(lo or hi)[0]} {(lo or hi)[1]}")
    if c.get("allow_inf_nan") is False and not (lo and hi):
        parts.append("finite")
    if c.get("min_length") is not None:
        parts.append("non-empty" if c["min_length"] == 1 else f"of length >= {c['min_length']}")
    if c.get("max_length") is not None:
        parts.append(f"of length <= {c['max_length']}")
    return " and ".join(parts)


def _constraint_items(m: Any) -> list[tuple[str, Any]]:
    names = ("gt", "ge", "lt", "le", "allow_inf_nan", "min_length", "max_length")
    return [(n, getattr(m, n)) for n in names if getattr(m, n, None) is not None]


# --------------------------------------------------------------------------------------------------- describe
def _type_name(tp: Any) -> str:
    """int, float > 0 and finite, list[str] | None, 'dpo' | 'ipo' | 'kto', DataConfig …"""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Annotated:
        info = FieldInfo.from_annotation(tp)
        return " ".join(filter(None, (_type_name(info.annotation), _bounds_text(info.metadata))))
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def describe(cls: type, prefix: str = "") -> str:
    """Every field of a config class, nested ones by dotted name: default, type with bounds or choices, help
    (for `sacpo COMMAND --help-config`)."""
    lines = []
    for f in dataclasses.fields(cls):
        info = _field_info(cls, f)
        inner, _ = _unwrap(info.annotation, [])
        item = get_args(inner)[0] if get_origin(inner) is list and get_args(inner) else None
        nested = (
            inner if dataclasses.is_dataclass(inner) else item if dataclasses.is_dataclass(item) else None
        )
        spec = " ".join(filter(None, (_type_name(info.annotation), _bounds_text(info.metadata))))
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        head = f"  {prefix}{f.name}"
        if default is dataclasses.MISSING:
            spec += ", required"
        elif not dataclasses.is_dataclass(default):  # a nested default shows in the nested fields' lines
            head += f" = {default!r}"
        lines.append(f"{head}  ({spec})\n      {f.metadata.get('description', '')}")
        if nested is not None:
            lines.append(describe(nested, f"{prefix}{f.name}{'.' if nested is inner else '[].'}"))
    return "\n".join(lines)
