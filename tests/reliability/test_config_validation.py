"""Impossible settings are rejected before any model (or tokenizer) is loaded or any output is written: exit code 2
and a one-line message naming the setting."""

import json

import pytest
from reliability_helpers import assert_user_error, run_cli, stage_fields, write_yaml

TRAIN_ERRORS = {
    "beta=0": "beta must be > 0",
    "beta=-0.1": "beta must be > 0",
    "beta=.nan": "beta must be > 0",
    "beta=.inf": "beta must be > 0",
    "lr=0": "lr must be > 0",
    "lr=-1e-5": "lr must be > 0",
    "lr=.inf": "lr must be > 0",
    "label_smoothing=0.5": "label_smoothing",
    "label_smoothing=-0.1": "label_smoothing",
    "batch_size=0": "batch_size",
    "grad_accum=0": "grad_accum",
    "warmup_ratio=1.0": "warmup_ratio",
    "max_steps=-1": "max_steps",
    "epochs=0 max_steps=0": "epochs > 0 or max_steps > 0",
    "max_prompt_length=0": "max_prompt_length must be >= 1",
    "max_prompt_length=80": "max_prompt_length (80) must be < max_length (80)",
    "eval_fraction=1.0": "eval_fraction",
    "loss=orpo": "unknown loss 'orpo'; valid losses: dpo, ipo, kto",
    "loss=kto": "loss 'kto' needs unpaired data but data.format 'pku_helpful' is paired",
    "scheduler=exp": "unknown scheduler",
    "mixed_precision=fp8": "mixed_precision",
    "log_every=0": "log_every",
    "save_every=-1": "save_every",
    "kl_every=-2": "kl_every",
    "kl_prompts=-1": "kl_prompts",
    "kl_samples=0": "kl_samples",
    "desirable_weight=0": "desirable_weight must be > 0 and finite, got 0",
    "undesirable_weight=.inf": "undesirable_weight must be > 0 and finite, got inf",
    "weight_decay=-0.1": "weight_decay",
    "max_grad_norm=-1": "max_grad_norm",
    "logprob_chunk=0": "logprob_chunk",
    "lora.r=0": "lora.r must be >= 1, got 0",
    "lora.dropout=1.0": "lora.dropout must be in [0, 1), got 1.0",
    "data.format=alpaca": "unknown data.format 'alpaca'; valid formats: pku_helpful",
    "data.max_rows=0": "data.max_rows",
    "beta=high": "beta: expected float",
    "bogus=1": "unknown key(s) ['bogus']",
}


@pytest.mark.parametrize("override", list(TRAIN_ERRORS))
def test_bad_train_setting_is_rejected_before_loading_anything(tmp_path, capsys, no_model_loads, override):
    out = tmp_path / "run"
    cfg = write_yaml(
        tmp_path / "stage.yaml", stage_fields("/no/model/needed", "/no/data.jsonl", out, max_length=80)
    )
    rc, _, err = run_cli(["-q", "train", str(cfg), *override.split()], capsys)
    assert_user_error(rc, err, TRAIN_ERRORS[override])
    assert no_model_loads == [] and not out.exists()


def _pipeline(tmp_path, stages=None, merges=None):
    stages = stages or [
        {"name": "helpful", "data": {"source": "/d.jsonl", "format": "pku_helpful"}, "beta": 0.1},
        {"name": "safe", "data": {"source": "/d.jsonl", "format": "pku_safe"}, "lam": [0.5, 2.0]},
    ]
    return {
        "policy": "builtin:tiny-gpt2",
        "output_dir": str(tmp_path / "p"),
        "stages": stages,
        "merges": merges or [{"name": "psacpo", "a": "helpful", "b": "safe-lam2", "qs": [0.5]}],
    }


def _safe(**kw):
    return {"name": "safe", "data": {"source": "/d.jsonl", "format": "pku_safe"}, **kw}


HELPFUL = {"name": "helpful", "data": {"source": "/d.jsonl", "format": "pku_helpful"}, "beta": 0.1}
PIPELINE_ERRORS = {
    "lam < 0": ({"stages": [HELPFUL, _safe(lam=-1.0)]}, "lam must be > 0"),
    "lam = 0": ({"stages": [HELPFUL, _safe(lam=[1.0, 0.0])]}, "lam must be > 0"),
    "lam = inf (β/λ = 0)": ({"stages": [HELPFUL, _safe(lam=float("inf"))]}, "beta must be > 0"),
    "beta < 0": ({"stages": [{**HELPFUL, "beta": -0.1}]}, "beta must be > 0"),
    "q > 1": (
        {"merges": [{"name": "m", "a": "helpful", "b": "safe-lam2", "qs": [0.5, 1.5]}]},
        "merges[0].qs[1] must be in [0, 1], got 1.5",
    ),
    "q < 0": (
        {"merges": [{"name": "m", "a": "helpful", "b": "safe-lam2", "qs": [-0.1]}]},
        "merges[0].qs[0] must be in [0, 1], got -0.1",
    ),
    "q = nan": (
        {"merges": [{"name": "m", "a": "helpful", "b": "safe-lam2", "qs": [float("nan")]}]},
        "merges[0].qs[0] must be in [0, 1], got nan",
    ),
    "merge of unknown stage": (
        {"merges": [{"name": "m", "a": "helpful", "b": "nope"}]},
        "unknown stage or branch",
    ),
    "unknown start_from": ({"stages": [HELPFUL, _safe(beta=0.1, start_from="nope")]}, "unknown stage 'nope'"),
    "beta and lam": ({"stages": [HELPFUL, _safe(beta=0.1, lam=1.0)]}, "give beta or lam"),
    "stage-level bad setting": (
        {"stages": [{**HELPFUL, "overrides": {"max_prompt_length": 0}}]},
        "stage helpful: ",
    ),
    "unknown builtin": ({"policy": "builtin:gpt5"}, "unknown builtin model"),
}


@pytest.mark.parametrize("case", list(PIPELINE_ERRORS))
def test_bad_pipeline_is_rejected_before_building_or_loading_anything(tmp_path, capsys, no_model_loads, case):
    change, message = PIPELINE_ERRORS[case]
    fields = {**_pipeline(tmp_path), **change}
    cfg = write_yaml(tmp_path / "pipeline.yaml", fields)
    rc, _, err = run_cli(["-q", "pipeline", str(cfg)], capsys)
    assert_user_error(rc, err, message)
    assert no_model_loads == []
    assert not (tmp_path / "p" / "stages").exists()


@pytest.mark.parametrize(
    "qs, message",
    [
        ([1.5], "qs[0] must be in [0, 1], got 1.5"),
        ([-0.5, 0.5], "qs[0] must be in [0, 1], got -0.5"),
        ([], "qs must be non-empty, got []"),
        ([float("nan")], "qs[0] must be in [0, 1], got nan"),
    ],
)
def test_bad_merge_weights_are_rejected_before_reading_models(tmp_path, capsys, no_model_loads, qs, message):
    """Through YAML + override (`sacpo merge`), `from_dict` and direct construction in Python: same message."""
    from sacpo.config import ConfigError, from_dict
    from sacpo.recipes.merge import MergeConfig

    fields = {"a": "/a", "b": "/b", "output_dir": str(tmp_path / "m")}
    with pytest.raises(ConfigError) as e:
        from_dict(MergeConfig, {**fields, "qs": qs})
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        MergeConfig(**fields, qs=qs)
    assert str(e.value) == message
    cfg = write_yaml(tmp_path / "merge.yaml", fields)
    rc, _, err = run_cli(
        ["-q", "merge", str(cfg), f"qs={'[.nan]' if any(q != q for q in qs) else json.dumps(qs)}"], capsys
    )
    assert_user_error(rc, err, message)
    assert no_model_loads == [] and not (tmp_path / "m").exists()
