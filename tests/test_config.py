"""Config machinery: YAML + key=value overrides into frozen dataclasses validated by pydantic, with one error line
per invalid field naming its dotted path, and --help-config text showing defaults, bounds and choices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from sacpo.config import (
    ConfigError,
    Device,
    Fraction,
    LearningRate,
    PositiveInt,
    Probability,
    config_dataclass,
    describe,
    from_dict,
    help_field,
    load_config,
    parse_overrides,
    to_dict,
    to_yaml,
)


@dataclass(frozen=True)
class Inner:
    r: PositiveInt = help_field(8, help="rank")
    dropout: Fraction = help_field(0.0, help="dropout")
    targets: list[str] | None = help_field(None, help="module names")


@dataclass(frozen=True)
class Stage:
    name: str = help_field(help="stage name")
    lam: float | list[float] | None = help_field(None, help="λ or a sweep")


@dataclass(frozen=True)
class Outer:
    source: str = help_field(help="data file")
    loss: Literal["dpo", "ipo", "kto"] = help_field("dpo", help="preference loss")
    beta: float = help_field(0.1, help="KL coefficient β", gt=0, allow_inf_nan=False)
    lr: LearningRate = help_field(5e-6, help="AdamW learning rate")
    steps: int = help_field(10, help="optimizer steps", ge=0)
    warmup: int = help_field(0, help="warmup steps")
    qs: list[Probability] = help_field([0.5], help="merge weights", min_length=1)
    flag: bool = help_field(False, help="a switch")
    device: Device = help_field("auto", help="where to run")
    inner: Inner = help_field(Inner(), help="inner settings")
    stages: list[Stage] = help_field([], help="stages")
    extra: dict[str, str] = help_field({}, help="free-form labels")

    def __post_init__(self) -> None:
        if self.warmup > self.steps:
            raise ConfigError(f"warmup ({self.warmup}) must be <= steps ({self.steps})")


def build(**kw) -> Outer:
    return from_dict(Outer, {"source": "d.jsonl", **kw})


def error(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        build(**kw)
    return str(e.value)


def test_overrides_parse_yaml_values_and_dotted_keys():
    assert parse_overrides(["beta=0.05", "inner.r=16", "qs=[1, 2]", "name=x", "lr=1e-4", "e="]) == {
        "beta": 0.05,
        "inner": {"r": 16},
        "qs": [1, 2],
        "name": "x",
        "lr": 1e-4,  # a YAML 1.2 float: PyYAML alone reads 1e-4 as a string
        "e": "",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["beta"])
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["inner=1", "inner.r=2"])


def test_load_yaml_with_overrides_and_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("source: d.jsonl\nbeta: 0.1\nlr: 3e-4\ninner: {r: 4}\nstages: [{name: a, lam: [1, 2]}]\n")
    cfg = load_config(Outer, p, ["beta=0.025", "inner.dropout=0.5", "flag=true"])
    assert cfg.beta == 0.025 and cfg.lr == 3e-4 and cfg.flag and cfg.inner == Inner(r=4, dropout=0.5)
    assert cfg.stages == [Stage("a", [1.0, 2.0])] and isinstance(cfg.stages[0].lam[0], float)
    assert "beta: 0.025" in to_yaml(cfg)
    out = tmp_path / "again.yaml"
    out.write_text(to_yaml(cfg))
    assert load_config(Outer, out) == cfg
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_nested_dataclasses_from_dicts_and_independent_defaults():
    a, b = build(), build(inner={"targets": ["q", "v"]}, stages=[{"name": "s"}, {"name": "t", "lam": 2}])
    assert a.inner == Inner() and a.stages == [] and a.stages is not build().stages
    assert b.inner.targets == ["q", "v"] and b.stages[1] == Stage("t", 2.0)
    assert build(beta=1).beta == 1.0 and isinstance(build(beta=1).beta, float)  # ints are floats


def test_unknown_keys_list_the_valid_ones_at_every_level():
    msg = error(bta=0.1, zz=1)
    assert msg.startswith("Outer: unknown key(s) ['bta', 'zz']; valid keys: beta, device, extra, flag, inner")
    assert error(inner={"rank": 2}) == "inner: unknown key(s) ['rank']; valid keys: dropout, r, targets"
    assert error(stages=[{"name": "a"}, {"name": "b", "lamb": 1}]).startswith(
        "stages[1]: unknown key(s) ['lamb']; valid keys: lam, name"
    )


def test_missing_required_keys_and_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^Outer: missing required key\(s\) \['source'\]$"):
        from_dict(Outer, {})
    assert error(stages=[{"lam": 1}]) == "stages[0]: missing required key(s) ['name']"
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Outer, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(Outer, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(Outer, tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="Outer: expected a mapping, got list"):
        from_dict(Outer, [])


def test_literal_choices_are_named():
    assert error(loss="xpo") == "unknown loss 'xpo'; valid losses: dpo, ipo, kto"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("beta", 0.0, "beta must be > 0 and finite, got 0.0"),
        ("beta", -1, "beta must be > 0 and finite, got -1"),
        ("beta", float("inf"), "beta must be > 0 and finite, got inf"),
        ("beta", float("nan"), "beta must be > 0 and finite, got nan"),
        ("lr", 0, "lr must be > 0 and finite, got 0"),
        ("steps", -1, "steps must be >= 0, got -1"),
        ("inner", {"r": 0}, "inner.r must be >= 1, got 0"),
        ("inner", {"dropout": 1.0}, "inner.dropout must be in [0, 1), got 1.0"),
        ("qs", [0.5, 1.5], "qs[1] must be in [0, 1], got 1.5"),
        ("qs", [], "qs must be non-empty, got []"),
    ],
)
def test_bounds_name_the_field(field, value, message):
    assert error(**{field: value}) == message


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("beta", "high", "beta: expected float, got 'high'"),
        ("steps", 2.5, "steps: expected int, got 2.5"),
        ("steps", 2.0, "steps: expected int, got 2.0"),
        ("steps", "5", "steps: expected int, got '5'"),
        ("steps", True, "steps: expected int, got True"),
        ("flag", "yes", "flag: expected bool, got 'yes'"),
        ("flag", 1, "flag: expected bool, got 1"),
        ("source", 3, "source: expected str, got 3"),
        ("qs", 0.5, "qs: expected a list, got 0.5"),
        ("inner", 3, "inner: expected a mapping, got 3"),
        ("extra", {"a": 1}, "extra.a: expected str, got 1"),
        ("inner", {"targets": ["q", 1]}, "inner.targets[1]: expected str, got 1"),
        (
            "stages",
            [{"name": "a", "lam": "x"}],
            "stages[0].lam: 'x' matches none of float | list[float] | None",
        ),
        ("device", "gpu", "device: 'gpu' is not a device; valid: auto, cpu, mps, cuda, cuda:N, xpu, xpu:N"),
    ],
)
def test_no_silent_coercion(field, value, message):
    assert error(**{field: value}) == message


def test_devices():
    assert [build(device=d).device for d in ("auto", "cpu", "cuda", "cuda:1", "mps")] == [
        "auto",
        "cpu",
        "cuda",
        "cuda:1",
        "mps",
    ]


def test_errors_one_line_each_with_context_and_class_checks_verbatim():
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"source": "d", "beta": 0, "loss": "x", "inner": {"r": 0}}, where="stage a: ")
    assert str(e.value).splitlines() == [
        "stage a: unknown loss 'x'; valid losses: dpo, ipo, kto",
        "stage a: beta must be > 0 and finite, got 0",
        "stage a: inner.r must be >= 1, got 0",
    ]
    assert error(warmup=20) == "warmup (20) must be <= steps (10)"  # __post_init__'s ConfigError as raised
    with pytest.raises(ConfigError, match=r"PosixPath.* is not a YAML value"):
        build(source=Path("d.jsonl"))


def test_describe_shows_help_defaults_bounds_and_choices():
    text = describe(Outer)
    for line in [
        "  source  (str, required)\n      data file",
        "  loss = 'dpo'  ('dpo' | 'ipo' | 'kto')\n      preference loss",
        "  beta = 0.1  (float > 0 and finite)\n      KL coefficient β",
        "  lr = 5e-06  (float > 0 and finite)",
        "  steps = 10  (int >= 0)",
        "  qs = [0.5]  (list[float in [0, 1]] non-empty)",
        "  inner  (Inner)\n      inner settings\n  inner.r = 8  (int >= 1)\n      rank",
        "  inner.dropout = 0.0  (float in [0, 1))",
        "  inner.targets = None  (list[str] | None)",
        "  stages = []  (list[Stage])\n      stages\n  stages[].name  (str, required)",
        "  stages[].lam = None  (float | list[float] | None)",
    ]:
        assert line in text, line


def test_config_dataclass_checks_every_construction():
    """`config_dataclass`: direct construction and dataclasses.replace check declared bounds and choices like
    from_dict; the class's own __post_init__ still runs (once per construction path); paths count as strings."""
    import dataclasses
    from pathlib import Path

    from sacpo.config import config_dataclass

    calls = []

    @config_dataclass
    class Inner:
        r: PositiveInt = help_field(8, help="rank")

    @config_dataclass
    class Outer:
        out: str = help_field("x", help="dir")
        mode: Literal["a", "b"] = help_field("a", help="mode")
        inner: Inner = help_field(Inner(), help="nested")

        def __post_init__(self) -> None:
            calls.append(self.mode)

    assert Outer(out=Path("/tmp/x")).out == Path("/tmp/x")  # a Path is accepted as a string
    with pytest.raises(ConfigError, match=r"unknown mode 'c'"):
        Outer(mode="c")
    with pytest.raises(ConfigError, match=r"r must be >= 1, got 0"):
        Inner(r=0)
    cfg = Outer()
    with pytest.raises(ConfigError, match=r"unknown mode"):
        dataclasses.replace(cfg, mode="z")
    assert from_dict(Outer, {"mode": "b", "inner": {"r": 2}}).inner.r == 2
    assert "b" in calls  # the own __post_init__ ran for the from_dict construction


@config_dataclass
class Leaf:
    r: PositiveInt = help_field(8, help="rank")


@config_dataclass
class Tree:
    inner: Leaf = help_field(Leaf(), help="nested")
    items: list[Leaf] = help_field([], help="a list of nested configs")
    beta: float = help_field(0.1, help="β")


def test_config_dataclass_builds_nested_mappings_and_takes_numpy_scalars():
    import dataclasses

    import numpy as np

    cfg = Tree(inner={"r": 4}, items=[{"r": 2}], beta=np.float32(0.5))
    assert isinstance(cfg.inner, Leaf) and cfg.inner.r == 4 and cfg.items == [Leaf(r=2)]
    assert isinstance(dataclasses.replace(cfg, inner={"r": 3}).inner, Leaf)
    with pytest.raises(ConfigError, match=r"inner.r must be >= 1"):
        Tree(inner={"r": 0})
    with pytest.raises(ConfigError, match="not a YAML value"):
        Tree(beta=object())
