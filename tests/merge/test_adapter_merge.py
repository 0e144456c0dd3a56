"""Merging LoRA adapter directories: P-SACPO θ_1 + q·Δ_2 and the naive merge written as adapters (and as dense
models), equal to the dense linear merge of the merged-model outputs of the same trainings."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sacpo.config import from_dict
from sacpo.math.merging import MergeError, linear_merge
from sacpo.merge.linear import merge_dirs
from sacpo.models.adapters import is_adapter_dir, read_chain
from sacpo.models.load import load_model
from sacpo.train.config import TrainConfig
from sacpo.train.loop import train

FAST = {
    "max_steps": 3,
    "batch_size": 8,
    "lr": 1e-2,
    "warmup_ratio": 0.0,
    "max_length": 80,
    "max_prompt_length": 40,
    "log_every": 3,
    "kl_prompts": 0,
}
LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"], "save": "both"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """One intra-op thread (tests/conftest.py)."""


def _train(policy, data, out, fmt, **kw):
    fields = {
        **FAST,
        "policy": str(policy),
        "output_dir": str(out),
        "data": {"source": str(data), "format": fmt},
    }
    return train(from_dict(TrainConfig, {**fields, "lora": LORA, **kw}), show_progress=False).output_dir


@pytest.fixture(scope="module")
def stages(tiny_model, pku_tiny, tmp_path_factory):
    """Step 1 (helpful) from SFT, step 2 (safe) on the step-1 *adapter*, and safe from SFT (naive merge); each with
    its dense merged model in model/ and its adapter in adapter/ (lora.save=both)."""
    root = tmp_path_factory.mktemp("stages")
    s1 = _train(tiny_model, pku_tiny, root / "helpful", "pku_helpful")
    s2 = _train(s1 / "adapter", pku_tiny, root / "safe", "pku_safe", beta=0.05, seed=1)
    naive = _train(tiny_model, pku_tiny, root / "safe_from_sft", "pku_safe", seed=2)
    return {"sft": tiny_model, "helpful": s1, "safe": s2, "naive": naive}


def weights(model_dir):
    """The tensors a model directory (full or adapter) loads to, keyed as in a saved full model."""
    state = load_model(model_dir).state_dict()
    return {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied to the embedding


def dense(run):
    return load_file(run / "model" / "model.safetensors")


def assert_state_close(got, want, atol=1e-6):
    assert set(want) <= set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0])
def test_psacpo_adapter_merge_is_the_step2_adapter_scaled_and_equals_the_dense_merge(stages, tmp_path, q):
    s1, s2 = stages["helpful"], stages["safe"]
    out = merge_dirs(s1 / "adapter", s2 / "adapter", q, tmp_path / "m")
    assert is_adapter_dir(out) and json.loads((out / "merge.json").read_text())["output"] == "adapter"
    assert read_chain(out).parents == ((s1 / "adapter").resolve(),)  # stacked on step 1: θ_1 + q·Δ_2
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == LORA["r"] and config["lora_alpha"] == LORA["r"]  # same rank; q·α/r moved into B
    moved = max((dense(s2)[k] - dense(s1)[k]).abs().max().item() for k in dense(s1))
    assert moved > 1e-3  # step 2 changed the weights: the comparisons below can fail
    want = linear_merge(dense(s1), dense(s2), q)
    assert_state_close(weights(out), want)
    dense_out = merge_dirs(s1 / "adapter", s2 / "adapter", q, tmp_path / "d", output="dense")
    assert not is_adapter_dir(dense_out)
    assert_state_close(load_file(dense_out / "model.safetensors"), want)
    # the ends are the two models themselves
    end = dense(s1) if q == 0 else dense(s2) if q == 1 else None
    if end is not None:
        assert_state_close(weights(out), end)
    size = (out / "adapter_model.safetensors").stat().st_size
    assert size < 0.25 * (dense_out / "model.safetensors").stat().st_size


def test_naive_adapter_merge_concatenates_ranks_and_equals_the_dense_merge(stages, tmp_path):
    s1, naive = stages["helpful"], stages["naive"]
    out = merge_dirs(s1 / "adapter", naive / "adapter", 0.5, tmp_path / "m")
    chain = read_chain(out)
    assert chain.parents == () and chain.base == stages["sft"].resolve()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2 * LORA["r"]
    assert_state_close(weights(out), linear_merge(dense(s1), dense(naive), 0.5))


def test_a_full_model_and_an_adapter_on_it_merge_into_a_scaled_adapter(stages, tmp_path):
    """a = the SFT model itself (its tokenizer file differs from the re-saved one only by the pad token)."""
    sft, s1 = stages["sft"], stages["helpful"]
    out = merge_dirs(sft, s1 / "adapter", 0.25, tmp_path / "m")
    assert is_adapter_dir(out) and read_chain(out).base == sft.resolve()
    assert_state_close(weights(out), linear_merge(load_file(sft / "model.safetensors"), dense(s1), 0.25))


def test_adapter_output_is_refused_where_it_cannot_be_exact(stages, tmp_path):
    s1, s2 = stages["helpful"], stages["safe"]
    with pytest.raises(MergeError, match="not adapters on the same base"):
        merge_dirs(s1 / "model", s2 / "model", 0.5, tmp_path / "x", output="adapter")
    with pytest.raises(MergeError, match="same model"):
        merge_dirs(s1 / "adapter", s1 / "adapter", 0.5, tmp_path / "x", output="adapter")
    # a full step-1 model and the stacked step-2 adapter: different bases, so auto gives a full model
    out = merge_dirs(s1 / "model", s2 / "adapter", 0.5, tmp_path / "d")
    assert not is_adapter_dir(out)
    assert_state_close(load_file(out / "model.safetensors"), linear_merge(dense(s1), dense(s2), 0.5))


def test_an_adapter_merge_is_not_rewritten_when_current(stages, tmp_path):
    s1, s2 = stages["helpful"], stages["safe"]
    out = merge_dirs(s1 / "adapter", s2 / "adapter", 0.5, tmp_path / "m")
    before = (out / "adapter_model.safetensors").stat().st_mtime_ns
    merge_dirs(s1 / "adapter", s2 / "adapter", 0.5, tmp_path / "m")
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == before
    again = merge_dirs(s1 / "adapter", s2 / "adapter", 0.5, tmp_path / "m2")
    assert (again / "adapter_model.safetensors").read_bytes() == (
        out / "adapter_model.safetensors"
    ).read_bytes()


def test_non_plain_lora_is_refused(stages, tmp_path):
    import shutil

    bad = tmp_path / "dora"
    shutil.copytree(stages["naive"] / "adapter", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(MergeError, match=r"only plain LoRA.*use_dora"):
        merge_dirs(stages["helpful"] / "adapter", bad, 0.5, tmp_path / "x")
