"""Checkpoints without pickle: state trees round-trip through JSON + safetensors exactly (optimizer, scheduler,
RNG), a checkpoint holds only .json/.safetensors files, and restore puts every prepared object back."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from sacpo.config import ConfigError
from sacpo.train import checkpoint
from sacpo.train.state import load_tree, rng_state, save_tree, set_rng_state


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4), torch.randn(2)


def test_rng_states_round_trip(tmp_path):
    np.random.randn()  # a cached Gaussian in NumPy's state (has_gauss=1)
    save_tree(tmp_path, "rng", rng_state())
    after_save = _draws()
    _draws(), torch.manual_seed(123), random.seed(5), np.random.seed(7)  # move every generator elsewhere
    set_rng_state(load_tree(tmp_path, "rng"))
    after_restore = _draws()
    assert after_save[:3] == after_restore[:3]
    assert all(torch.equal(a, b) for a, b in zip(after_save[3:], after_restore[3:], strict=True))


def _trained(fused: bool, steps: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    sched = get_linear_schedule_with_warmup(opt, 2, 10)
    for _ in range(steps):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step(), sched.step(), opt.zero_grad()
    return model, opt, sched


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_and_scheduler_round_trip_bit_for_bit(tmp_path, fused):
    model, opt, sched = _trained(fused, steps=3)
    save_tree(tmp_path, "optimizer", opt.state_dict())
    save_tree(tmp_path, "scheduler", sched.state_dict())
    assert json.loads((tmp_path / "optimizer.json").read_text())["param_groups"][0]["betas"] == {
        "$tuple": [0.9, 0.999]
    }
    fresh_model, fresh_opt, fresh_sched = _trained(fused, steps=0)
    fresh_model.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(load_tree(tmp_path, "optimizer"))
    fresh_sched.load_state_dict(load_tree(tmp_path, "scheduler"))
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again
    assert set(fresh_opt.state_dict()["state"]) == {0, 1}  # int keys again
    x = torch.randn(5, 4)
    for m, o, s in ((model, opt, sched), (fresh_model, fresh_opt, fresh_sched)):
        m(x).square().sum().backward()
        o.step(), s.step()
    assert sched.get_last_lr() == fresh_sched.get_last_lr()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True))
    for a, b in zip(opt.state.values(), fresh_opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_a_state_that_needs_pickle_is_not_stored(tmp_path):
    with pytest.raises(TypeError, match=r"cannot store a function at opt\.hook"):
        save_tree(tmp_path, "opt", {"hook": lambda: 0})
    with pytest.raises(ValueError, match="both named"):
        save_tree(tmp_path, "opt", {"a": {"0": torch.zeros(1)}, "a.0": torch.zeros(1)})


def _prepared(lora_like: bool):
    """A prepared model (a frozen layer when `lora_like`: not stored), its AdamW and a registered scheduler."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    if lora_like:
        model[0].requires_grad_(False)
    else:  # a tied weight, as GPT-2's wte / lm_head: stored once
        model[1].weight = model[0].weight
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = get_linear_schedule_with_warmup(opt, 1, 10)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    return acc, model, opt, sched


def _step(model, opt, sched) -> None:
    torch.nn.functional.dropout(model(torch.randn(3, 4)), 0.5).sum().backward()
    opt.step(), sched.step(), opt.zero_grad()


@pytest.mark.parametrize("lora_like", [False, True])
def test_save_then_restore_is_the_uninterrupted_run(tmp_path, lora_like):
    acc, model, opt, sched = _prepared(lora_like)
    _step(model, opt, sched)
    checkpoint.save(acc, tmp_path, 1, run={"x": 1}, pending={"loss": [0.5]})
    ckpt = tmp_path / "checkpoints" / "step-1"
    names = sorted(p.name for p in ckpt.iterdir())
    assert all(n.endswith((".json", ".safetensors")) for n in names), names
    assert {"model.safetensors", "optimizer.json", "custom-0.json", "rng-0.safetensors", "step.json"} <= set(
        names
    )
    for _ in range(2):
        _step(model, opt, sched)
    expected = [p.detach().clone() for p in model.parameters()]

    acc2, model2, opt2, sched2 = _prepared(lora_like)
    torch.manual_seed(99)  # restore must bring back the RNG too (dropout draws)
    restored = checkpoint.restore(acc2, tmp_path, run={"x": 1})
    assert restored == checkpoint.Restored(1, {"loss": [0.5]})
    for _ in range(2):
        _step(model2, opt2, sched2)
    assert all(torch.equal(a, b) for a, b in zip(expected, model2.parameters(), strict=True))
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_restore_refuses_a_checkpoint_of_another_model(tmp_path):
    acc, *_ = _prepared(lora_like=False)
    checkpoint.save(acc, tmp_path, 1)
    acc2, *_ = _prepared(lora_like=True)
    with pytest.raises(ConfigError, match="model state does not match"):
        checkpoint.restore(acc2, tmp_path)
