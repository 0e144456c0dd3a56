"""`dtype` of a stage: model/ is saved in the policy checkpoint's own dtype (auto) or the one asked for, while
training runs on float32 weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sacpo.config import ConfigError, from_dict
from sacpo.models.convert import import_model
from sacpo.models.dtypes import checkpoint_dtype
from sacpo.train.config import TrainConfig
from sacpo.train.loop import train

FAST = {
    "max_steps": 2,
    "batch_size": 8,
    "lr": 3e-3,
    "max_length": 80,
    "max_prompt_length": 40,
    "kl_prompts": 0,
    "eval_fraction": 0.2,
}


@pytest.fixture(scope="module")
def tiny_bf16(tiny_model, tmp_path_factory):
    return import_model(tiny_model, tmp_path_factory.mktemp("bf16") / "tiny", dtype="bf16")


def _train(policy, data, out, **kw):
    fields = {**FAST, "policy": str(policy), "output_dir": str(out), "data": {"source": str(data)}, **kw}
    return train(from_dict(TrainConfig, fields), show_progress=False)


def _size(model_dir):
    return (model_dir / "model.safetensors").stat().st_size


def _weights(model_dir):
    return load_file(model_dir / "model.safetensors")


def test_auto_keeps_a_bf16_policy_bf16_at_half_the_size(tiny_model, tiny_bf16, pku_tiny, tmp_path):
    r = _train(tiny_bf16, pku_tiny, tmp_path / "auto")
    weights = _weights(r.model_dir)
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}
    assert json.loads((r.model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((r.output_dir / "summary.json").read_text())["dtype"] == "bfloat16"
    fp32 = _train(tiny_model, pku_tiny, tmp_path / "fp32")  # the float32 tiny model: auto = float32
    assert checkpoint_dtype(fp32.model_dir) == torch.float32
    assert _size(r.model_dir) / _size(fp32.model_dir) == pytest.approx(0.5, abs=0.02)
    start = _weights(tiny_bf16)
    assert any(not torch.equal(weights[k], start[k]) for k in start)  # trained, then cast


def test_fp32_override_and_training_in_fp32(tiny_bf16, pku_tiny, tmp_path, monkeypatch):
    """dtype=fp32 saves float32; the policy trains on float32 weights whatever the checkpoint's dtype."""
    import sacpo.train.policy as policy

    dtypes = []
    real = policy.load_model

    def spy(*a, **k):
        model = real(*a, **k)
        dtypes.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(policy, "load_model", spy)
    r = _train(tiny_bf16, pku_tiny, tmp_path / "fp32", dtype="fp32")
    assert dtypes == [torch.float32]
    assert {t.dtype for t in _weights(r.model_dir).values()} == {torch.float32}
    assert checkpoint_dtype(r.model_dir) == torch.float32


def test_bf16_output_from_a_fp32_policy_loads_and_matches(tiny_model, pku_tiny, tmp_path):
    r = _train(tiny_model, pku_tiny, tmp_path / "bf16", dtype="bf16")
    assert checkpoint_dtype(r.model_dir) == torch.bfloat16
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(r.model_dir, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied


def test_unknown_dtype_is_rejected(tiny_model, pku_tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'; valid dtypes: auto, bf16, fp16, fp32"):
        fields = {"policy": str(tiny_model), "output_dir": str(tmp_path), "data": {"source": str(pku_tiny)}}
        from_dict(TrainConfig, {**fields, "dtype": "fp8"})
