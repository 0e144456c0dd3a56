"""Numerical faults: a NaN/inf loss, gradient or weight stops the stage with NonFiniteError naming the step, no
checkpoint with bad weights is ever written, the last good one stays (and resumes), and nothing looks finished."""

import math

import pytest
import torch
from reliability_helpers import (
    assert_user_error,
    copy_model,
    looks_finished,
    make_cfg,
    run_cli,
    stage_fields,
    weights,
    write_yaml,
)

import sacpo.train.loop as loop
import sacpo.train.step as step
from sacpo.train import checkpoint
from sacpo.train.checkpoint import NonFiniteError
from sacpo.train.loop import is_done, train

FAULT_STEP = 4  # 1-based optimizer step at which the fault is injected
KW = {"max_steps": 8, "save_every": 2, "log_every": 2, "batch_size": 4, "grad_accum": 2}


def _inject(monkeypatch, fault: str) -> None:
    """Poison the FAULT_STEP-th optimizer step (its second micro-batch when grad_accum=2)."""
    real = step.BatchLoss.__call__
    state = {"calls": 0, "hook": None}

    def faulty(self, model, idx, global_idx):
        if not model.training:  # held-out evaluation: leave alone
            return real(self, model, idx, global_idx)
        state["calls"] += 1
        loss, metrics = real(self, model, idx, global_idx)
        if state["calls"] == 2 * FAULT_STEP - (1 if fault == "nan loss in first micro-batch" else 0):
            if fault.startswith("nan loss"):
                loss = loss * float("nan")
            elif fault == "inf loss":
                loss = loss + float("inf")
            else:  # a finite loss whose gradient is NaN
                p = next(p for p in model.parameters() if p.requires_grad)
                state["hook"] = p.register_hook(lambda g: torch.full_like(g, float("nan")))
        elif state["hook"] is not None:
            state["hook"].remove()
            state["hook"] = None
        return loss, metrics

    monkeypatch.setattr(step.BatchLoss, "__call__", faulty)


FAULTS = {
    "nan loss": ({}, "loss is nan"),
    "nan loss in first micro-batch": ({}, "loss is"),
    "inf loss": ({}, "loss is"),
    "nan gradient": ({}, "gradient norm is nan"),
    "nan gradient, clipping off": ({"max_grad_norm": 0.0}, "gradient norm is nan"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_non_finite_step_stops_keeps_last_good_checkpoint_and_resumes(
    tiny_model, pku_tiny, tmp_path, monkeypatch, fault
):
    extra, message = FAULTS[fault]
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model, pku_tiny, out, **KW, **extra)
    _inject(monkeypatch, fault)
    with pytest.raises(
        NonFiniteError, match=rf"{message}.* at step {FAULT_STEP};.*last good checkpoint.*step-2"
    ):
        train(cfg, show_progress=False)
    assert not is_done(out) and not looks_finished(out)
    assert checkpoint.latest_checkpoint(out).name == "step-2"  # the step-4 checkpoint was never written
    good = weights(out / "checkpoints" / "step-2")
    assert all(torch.isfinite(t).all() for t in good.values())
    monkeypatch.undo()  # the fault is gone: resuming from the last good checkpoint finishes the stage
    train(cfg, resume=True, show_progress=False)
    assert is_done(out)
    assert all(torch.isfinite(t).all() for t in weights(out / "model").values())


def test_non_finite_weights_are_never_checkpointed(tiny_model, pku_tiny, tmp_path, monkeypatch):
    """Finite loss and gradients, but the update overflows a weight to inf at step 4 (a save step)."""
    out = tmp_path / "run"
    real_step = torch.optim.AdamW.step
    steps = {"n": 0}

    def overflowing_step(self, *a, **k):
        result = real_step(self, *a, **k)
        steps["n"] += 1
        if steps["n"] == FAULT_STEP:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.inf
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    with pytest.raises(NonFiniteError, match=rf"weights are non-finite after step {FAULT_STEP}.*step-2"):
        train(make_cfg(tiny_model, pku_tiny, out, **KW), show_progress=False)
    assert checkpoint.latest_checkpoint(out).name == "step-2" and not looks_finished(out)


def test_huge_learning_rate_stops_with_a_clear_message(tiny_model, pku_tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step \d+.*Lower lr"):
        train(make_cfg(tiny_model, pku_tiny, out, **{**KW, "lr": 1e30, "save_every": 1}), show_progress=False)
    assert not looks_finished(out)
    for ckpt in (out / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(t).all() for t in weights(ckpt).values())


def test_nan_reference_model_is_reported_before_training(tiny_model, pku_tiny, tmp_path, monkeypatch):
    """Broken reference weights give NaN reference log-probs: a clear error, and nothing is cached."""
    ref = copy_model(
        tiny_model, tmp_path / "nan_ref", edit=lambda sd: sd["transformer.ln_f.weight"].fill_(math.nan)
    )
    monkeypatch.setattr(loop, "build_policy", lambda cfg: pytest.fail("training must not start"))
    with pytest.raises(NonFiniteError, match=r"reference log-probs .*nan_ref.* NaN/inf for \d+ of 48 pairs"):
        train(make_cfg(tiny_model, pku_tiny, tmp_path / "run", reference=str(ref)), show_progress=False)
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_the_cli_reports_a_numerical_fault_in_one_line(tiny_model, pku_tiny, tmp_path, monkeypatch, capsys):
    _inject(monkeypatch, "nan loss")
    cfg = write_yaml(tmp_path / "stage.yaml", stage_fields(tiny_model, pku_tiny, tmp_path / "run", **KW))
    rc, _, err = run_cli(["-q", "train", str(cfg)], capsys)
    assert_user_error(rc, err, f"at step {FAULT_STEP}", "step-2")
