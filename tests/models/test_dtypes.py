"""sacpo.models.dtypes: what `auto` resolves to, casting with tied weights kept tied, saving in a dtype without
touching the live model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sacpo.models.dtypes import cast_state_dict, checkpoint_dtype, resolve_dtype, save_pretrained_as
from sacpo.models.load import load_model


def _dir(tmp_path, tensors, config=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config or {}))
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_auto_is_the_dtype_holding_most_parameters(tmp_path):
    # a bf16 model with float32 norms (as some checkpoints ship): bf16 holds the most elements
    mixed = _dir(tmp_path / "m", {"w": torch.zeros(8, 8, dtype=torch.bfloat16), "norm": torch.zeros(8)})
    assert checkpoint_dtype(mixed) == torch.bfloat16 == resolve_dtype("auto", mixed)
    assert resolve_dtype("fp16", mixed) == torch.float16 and resolve_dtype("fp32", mixed) == torch.float32
    # the tensors decide over a stale config
    stale = _dir(tmp_path / "s", {"w": torch.zeros(4, dtype=torch.float16)}, {"dtype": "float32"})
    assert checkpoint_dtype(stale) == torch.float16
    # no floating tensor: config.json's dtype (or torch_dtype), else float32
    ints = {"ids": torch.zeros(3, dtype=torch.int64)}
    assert checkpoint_dtype(_dir(tmp_path / "c", ints, {"torch_dtype": "bfloat16"})) == torch.bfloat16
    assert checkpoint_dtype(_dir(tmp_path / "n", ints)) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", mixed)


def test_cast_keeps_tied_tensors_shared_and_leaves_others():
    emb = torch.randn(5, 3)
    state = {"emb": emb, "head": emb, "other": torch.randn(5, 3), "ids": torch.arange(3), "half": emb.half()}
    out = cast_state_dict(state, torch.bfloat16)
    assert out["emb"] is out["head"] and out["other"] is not out["emb"]
    assert out["emb"].dtype == out["half"].dtype == torch.bfloat16 and out["ids"] is state["ids"]
    assert torch.equal(out["emb"], emb.bfloat16()) and state["emb"].dtype == torch.float32


def test_save_pretrained_as_saves_a_cast_copy(tiny_model, tmp_path):
    model = load_model(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained_as(model, tmp_path / "bf16", torch.bfloat16)
    assert all(
        torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items()
    )
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied to the embedding: stored once, as in a float32 save
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.bfloat16}
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    reloaded = load_model(tmp_path / "bf16", dtype=torch.bfloat16)
    assert torch.equal(reloaded.transformer.wte.weight, before["transformer.wte.weight"].bfloat16())
