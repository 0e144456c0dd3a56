"""Determinism on CPU: the same config and seed give byte-identical metrics.jsonl and identical weights (the
reference pass, data order, KTO reference point and KL sampling included); another seed gives other metrics."""

import pytest
import torch
from reliability_helpers import make_cfg, weights

from sacpo.train.loop import train

KW = {
    "max_steps": 6,
    "batch_size": 4,
    "grad_accum": 2,
    "warmup_ratio": 0.2,
    "log_every": 2,
    "kl_prompts": 2,
    "kl_samples": 2,
    "kl_max_new_tokens": 8,
}


def _run(tiny_model, pku_tiny, root, **kw):
    out = root / "run"  # each run under its own root: its own reference cache, computed from scratch
    result = train(make_cfg(tiny_model, pku_tiny, out, **{**KW, **kw}), show_progress=False)
    assert result.reference_pass == "computed"
    return (out / "metrics.jsonl").read_text(), weights(out / "model")


@pytest.fixture(scope="module")
def first_runs(tiny_model, pku_tiny, tmp_path_factory):
    return {
        loss: _run(tiny_model, pku_tiny, tmp_path_factory.mktemp(loss), loss=loss, fmt=fmt)
        for loss, fmt in LOSSES
    }


LOSSES = [("dpo", "pku_helpful"), ("kto", "pku_safe_kto")]


@pytest.mark.parametrize("loss, fmt", LOSSES)
def test_same_config_and_seed_give_identical_runs(tiny_model, pku_tiny, tmp_path, first_runs, loss, fmt):
    m1, w1 = first_runs[loss]
    m2, w2 = _run(tiny_model, pku_tiny, tmp_path, loss=loss, fmt=fmt)
    assert m1 == m2 and len(m1.splitlines()) == 3 and "eval/kl" in m1
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_another_seed_gives_other_metrics(tiny_model, pku_tiny, tmp_path, first_runs):
    """The control: the comparison above can fail."""
    m2, _ = _run(tiny_model, pku_tiny, tmp_path, seed=1)
    assert first_runs["dpo"][0] != m2
