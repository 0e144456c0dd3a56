"""The step loop's learning rate: with a warmup longer than the run, step 1 trains (lr > 0), and every metrics
record logs the lr its step's AdamW update actually used (read by an optimizer step pre-hook here)."""

import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from sacpo.config import from_dict
from sacpo.train.config import TrainConfig
from sacpo.train.loop import train

BASE = {
    "batch_size": 8,
    "lr": 5e-4,
    "max_length": 80,
    "max_prompt_length": 40,
    "log_every": 1,
    "kl_prompts": 0,
    "eval_fraction": 0.2,
}


def _cfg(model, data, out, **kw) -> TrainConfig:
    fields = {**BASE, "policy": str(model), "output_dir": str(out), "data": {"source": str(data)}, **kw}
    return from_dict(TrainConfig, fields)


@pytest.fixture
def optimizer_steps():
    """Every optimizer step while the test runs: (lr of the update, a weight tensor before, after)."""
    steps = []

    def pre(opt, *_):
        p = opt.param_groups[0]["params"][0]
        steps.append({"lr": opt.param_groups[0]["lr"], "before": p.detach().clone()})

    def post(opt, *_):
        steps[-1]["after"] = opt.param_groups[0]["params"][0].detach().clone()

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    yield steps
    for h in handles:
        h.remove()


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_step_one_trains_and_logs_the_applied_lr(tiny_model, pku_tiny, tmp_path, optimizer_steps, scheduler):
    out = tmp_path / scheduler
    train(
        _cfg(tiny_model, pku_tiny, out, max_steps=2, warmup_steps=10, scheduler=scheduler),
        show_progress=False,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert [s["lr"] for s in optimizer_steps] == pytest.approx([5e-5, 1e-4])  # lr·(s+1)/10
    assert [r["lr"] for r in records] == [s["lr"] for s in optimizer_steps]  # logged = applied
    first = optimizer_steps[0]
    assert not torch.equal(first["before"], first["after"])  # step 1 changed the weights


def test_warmup_ratio_gives_the_warmup_steps(tiny_model, pku_tiny, tmp_path, optimizer_steps):
    """warmup_steps unset: w = ceil(warmup_ratio · 4) = 2, then linear decay (n − s)/(n − w)."""
    train(_cfg(tiny_model, pku_tiny, tmp_path / "r", max_steps=4, warmup_ratio=0.5), show_progress=False)
    assert [s["lr"] for s in optimizer_steps] == pytest.approx([2.5e-4, 5e-4, 5e-4, 2.5e-4])
