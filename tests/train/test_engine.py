"""The auxiliary trainers' engine: its schedules equal the formulas they replaced (transformers' linear schedule),
a non-finite loss stops before any update, history windows."""

import math

import pytest
import torch

from sacpo.train.checkpoint import NonFiniteError
from sacpo.train.engine import Stepper, fit, warmup_constant, warmup_cosine, warmup_linear_decay


def _lrs(schedule, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    stepper = Stepper([p], lr=2.0, schedule=schedule)
    lrs = []
    for i in range(steps):
        lrs.append(stepper.lr)
        stepper.step((p - 1).pow(2).sum(), i)
    return lrs


def test_linear_schedule_equals_transformers():
    from transformers import get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = get_linear_schedule_with_warmup(opt, 3, 10)
    theirs = []
    for _ in range(10):
        theirs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert _lrs(warmup_linear_decay(3, 10), 10) == theirs


def test_warmup_constant_and_cosine_by_hand():
    assert _lrs(warmup_constant(4), 6) == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]  # 2·min(1, (s+1)/4)
    lrs = _lrs(warmup_cosine(2, 6), 6)
    assert lrs[:2] == [1.0, 2.0]
    assert lrs[2:] == pytest.approx([2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


def test_non_finite_loss_stops_before_the_update():
    p = torch.nn.Parameter(torch.ones(1))
    stepper = Stepper([p], lr=1.0, schedule=warmup_constant(1), name="toy", hint="lower lr")
    with pytest.raises(NonFiniteError, match=r"toy: loss is nan at step 3; lower lr"):
        stepper.step(p.sum() * float("nan"), 2)
    assert p.grad is None and p.item() == 1.0


def test_fit_history_windows_and_clipping():
    p = torch.nn.Parameter(torch.zeros(2))
    stepper = Stepper([p], lr=0.1, schedule=warmup_constant(1), max_grad_norm=1.0)
    run = fit(stepper, 5, lambda s: ((p - 10).pow(2).sum(), {"loss": float(s)}), "t", 2, False, log_lr=True)
    assert [h["step"] for h in run.history] == [2, 4, 5]
    assert [h["loss"] for h in run.history] == [0.5, 2.5, 4.0]  # means over each window, last one shorter
    assert all(h["lr"] == pytest.approx(0.1) for h in run.history)
    assert len(run.values) == 5
