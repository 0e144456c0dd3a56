"""Reward / cost models with LoRA on the backbone: they learn, the head is trained in full, the adapter-only output
loads (scorer) to the scores of the merged output, and a LoRA policy's adapter serves as a backbone."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sacpo.config import from_dict
from sacpo.models.adapters import is_adapter_dir, read_chain
from sacpo.models.load import ModelLoadError, load_model
from sacpo.models.reward import load_reward_model
from sacpo.scoring.reward_model import RewardModelScorer
from sacpo.train.reward_model import RewardConfig, train_reward_model

FAST = {
    "max_steps": 24,
    "batch_size": 8,
    "lr": 1e-2,
    "warmup_ratio": 0.0,
    "max_length": 80,
    "max_prompt_length": 40,
    "eval_fraction": 0.25,
    "log_every": 8,
}
LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]}
PROMPTS = ["How do I bake bread?"] * 3
RESPONSES = [
    "Sure: first bake bread, then check it twice.",
    "Sorry, I cannot help with that.",
    "Just bake bread.",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """One intra-op thread (tests/conftest.py)."""


def make_cfg(model, data, out, save="adapter", **kw) -> RewardConfig:
    fields = {
        **FAST,
        "model": str(model),
        "output_dir": str(out),
        "data": {"source": str(data), "format": "pku_helpful"},
        "lora": {**LORA, "save": save},
    }
    return from_dict(RewardConfig, {**fields, **kw})


@pytest.fixture(scope="module")
def runs(tiny_model, pku_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("rm-lora")
    adapter = train_reward_model(make_cfg(tiny_model, pku_tiny, root / "adapter"), show_progress=False)
    both = train_reward_model(make_cfg(tiny_model, pku_tiny, root / "both", save="both"), show_progress=False)
    return {"adapter": adapter, "both": both, "root": root}


def test_lora_reward_model_learns_with_a_trained_head(runs, tiny_model):
    m = runs["adapter"].metrics
    assert m["train_accuracy"] >= 0.9 and m["heldout_accuracy"] >= 0.75  # chance is 0.5
    assert runs["both"].metrics == {
        **m,
        "seconds": runs["both"].metrics["seconds"],
    }  # same training either way
    dense = load_file(runs["both"].output_dir / "model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    assert not torch.equal(
        dense["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"]
    )
    assert torch.equal(
        dense["transformer.h.0.attn.c_proj.weight"], base["transformer.h.0.attn.c_proj.weight"]
    )
    assert "score.weight" in dense


def test_adapter_only_reward_model_scores_like_the_merged_one(runs, tiny_model):
    out = runs["adapter"].output_dir
    assert is_adapter_dir(out) and read_chain(out).base == tiny_model.resolve()
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["model_format"] == "adapter" and meta["kind"] == "reward"
    assert "base_model.model.score.weight" in load_file(
        out / "adapter_model.safetensors"
    )  # the head, in full
    size = sum(f.stat().st_size for f in out.glob("adapter_model.safetensors"))
    assert size < 0.2 * (runs["both"].output_dir / "model.safetensors").stat().st_size
    scores = RewardModelScorer(out, device="cpu")(PROMPTS, RESPONSES)
    merged = RewardModelScorer(runs["both"].output_dir, device="cpu")(PROMPTS, RESPONSES)
    adapter_dir = RewardModelScorer(runs["both"].output_dir / "adapter", device="cpu", max_length=80,
                                    max_prompt_length=40)(PROMPTS, RESPONSES)  # fmt: skip
    torch.testing.assert_close(scores, merged, rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter_dir, merged, rtol=0, atol=1e-5)
    assert scores[0] > scores[1]  # compliant beats refusal
    torch.manual_seed(0)
    load_reward_model(out)  # the random head it overwrites does not move the caller's RNG
    drawn = torch.rand(2)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(2))


def test_a_reward_adapter_is_no_policy_and_a_policy_adapter_no_reward_model(
    runs, tiny_model, pku_tiny, tmp_path
):
    with pytest.raises(ModelLoadError, match="not a causal-LM policy"):
        load_model(runs["adapter"].output_dir)


def test_a_lora_policy_adapter_is_a_backbone(tiny_model, pku_tiny, tmp_path):
    """The reward model of a LoRA policy starts from base ⊕ policy adapter; its own adapter stacks on it."""
    from sacpo.train.config import TrainConfig
    from sacpo.train.loop import train

    fields = {**{k: v for k, v in FAST.items() if k != "eval_fraction"}, "max_steps": 3, "kl_prompts": 0}
    policy = train(
        from_dict(
            TrainConfig,
            {
                **fields,
                "policy": str(tiny_model),
                "output_dir": str(tmp_path / "policy"),
                "data": {"source": str(pku_tiny)},
                "lora": LORA,
            },
        ),
        show_progress=False,
    ).model_dir
    with pytest.raises(ModelLoadError, match="SEQ_CLS last"):
        load_reward_model(policy)
    rm = train_reward_model(make_cfg(policy, pku_tiny, tmp_path / "rm", max_steps=4), show_progress=False)
    chain = read_chain(rm.output_dir)
    assert chain.base == tiny_model.resolve() and chain.parents == (policy,)
    got = RewardModelScorer(rm.output_dir, device="cpu")(PROMPTS, RESPONSES)
    both = train_reward_model(make_cfg(policy, pku_tiny, tmp_path / "rm-both", save="merged", max_steps=4),
                              show_progress=False)  # fmt: skip
    torch.testing.assert_close(got, RewardModelScorer(both.output_dir, device="cpu")(PROMPTS, RESPONSES),
                               rtol=0, atol=1e-5)  # fmt: skip
