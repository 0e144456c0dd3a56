"""Config machinery: YAML + key=value overrides into frozen dataclasses, with errors naming the key."""

import pytest

from sacpo.config import ConfigError, describe, from_dict, load_config, parse_overrides, to_yaml
from sacpo.train.config import TrainConfig

BASE = {"policy": "m", "output_dir": "o", "data": {"source": "d.jsonl"}}


def test_overrides_parse_yaml_values_and_dotted_keys():
    assert parse_overrides(["beta=0.05", "lora.r=16", "lams=[1, 2]", "name=x"]) == {
        "beta": 0.05,
        "lora": {"r": 16},
        "lams": [1, 2],
        "name": "x",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["beta"])


def test_load_yaml_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("policy: m\noutput_dir: o\ndata: {source: d.jsonl, format: pku_safe}\nbeta: 0.1\n")
    cfg = load_config(TrainConfig, p, ["beta=0.025", "lora.enabled=true", "data.max_rows=5"])
    assert cfg.beta == 0.025 and cfg.lora.enabled and cfg.data.max_rows == 5 and cfg.data.format == "pku_safe"
    assert "beta: 0.025" in to_yaml(cfg)
    # round trip
    assert (
        load_config(
            TrainConfig,
            None,
            [f"{k}={v}" for k, v in [("policy", "m"), ("output_dir", "o")]]
            + [
                "data.source=d.jsonl",
                "beta=0.025",
                "lora.enabled=true",
                "data.max_rows=5",
                "data.format=pku_safe",
            ],
        )
        == cfg
    )


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bta'\].*beta"):
        from_dict(TrainConfig, {**BASE, "bta": 0.1})
    with pytest.raises(ConfigError, match=r"data\..*unknown key"):
        from_dict(TrainConfig, {**BASE, "data": {"source": "x", "fromat": "y"}})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": -1}, "beta must be > 0"),
        ({"loss": "xpo"}, "valid losses: dpo, ipo, kto"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_prompt_length": 300}, "max_prompt_length"),
        ({"beta": "high"}, "expected float"),
        ({"batch_size": 2.5}, "expected int"),
        ({"lora": {"enabled": "yes"}}, "expected bool"),
    ],
)
def test_validation_before_anything_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, {**BASE, **override})


def test_missing_required_field_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="policy"):
        from_dict(TrainConfig, {"output_dir": "o", "data": {"source": "d"}})
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(TrainConfig, tmp_path / "nope.yaml")


def test_describe_lists_help():
    text = describe(TrainConfig)
    assert "beta = 0.1" in text and "KL coefficient" in text
