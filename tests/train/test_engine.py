"""The training engine: its schedules by hand (the first step trains, also with a long warmup), a non-finite loss
stops before any update, history windows log the LR each update used."""

import math

import pytest
import torch

from sacpo.train.checkpoint import NonFiniteError
from sacpo.train.engine import SCHEDULES, Stepper, fit, warmup_constant, warmup_cosine, warmup_linear_decay


def _lrs(schedule, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    stepper = Stepper([p], lr=2.0, schedule=schedule)
    lrs = []
    for i in range(steps):
        lrs.append(stepper.lr)
        stepper.step((p - 1).pow(2).sum(), i)
    return lrs


def test_linear_schedule_by_hand_and_equal_to_transformers_after_the_warmup():
    """Warmup (s+1)/w: step 0 trains at lr/w, where transformers' s/w gives an update at lr 0; after the warmup
    both decay as (n − s)/(n − w)."""
    from transformers import get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = get_linear_schedule_with_warmup(opt, 3, 10)
    theirs = []
    for _ in range(10):
        theirs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    ours = _lrs(warmup_linear_decay(3, 10), 10)
    assert theirs[0] == 0.0 and ours[:3] == pytest.approx([2 / 3, 4 / 3, 2.0])  # 2·(s+1)/3
    assert ours[3:] == theirs[3:] == pytest.approx([2 * (10 - s) / 7 for s in range(3, 10)])
    assert _lrs(warmup_linear_decay(0, 4), 4) == [2.0, 1.5, 1.0, 0.5]  # no warmup: (n − s)/n


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_trains_at_step_one_with_a_long_warmup(name):
    """w = 10 warmup steps of a 2-step run: lr·1/10 then lr·2/10 (never 0)."""
    assert _lrs(SCHEDULES[name](10, 2), 2) == pytest.approx([0.2, 0.4])


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


def test_fit_logs_the_lr_each_update_used():
    """The history's lr is the one the window's last optimizer.step() ran with (recorded by a step pre-hook),
    not the scheduler's value for the next step; with warmup w = 10 the first update already moves the weights."""
    p = torch.nn.Parameter(torch.zeros(1))
    stepper = Stepper([p], lr=1.0, schedule=warmup_linear_decay(10, 3))
    applied, values = [], []
    stepper.optimizer.register_step_pre_hook(lambda opt, *_: applied.append(opt.param_groups[0]["lr"]))

    def loss_fn(step):
        values.append(p.item())
        return (p - 1).pow(2).sum(), None

    run = fit(stepper, 3, loss_fn, "t", 1, False, log_lr=True)
    assert applied == pytest.approx([0.1, 0.2, 0.3])
    assert [h["lr"] for h in run.history] == applied
    assert values[1] != values[0]  # step 1 changed the weight
