"""The training loop on a tiny GPT-2: it learns, logs, saves HF models, and reuses the reference cache."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sacpo.config import from_dict
from sacpo.train.batches import batch_order, split_indices
from sacpo.train.config import TrainConfig
from sacpo.train.loop import is_done, train

FAST = {
    "max_steps": 12,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_ratio": 0.0,
    "max_length": 80,
    "max_prompt_length": 40,
    "log_every": 4,
    "kl_prompts": 2,
    "kl_samples": 2,
    "kl_max_new_tokens": 8,
    "eval_fraction": 0.2,
}


def make_cfg(model, data, out, fmt="pku_helpful", **kw) -> TrainConfig:
    fields = {
        **FAST,
        "policy": str(model),
        "output_dir": str(out),
        "data": {"source": str(data), "format": fmt},
    }
    fields.update(kw)
    return from_dict(TrainConfig, fields)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_stage_learns_and_writes_artifacts(tiny_model, pku_tiny, tmp_path):
    out = tmp_path / "dpo"
    result = train(make_cfg(tiny_model, pku_tiny, out), show_progress=False)
    assert result.steps == 12 and result.reference_pass == "computed" and is_done(out)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [4, 8, 12]
    for key in (
        "loss",
        "rewards/accuracy",
        "rewards/margin",
        "rewards/chosen",
        "rewards/rejected",
        "grad_norm",
        "lr",
        "eval/loss",
        "eval/kl",
        "eval/kl_stderr",
    ):
        assert key in records[-1], key
    assert records[-1]["loss"] < records[0]["loss"] < 0.70  # started at log 2 = 0.693 and went down
    assert records[-1]["rewards/margin"] > 0
    assert (out / "config.yaml").read_text().startswith("policy:")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    before, after = (
        load_file(tiny_model / "model.safetensors"),
        load_file(out / "model" / "model.safetensors"),
    )
    assert not torch.equal(
        before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"]
    )


def test_reference_cache_is_reused_without_loading_the_reference(tiny_model, pku_tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    train(
        make_cfg(tiny_model, pku_tiny, tmp_path / "a", cache_dir=str(cache), max_steps=2), show_progress=False
    )

    def boom(*a, **k):
        raise AssertionError("the reference model must not be loaded when its log-probs are cached")

    import sacpo.train.policy as policy

    loads = []

    def counting_load(*a, **k):
        loads.append(a[0])
        return real_load(*a, **k)

    real_load = policy.load_model
    monkeypatch.setattr("sacpo.train.ref_cache.load_model", boom)
    monkeypatch.setattr(
        "sacpo.train.policy.load_model", counting_load
    )  # KL eval would load it: disabled below
    r = train(
        make_cfg(
            tiny_model, pku_tiny, tmp_path / "b", cache_dir=str(cache), max_steps=2, beta=0.5, kl_prompts=0
        ),
        show_progress=False,
    )
    assert r.reference_pass == "cached"
    assert len(loads) == 1, loads  # the policy only
    monkeypatch.undo()
    # a different max_length changes the key: computed again
    r = train(
        make_cfg(tiny_model, pku_tiny, tmp_path / "c", cache_dir=str(cache), max_steps=2, max_length=60),
        show_progress=False,
    )
    assert r.reference_pass == "computed"
    assert len(list(cache.glob("ref-*.safetensors"))) == 2


@pytest.mark.parametrize("loss, fmt", [("ipo", "pku_safe"), ("kto", "pku_safe_kto")])
def test_ipo_and_kto_stages_run(tiny_model, pku_tiny, tmp_path, loss, fmt):
    out = tmp_path / loss
    train(
        make_cfg(tiny_model, pku_tiny, out, fmt=fmt, loss=loss, max_steps=4, log_every=2), show_progress=False
    )
    last = read_metrics(out)[-1]
    assert torch.isfinite(torch.tensor(last["loss"]))
    # average_logprobs auto: IPO length-averages (as TRL's IPO), KTO sums; the resolved value is in summary.json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["average_logprobs"] is (loss == "ipo")
    if loss == "ipo":  # per-token log-probs of a byte-level model: a few nats, not a sequence's tens of nats
        assert -10 < last["logps/chosen"] < 0
    if loss == "kto":
        assert last["kto/z_ref"] >= 0 and "rewards/desirable" in last


def test_loss_and_data_kind_must_match(tiny_model, pku_tiny, tmp_path):
    from sacpo.config import ConfigError

    with pytest.raises(ConfigError, match=r"kto.*unpaired.*pku_helpful"):
        train(make_cfg(tiny_model, pku_tiny, tmp_path / "x", loss="kto"), show_progress=False)


def test_lora_with_gradient_checkpointing_saves_dense_model_and_adapter(tiny_model, pku_tiny, tmp_path):
    out = tmp_path / "lora"
    cfg = make_cfg(
        tiny_model,
        pku_tiny,
        out,
        max_steps=3,
        log_every=3,
        gradient_checkpointing=True,
        lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn"], "save": "both"},
    )
    train(cfg, show_progress=False)
    assert (out / "adapter" / "adapter_config.json").is_file()
    dense = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in k for k in dense)
    base = load_file(tiny_model / "model.safetensors")
    assert set(dense) == set(base)
    assert torch.equal(dense["transformer.h.0.mlp.c_fc.weight"], base["transformer.h.0.mlp.c_fc.weight"])
    assert not torch.equal(
        dense["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"]
    )


def test_grad_accum_matches_bigger_batch(tiny_model, pku_tiny, tmp_path):
    """4 micro-batches of 2 are the same 8 examples as one batch of 8 (consecutive slices of the same seeded
    permutation) and the loss is divided by grad_accum, so the updates — and the weights after 3 steps — agree
    to float tolerance; a control with another seed does not."""
    runs = {}
    for name, kw in {"accum": {"batch_size": 2, "grad_accum": 4}, "big": {"batch_size": 8, "grad_accum": 1},
                     "other-seed": {"batch_size": 8, "grad_accum": 1, "seed": 1}}.items():  # fmt: skip
        out = tmp_path / name
        r = train(
            make_cfg(tiny_model, pku_tiny, out, max_steps=3, log_every=1, kl_prompts=0, **kw),
            show_progress=False,
        )
        assert r.steps == 3 and [m["step"] for m in read_metrics(out)] == [1, 2, 3]
        runs[name] = load_file(out / "model" / "model.safetensors")
    start = load_file(tiny_model / "model.safetensors")
    for k in runs["big"]:
        # float reassociation, amplified by Adam where a gradient is ~0: ≤ 3e-5 here; another seed: ≥ 7e-3
        torch.testing.assert_close(runs["accum"][k], runs["big"][k], atol=1e-4, rtol=0, msg=k)
    moved = max((runs["big"][k] - start[k]).abs().max().item() for k in start)
    differ = max((runs["other-seed"][k] - runs["big"][k]).abs().max().item() for k in start)
    assert moved > 1e-3 and differ > 1e-3


def test_resume_continues_to_the_same_weights(tiny_model, pku_tiny, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(make_cfg(tiny_model, pku_tiny, full, max_steps=6, kl_prompts=0), show_progress=False)
    out = tmp_path / "crash"
    cfg = make_cfg(tiny_model, pku_tiny, out, max_steps=6, save_every=3, kl_prompts=0)
    calls = {"n": 0}
    import sacpo.train.step as step

    real = step.BatchLoss.__call__

    def crash_after_4_steps(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt("simulated crash")
        return real(self, *a, **k)

    monkeypatch.setattr(step.BatchLoss, "__call__", crash_after_4_steps)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, show_progress=False)
    assert not is_done(out) and (out / "checkpoints" / "step-3").is_dir()
    monkeypatch.undo()
    train(cfg, resume=True, show_progress=False)
    a, b = load_file(full / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_batch_order_and_split_are_deterministic():
    assert batch_order(10, 4, seed=1, epoch=0) == batch_order(10, 4, seed=1, epoch=0)
    assert batch_order(10, 4, seed=1, epoch=0) != batch_order(10, 4, seed=1, epoch=1)
    assert all(len(b) == 4 for b in batch_order(10, 4, 0, 0)) and len(batch_order(10, 4, 0, 0)) == 2
    tr, ev = split_indices(20, 0.25, seed=3)
    assert len(ev) == 5 and sorted(tr + ev) == list(range(20)) and split_indices(20, 0.25, 3) == (tr, ev)


def test_shared_prompt_rows_train_like_two_padded_rows(tiny_model, pku_tiny, tmp_path, monkeypatch):
    import sacpo.train.step as step

    calls = []
    real = step.packed_pair_logps
    monkeypatch.setattr(step, "packed_pair_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for share in (True, False):
        out = tmp_path / f"share-{share}"
        cfg = make_cfg(tiny_model, pku_tiny, out, max_steps=3, log_every=1, kl_prompts=0, share_prompt=share)
        result = train(cfg, show_progress=False)
        assert result.shared_prompt_rows is share  # reported to the caller (and in summary.json)
        runs[share] = (read_metrics(out), load_file(out / "model" / "model.safetensors"), len(calls))
    (m_on, w_on, n_on), (m_off, w_off, n_off) = runs[True], runs[False]
    assert n_on >= 3 and n_off == n_on  # every step of the first run packed, none of the second
    for a, b in zip(m_on, m_off, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["logps/chosen"] == pytest.approx(b["logps/chosen"], rel=1e-4)
    for k in w_on:
        # rounding-level gradient differences, amplified where AdamW divides a near-zero gradient by its own size
        torch.testing.assert_close(w_on[k], w_off[k], rtol=1e-3, atol=2e-4, msg=k)


def test_kl_budget_stops_the_stage_early_and_says_so(tiny_model, pku_tiny, tmp_path, caplog):
    """Without a budget the run goes to max_steps and writes a record at every KL step (kl_every=3) besides the
    log steps (log_every=4). With a budget below one of those estimates the same trajectory (the KL estimate is
    seeded by step) stops at the first KL step whose estimate exceeds it: last record, summary.json and the
    saved model all at that step."""
    kw = {"max_steps": 12, "log_every": 4, "kl_every": 3, "kl_prompts": 4, "kl_samples": 2, "lr": 1e-2}
    free = tmp_path / "free"
    r = train(make_cfg(tiny_model, pku_tiny, free, **kw), show_progress=False)
    records = read_metrics(free)
    assert r.steps == 12 and r.stopped_early is None
    assert [x["step"] for x in records] == [3, 4, 6, 8, 9, 12]
    assert json.loads((free / "summary.json").read_text())["stopped_early"] is None
    kl = {x["step"]: x["eval/kl"] for x in records if x["step"] in (3, 6, 9)}
    assert max(kl.values()) > 0, kl  # lr 1e-2 moves the policy away from the reference within 9 steps
    # between the first estimate and the largest: step 3 stays within the budget and a later KL step exceeds it
    # (here KL ≈ 0.34, 0.45, 0.28 at steps 3, 6, 9: budget ≈ 0.39, stop at 6)
    top = max(kl.values())
    budget = (kl[3] + top) / 2 if top > kl[3] else kl[3] / 2
    stop = min(s for s, v in kl.items() if v > budget)

    out = tmp_path / "budget"
    with caplog.at_level("INFO", logger="sacpo.train"):
        r = train(make_cfg(tiny_model, pku_tiny, out, kl_budget=budget, **kw), show_progress=False)
    records = read_metrics(out)
    assert r.steps == stop and records[-1]["step"] == stop and is_done(out)
    assert all(x["eval/kl"] <= budget for x in records[:-1] if "eval/kl" in x)
    assert records[-1]["eval/kl"] == pytest.approx(kl[stop], rel=1e-4, abs=1e-4)  # same trajectory until then
    expected = {"step": stop, "kl": pytest.approx(kl[stop], rel=1e-4, abs=1e-4), "budget": budget}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] == expected and r.stopped_early == expected and summary["steps"] == stop
    assert f"exceeds kl_budget={budget:g}: stopping the stage early" in caplog.text
    assert (out / "model" / "model.safetensors").is_file()


def test_train_leaves_the_callers_global_rng_state_alone(tiny_model, pku_tiny, tmp_path):
    """train() seeds python, numpy and torch inside (same numbers as before) and restores the caller's states."""
    import random

    import numpy as np

    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    cfg = make_cfg(tiny_model, pku_tiny, tmp_path / "a", max_steps=2, kl_prompts=1, kl_max_new_tokens=4)
    train(cfg, show_progress=False)
    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.random.get_rng_state(), states[2])
    # and the run itself does not depend on the caller's state
    torch.manual_seed(7)
    cfg = make_cfg(tiny_model, pku_tiny, tmp_path / "b", max_steps=2, kl_prompts=1, kl_max_new_tokens=4)
    train(cfg, show_progress=False)
    drop = ("step",)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]


def _tiny_llama(out):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sacpo.models.tiny import build_byte_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=257, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, bos_token_id=256, eos_token_id=256, pad_token_id=256,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(out)
    build_byte_tokenizer().save_pretrained(out)
    return out


def test_the_fused_swiglu_patch_is_undone_and_the_probe_is_not_kept_on_the_model(
    pku_tiny, tmp_path, monkeypatch
):
    """fuse_swiglu patches the policy's MLPs while it trains; the patch is off when train() returns (a sweep
    workspace keeps the model), the shared-prompt probe lives in the trainer, and the log-prob path is reported."""
    import sacpo.train.loop as loop
    from sacpo.models.swiglu import fuse_swiglu
    from sacpo.train.workspace import SweepWorkspace

    patched = []

    def counting(model):
        patch = fuse_swiglu(model)
        patched.append(len(patch))
        return patch

    monkeypatch.setattr(loop, "fuse_swiglu", counting)
    model_dir = _tiny_llama(tmp_path / "llama")
    ws = SweepWorkspace()
    out = tmp_path / "run"
    result = train(
        make_cfg(model_dir, pku_tiny, out, max_steps=2, kl_prompts=0), show_progress=False, workspace=ws
    )
    assert patched == [2]  # both MLPs were fused for training
    mlps = [m for m in ws._model.modules() if hasattr(m, "gate_proj")]
    assert len(mlps) == 2 and not any("forward" in m.__dict__ for m in mlps)
    assert "_sacpo_packed_pairs" not in ws._model.__dict__
    summary = json.loads((out / "summary.json").read_text())
    # the probe ran (it is not kept on the model, above); on this 2-layer Llama the rows' attention outweighs the
    # prompt tokens saved, so row_cost chose two padded rows per pair for both batches
    assert summary["shared_prompt_batches"] == [0, 2]
    assert summary["shared_prompt_rows"] is result.shared_prompt_rows is False
    assert summary["fused_head"] is result.fused_head is False
    assert (
        summary["fused_head_reason"] == result.fused_head_reason and "vocabulary" in result.fused_head_reason
    )


def test_rpo_alpha_adds_the_chosen_nll(tiny_model, pku_tiny, tmp_path):
    """Step 1 (policy = reference): DPO's loss is log 2, so the logged loss is log 2 + α·nll; α > 0 raises the
    chosen responses' log-probs more than plain DPO does over the same steps."""
    import math

    runs = {}
    for alpha in (0.0, 2.0):
        out = tmp_path / f"rpo-{alpha}"
        cfg = make_cfg(
            tiny_model, pku_tiny, out, max_steps=6, log_every=1, kl_prompts=0, lr=5e-3, rpo_alpha=alpha
        )
        train(cfg, show_progress=False)
        runs[alpha] = read_metrics(out)
    first = runs[2.0][0]
    assert first["loss"] == pytest.approx(math.log(2) + 2.0 * first["rpo/nll"], abs=1e-4)
    assert first["rpo/nll"] > 0 and "rpo/nll" not in runs[0.0][0]
    assert runs[0.0][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert runs[2.0][-1]["logps/chosen"] > runs[0.0][-1]["logps/chosen"]


def test_rpo_alpha_needs_a_paired_loss(tiny_model, pku_tiny, tmp_path):
    from sacpo.config import ConfigError

    with pytest.raises(ConfigError, match=r"rpo_alpha=1\.0 needs a paired loss"):
        make_cfg(tiny_model, pku_tiny, tmp_path / "k", fmt="pku_safe_kto", loss="kto", rpo_alpha=1.0)
