"""The sweep workspace: the branches of a λ sweep reuse one built policy and its AdamW buffers, and train exactly
the weights that a fresh build per branch trains."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sacpo.train.loop as loop
import sacpo.train.step as step
from sacpo.config import from_dict, to_dict
from sacpo.recipes.pipeline import PipelineConfig, run_pipeline
from sacpo.train.config import TrainConfig
from sacpo.train.policy import build_policy
from sacpo.train.workspace import SweepWorkspace, policy_key

DEFAULTS = {
    "max_steps": 3,
    "batch_size": 4,
    "lr": 2e-3,
    "max_length": 64,
    "max_prompt_length": 32,
    "log_every": 3,
    "kl_prompts": 2,
    "kl_max_new_tokens": 4,
}


def sweep_cfg(model: Path, data: Path, out: Path, reuse: bool, **defaults) -> PipelineConfig:
    return from_dict(
        PipelineConfig,
        {
            "policy": str(model),
            "output_dir": str(out),
            "defaults": {**DEFAULTS, **defaults},
            "stages": [
                {"name": "helpful", "data": {"source": str(data), "format": "pku_helpful"}, "beta": 0.1},
                {"name": "safe", "data": {"source": str(data), "format": "pku_safe"}, "lam": [0.5, 1.0, 2.0]},
            ],
            "reuse_policy": reuse,
        },
    )


def _weights(run: Path, name: str, sub: str = "model") -> dict[str, torch.Tensor]:
    files = sorted((run / "stages" / name / sub).glob("*.safetensors"))
    assert files, f"no weights in {run / 'stages' / name / sub}"
    return {k: v for f in files for k, v in load_file(f).items()}


def _count_builds(monkeypatch) -> list[str]:
    built: list[str] = []
    original = build_policy

    def counting(cfg):
        built.append(cfg.policy)
        return original(cfg)

    monkeypatch.setattr(loop, "build_policy", counting)
    return built


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sweep_reusing_one_policy_trains_the_same_weights_as_fresh_builds(
    tiny_model, pku_tiny, tmp_path, monkeypatch, lora
):
    lora_fields = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn"], "save": "both"}
    extra = {"lora": lora_fields} if lora else {}
    built = _count_builds(monkeypatch)
    fresh = run_pipeline(
        sweep_cfg(tiny_model, pku_tiny, tmp_path / "fresh", False, **extra), show_progress=False
    )
    assert len(built) == 4  # helpful + 3 branches
    built.clear()
    reused = run_pipeline(
        sweep_cfg(tiny_model, pku_tiny, tmp_path / "reuse", True, **extra), show_progress=False
    )
    assert len(built) == 2  # helpful, then one build for the 3 branches of the sweep

    for name in ("safe-lam0.5", "safe-lam1", "safe-lam2"):
        a, b = _weights(tmp_path / "fresh", name), _weights(tmp_path / "reuse", name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
        if lora:
            a, b = (
                _weights(tmp_path / "fresh", name, "adapter"),
                _weights(tmp_path / "reuse", name, "adapter"),
            )
            assert all(torch.equal(a[k], b[k]) for k in a)
    # the branches did train, and differently (β/λ differ): reuse did not hand one branch's result to the next
    lam05, lam2 = _weights(tmp_path / "reuse", "safe-lam0.5"), _weights(tmp_path / "reuse", "safe-lam2")
    parent = _weights(tmp_path / "reuse", "helpful")
    assert any(not torch.equal(lam05[k], parent[k]) for k in parent)
    assert any(not torch.equal(lam05[k], lam2[k]) for k in lam05)
    for f, r in zip(fresh["stages"], reused["stages"], strict=True):
        assert f["summary"]["final"] == r["summary"]["final"]  # losses, rewards, held-out metrics, KL


def _train_cfg(model: Path, data: Path, out: Path) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            **DEFAULTS,
            "kl_prompts": 0,
            "policy": str(model),
            "output_dir": str(out),
            "data": {"source": str(data), "format": "pku_safe"},
        },
    )


def test_workspace_restores_the_parent_and_zeroes_adam_state(tiny_model, pku_tiny, tmp_path, monkeypatch):
    built = _count_builds(monkeypatch)
    ws = SweepWorkspace()
    loop.train(_train_cfg(tiny_model, pku_tiny, tmp_path / "a"), show_progress=False, workspace=ws)
    model = ws._model
    assert (
        model.config.use_cache is False
    )  # the final save sets use_cache for inference on the saved copy only
    moments = next(iter(ws._moments.values()))
    assert moments["exp_avg"].abs().sum() > 0 and float(moments["step"]) == 3

    # what the next branch gets, before it trains: the parent's weights and a zeroed AdamW state
    cfg = _train_cfg(tiny_model, pku_tiny, tmp_path / "b")
    # full fine-tuning of a dense parent: no copy of the weights is kept, they are read back from its files
    assert ws._initial == {} and ws._source is not None
    restored = ws.policy(cfg, build_policy)
    assert restored is model and len(built) == 1 and ws.reuses == 1
    parent = build_policy(cfg)
    for (n, p), (_, q) in zip(restored.named_parameters(), parent.named_parameters(), strict=True):
        assert torch.equal(p, q), n
        assert p.grad is None
    params = [p for p in restored.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=cfg.fused_adamw)
    ws.reuse_moments(optimizer)
    state = optimizer.state[params[0]]
    assert state is moments and float(state["step"]) == 0 and not state["exp_avg"].any()
    assert not state["exp_avg_sq"].any()


def test_a_kept_copy_is_dropped_after_the_last_branch_restores_it(
    tiny_model, pku_tiny, tmp_path, monkeypatch
):
    """LoRA: the adapters are not in the parent's files, so a CPU copy is kept, and dropped by the branch announced
    as the last (a later call on the same parent builds afresh)."""
    built = _count_builds(monkeypatch)
    lora = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn"]}

    def cfg(name):
        return from_dict(
            TrainConfig, {**to_dict(_train_cfg(tiny_model, pku_tiny, tmp_path / name)), "lora": lora}
        )

    ws = SweepWorkspace()
    loop.train(cfg("a"), show_progress=False, workspace=ws)
    assert ws._source is None and ws._initial and len(built) == 1
    initial = {n: t.clone() for n, t in ws._initial.items()}
    ws.last_branch = True
    restored = ws.policy(cfg("b"), build_policy)
    assert ws._initial == {} and len(built) == 1 and ws.reuses == 1
    trainable = {n: p for n, p in restored.named_parameters() if p.requires_grad}
    assert all(torch.equal(trainable[n], t) for n, t in initial.items())
    ws.last_branch = False
    ws.policy(cfg("c"), loop.build_policy)  # nothing to restore from any more: built again (counted)
    assert len(built) == 2 and ws._initial


def test_workspace_releases_the_policy_for_another_parent(tiny_model, pku_tiny, tmp_path):
    from sacpo.models.tiny import build_tiny_gpt2

    other = build_tiny_gpt2(tmp_path / "other", seed=1)
    ws = SweepWorkspace()
    loop.train(_train_cfg(tiny_model, pku_tiny, tmp_path / "a"), show_progress=False, workspace=ws)
    first = ws._model
    assert ws.holds_policy and policy_key(_train_cfg(tiny_model, pku_tiny, tmp_path)) == ws._key
    ws.release_unless(_train_cfg(other, pku_tiny, tmp_path / "b"))
    assert not ws.holds_policy and ws._initial == {} and ws._moments == {}
    loop.train(_train_cfg(other, pku_tiny, tmp_path / "b"), show_progress=False, workspace=ws)
    assert ws._model is not first and ws.reuses == 0
    # a changed LoRA setting is another policy too
    lora = from_dict(
        TrainConfig, {**to_dict(_train_cfg(other, pku_tiny, tmp_path)), "lora": {"enabled": True}}
    )
    assert policy_key(lora) != ws._key


def test_resume_does_not_use_the_workspace(tiny_model, pku_tiny, tmp_path, monkeypatch):
    ws = SweepWorkspace()
    loop.train(_train_cfg(tiny_model, pku_tiny, tmp_path / "a"), show_progress=False, workspace=ws)
    assert ws.holds_policy
    cfg = _train_cfg(tiny_model, pku_tiny, tmp_path / "b")
    cfg = from_dict(TrainConfig, {**to_dict(cfg), "save_every": 1})
    real, calls = step.BatchLoss.__call__, []

    def crash_at_step_3(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(self, *a, **k)

    monkeypatch.setattr(step.BatchLoss, "__call__", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, show_progress=False)
    monkeypatch.undo()
    result = loop.train(cfg, resume=True, show_progress=False, workspace=ws)
    assert result.steps == 3
    assert (
        not ws.holds_policy
    )  # released: a resumed run restores its own policy and optimizer from the checkpoint


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reference_pass_with_the_built_policy_equals_loading_the_reference(
    tiny_model, pku_tiny, tmp_path, monkeypatch, lora
):
    """train() builds the policy first and runs the reference pass with it when the reference is the policy: the
    log-probs are bitwise those of a separately loaded reference (LoRA: B = 0 adds exact zeros)."""
    from collections import Counter

    import sacpo.train.ref_cache as ref_cache
    from sacpo.data.loaders import load_examples
    from sacpo.data.tokenize import encode_paired
    from sacpo.models.load import load_tokenizer

    cfg = _train_cfg(tiny_model, pku_tiny, tmp_path)
    if lora:
        cfg = from_dict(
            TrainConfig, {**to_dict(cfg), "lora": {"enabled": True, "r": 4, "target_modules": ["c_attn"]}}
        )
    tok = load_tokenizer(tiny_model)
    pairs = encode_paired(tok, load_examples(str(pku_tiny), "pku_safe", None, 16, False), 64, 32, Counter())
    loaded = ref_cache.reference_logps(tiny_model, tok, pairs, tmp_path / "c1", 64, show_progress=False)
    policy = build_policy(cfg)
    policy.train()
    monkeypatch.setattr(ref_cache, "load_model", lambda *a, **k: pytest.fail("the given model must be used"))
    shared = ref_cache.reference_logps(
        tiny_model, tok, pairs, tmp_path / "c2", 64, show_progress=False, model=policy
    )
    assert shared.computed and torch.equal(shared.logps, loaded.logps)
    assert policy.training  # handed back in the mode it came in
