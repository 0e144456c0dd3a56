"""Frozen dataclass configs ⇄ YAML, with `key=value` command-line overrides, validated by pydantic.

    cfg = load_config(TrainConfig, "configs/train.yaml", ["beta=0.05", "lora.r=16"])

A config class is a frozen stdlib dataclass made with `@config_dataclass`, so that every construction (YAML,
`Cls(...)` in Python, `dataclasses.replace`) is checked; its fields say their type, help text, bounds and choices:

    @config_dataclass
    class LoraConfig:
        r: PositiveInt = help_field(8, help="LoRA rank")
        dropout: Fraction = help_field(0.0, help="LoRA dropout")

    @config_dataclass
    class TrainConfig:
        data: DataConfig = help_field(help="training data")                   # required, nested
        loss: Literal["dpo", "ipo", "kto"] = help_field("dpo", help="preference loss")
        beta: float = help_field(0.1, help="KL coefficient β", gt=0, allow_inf_nan=False)
        lr: LearningRate = help_field(5e-6, help="AdamW learning rate")      # a shared field type
        lora: LoraConfig = help_field(LoraConfig(), help="LoRA settings")

        def __post_init__(self) -> None:                                      # cross-field checks only
            if self.max_prompt_length >= self.max_length:
                raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ...")

Validation (`from_dict`) is pydantic v2's: `help_field`'s bounds travel in the dataclass field's metadata, which
pydantic reads as `Field(...)` arguments; `Annotated[...]` types and `Literal[...]` choices work as in pydantic. The
input is validated as the YAML/JSON data it is, in pydantic's strict JSON mode: mappings build nested dataclasses,
ints are accepted for floats, and nothing else is coerced (no "5" → 5, "yes" → True, 1 → True, 2.0 → 2). YAML is
read with YAML 1.2 floats (`1e-4` is a float, not PyYAML 1.1's string). Unknown keys are rejected, naming the valid
ones. Every error names its field by its dotted path (`lora.r`, `stages[1].lam`), one line per error.

Shared field types (declare a repeated field's constraint once, per-class default and help stay on the field):
`PositiveInt` (≥ 1: batch sizes, lengths, counts), `NonNegativeInt` (≥ 0: "every N steps, 0 = never"), `Seed`,
`PositiveFloat` and `NonNegativeFloat` (finite), `LearningRate`, `Fraction` ([0, 1): warmup_ratio, eval_fraction,
dropout), `Probability` ([0, 1]: merge weights, noise rates), `Device` (auto | cpu | mps | cuda[:N] | xpu[:N]),
`ModelDtype` (auto | bf16 | fp16 | fp32: the dtype a model is stored in; resolved by `sacpo.models.dtypes`).
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import functools
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml
from pydantic import AfterValidator, ConfigDict, Field

from sacpo.config.messages import ConfigError, describe, error_lines

T = TypeVar("T")
_VALIDATING = contextvars.ContextVar("sacpo_config_validating", default=False)


def help_field(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    allow_inf_nan: bool | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
) -> Any:
    """A dataclass field with help text and optional bounds (pydantic `Field` arguments: `gt`/`ge`/`lt`/`le` on
    numbers, `allow_inf_nan=False` for finite floats, `min_length`/`max_length` on lists and strings).
    No default = a required key; list/dict/dataclass defaults become default factories (each instance its copy)."""
    bounds = {"gt": gt, "ge": ge, "lt": lt, "le": le, "allow_inf_nan": allow_inf_nan}
    bounds.update(min_length=min_length, max_length=max_length)
    metadata = {"description": help, **{k: v for k, v in bounds.items() if v is not None}}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def _check_device(name: str) -> str:
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"{name!r} is not a device; valid: auto, cpu, mps, cuda, cuda:N, xpu, xpu:N")
    return name


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Seed = NonNegativeInt
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # finite, unlike pydantic's PositiveFloat
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
LearningRate = PositiveFloat
Fraction = Annotated[float, Field(ge=0, lt=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
Device = Annotated[str, AfterValidator(_check_device)]
ModelDtype = Literal["auto", "bf16", "fp16", "fp32"]  # auto: the source checkpoint's own dtype


# ---------------------------------------------------------------------------------------------- YAML and dicts
class _YamlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, also reading YAML 1.2 floats without a dot (`1e-4`, `5E+3`) as floats."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: builds plain data only


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a (nested) dataclass config."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """YAML form of a config (written next to every run's outputs as config.yaml)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['a.b=1', 'c=[1, 2]'] → {'a': {'b': 1}, 'c': [1, 2]} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = _load_yaml(raw) if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_update(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in updates.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping raises ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        data = _load_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML (optional), apply `key=value` overrides, build and validate `cls`."""
    data = read_yaml(path) if path is not None else {}
    data = deep_update(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


# ------------------------------------------------------------------------------------------------- validation
@functools.cache
def _validator(cls: type) -> type[pydantic.BaseModel]:
    """A one-field model holding `cls`: plain dataclasses take the config of the model around them (pydantic
    #10917), so the config classes themselves need no pydantic settings."""
    config = ConfigDict(extra="forbid", strict=True)
    return pydantic.create_model(f"{cls.__name__}Input", __config__=config, value=(cls, ...))


def _not_yaml(value: Any) -> Any:
    raise TypeError(f"{value!r} is not a YAML value (str, number, bool, null, list or mapping)")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from plain (YAML-shaped) data, recursively; `where` prefixes every error line.

    Raises ConfigError with one line per invalid field, each naming the field's dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{cls.__name__}: expected a mapping, got {type(data).__name__}")
    try:
        text = json.dumps({"value": data}, default=_not_yaml)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}{cls.__name__}: {e}") from None
    token = _VALIDATING.set(True)  # the instances pydantic builds need no second check (`config_dataclass`)
    try:
        return _validator(cls).model_validate_json(text).value
    except pydantic.ValidationError as e:
        lines = error_lines(cls, e.errors(include_url=False), data)
        raise ConfigError("\n".join(where + line for line in lines)) from None
    finally:
        _VALIDATING.reset(token)


def _plain(value: Any) -> Any:
    """Python values a config built in code may hold: paths as strings, numpy/torch scalars as numbers."""
    if isinstance(value, Path):
        return str(value)
    if callable(getattr(value, "item", None)) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return _not_yaml(value)


def check(cfg: T, where: str = "") -> T:
    """Validate a config built in Python exactly as `from_dict` validates YAML (paths count as strings, numpy
    scalars as numbers); returns the validated config (nested mappings built into their dataclasses).
    Raises ConfigError."""
    try:
        data = json.loads(json.dumps(to_dict(cfg), default=_plain))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}{type(cfg).__name__}: {e}") from None
    return from_dict(type(cfg), data, where)


@typing.dataclass_transform(frozen_default=True)
def config_dataclass(cls: type[T]) -> type[T]:
    """`@dataclass(frozen=True)` whose every construction — `Cls(...)`, `dataclasses.replace`, `from_dict` — checks
    the declared types, bounds and choices, then runs the class's own `__post_init__` (cross-field checks)."""
    own = cls.__dict__.get("__post_init__") or getattr(cls, "__post_init__", None)
    own = getattr(own, "__sacpo_own_post_init__", own)

    def __post_init__(self: Any) -> None:
        if not _VALIDATING.get():
            valid = check(self)
            for f in dataclasses.fields(
                self
            ):  # a nested config given as a mapping (or a list of them) is built
                if isinstance(getattr(self, f.name), dict | list):
                    object.__setattr__(self, f.name, getattr(valid, f.name))
        if own is not None:
            own(self)

    __post_init__.__sacpo_own_post_init__ = own  # type: ignore[attr-defined]
    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
    return dataclasses.dataclass(frozen=True)(cls)


__all__ = [
    "ConfigError",
    "Device",
    "Fraction",
    "LearningRate",
    "ModelDtype",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "Probability",
    "Seed",
    "check",
    "config_dataclass",
    "deep_update",
    "describe",
    "from_dict",
    "help_field",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "to_dict",
    "to_yaml",
]
