"""sacpo.evaluate.metrics: win rates, bootstrap CIs, stderr, KL and Spearman by hand."""

import json
import math

import numpy as np
import pytest
import torch

from sacpo.evaluate.metrics import (
    ModelMetrics,
    bootstrap_ci,
    constraint_holds,
    kl_estimate,
    mean_and_stderr,
    outcomes,
    per_prompt,
    spearman,
    win_rate,
)

NAN = float("nan")


# ------------------------------------------------------------------------------------------------ win rate
def test_win_rate_hand_value_1d():
    # here's the maths: (tie ½ + win 1 + loss 0) / 3 = 0.5
    rate, lo, hi = win_rate([1, 2, 3], [1, 1, 4])
    assert rate == pytest.approx((0.5 + 1 + 0) / 3)
    assert lo <= rate <= hi


def test_win_rate_hand_value_2d_averages_within_prompt():
    a = [[1, 2], [3, 3]]
    b = [[2, 2], [1, 4]]
    # prompt 0: (loss 0 + tie ½)/2 = ¼; prompt 1: (win 1 + loss 0)/2 = ½; rate = (¼ + ½)/2
    assert outcomes(a, b).tolist() == [[0.0, 0.5], [1.0, 0.0]]
    assert per_prompt(outcomes(a, b)).tolist() == [0.25, 0.5]
    assert win_rate(a, b)[0] == pytest.approx(0.375)


def test_win_rate_accepts_tensors_and_self_comparison_is_half_exactly():
    x = torch.tensor([[0.3, -1.0], [2.0, 2.0], [0.0, 5.0]], dtype=torch.float64)
    assert win_rate(x, x) == (0.5, 0.5, 0.5)


def test_win_rate_errors_and_undefined():
    with pytest.raises(ValueError, match="same shape"):
        win_rate([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        win_rate([1, NAN], [1, 2])
    rate, lo, hi = win_rate([2.0], [1.0])  # one prompt: a rate, but no interval
    assert rate == 1.0 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in win_rate(np.zeros(0), np.zeros(0)))


# ------------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_two_values_hand():
    # resampled means of [0, 1] are 0, ½, 1 with probabilities ¼, ½, ¼: the 2.5% / 97.5% quantiles are 0 and 1
    lo, hi = bootstrap_ci([0.0, 1.0], n_boot=4000, seed=0)
    assert (lo, hi) == (0.0, 1.0)
    lo, hi = bootstrap_ci([0.0, 1.0], n_boot=4000, seed=0, alpha=0.6)  # 30% / 70% quantiles: the ½ atom
    assert (lo, hi) == (0.5, 0.5)


def test_bootstrap_deterministic_by_seed_and_contains_estimate():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    r1, r2 = win_rate(a, b, seed=7), win_rate(a, b, seed=7)
    assert r1 == r2
    assert r1[1] <= r1[0] <= r1[2]
    assert win_rate(a, b, seed=8)[1:] != r1[1:]
    v = rng.normal(size=200)
    lo, hi = bootstrap_ci(v, seed=3)
    assert lo < v.mean() < hi
    assert bootstrap_ci(v, seed=3) == (lo, hi)
    # the interval is about ±1.96 s/√n
    se = v.std(ddof=1) / math.sqrt(v.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bootstrap_constant_and_undefined():
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(x) for x in bootstrap_ci([1.0]))
    assert all(math.isnan(x) for x in bootstrap_ci([1.0, NAN]))
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], alpha=0.0)
    median = bootstrap_ci([1.0, 2.0, 3.0, 10.0], statistic=lambda m: np.median(m, axis=1), n_boot=500)
    assert 1.0 <= median[0] <= median[1] <= 10.0


# ------------------------------------------------------------------------------------------------ mean, KL
def test_mean_and_stderr_hand():
    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)  # s = √(5/3), se = s/√4
    mean, se = mean_and_stderr([[1.0, 3.0], [5.0, 7.0]])  # prompt means 2, 6 → s = 2√2, se = 2
    assert (mean, se) == pytest.approx((4.0, 2.0))
    mean, se = mean_and_stderr([3.0])
    assert mean == 3.0 and math.isnan(se)


def test_kl_estimate_hand_and_no_clamp():
    lp = [[-1.0, -2.0], [-3.0, -4.0]]
    lq = [[-1.5, -1.0], [-3.0, -5.0]]
    # log-ratios [[.5, −1], [0, 1]] → prompt means [−.25, .5] → mean .125, se = std([−.25, .5])/√2 = .375
    kl, se = kl_estimate(lp, lq)
    assert kl == pytest.approx(0.125) and se == pytest.approx(0.375)
    kl, se = kl_estimate([-2.0], [-1.0])  # one sample: a negative estimate is noise and stays negative
    assert kl == -1.0 and math.isnan(se)
    x = torch.randn(6, 3)
    assert kl_estimate(x, x.clone()) == (0.0, 0.0)
    with pytest.raises(ValueError, match="shapes"):
        kl_estimate([1.0, 2.0], [1.0])


def test_constraint_holds():
    assert constraint_holds(0.1, 0.0) and constraint_holds(0.0, 0.0)
    assert not constraint_holds(-0.1, 0.0)
    assert not constraint_holds(NAN, -10.0)


def test_spearman_hand():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [10, 20, 25]) == pytest.approx(1.0)
    # ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4] → Σ dx·dy = 4.5, Σ dx² = 4.5, Σ dy² = 5 → 4.5/√22.5
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


# ------------------------------------------------------------------------------------------------ ModelMetrics
def test_model_metrics_dict_roundtrip_is_strict_json():
    m = ModelMetrics(
        name="sacpo-lam2",
        family="sacpo",
        param=0.05,
        helpful_win=(0.6, 0.5, NAN),
        harmless_win=(0.7, 0.6, 0.8),
        mean_reward=1.0,
        mean_safety=NAN,
        p_safe=0.9,
        constraint_ok=False,
        kl=2.0,
        kl_se=NAN,
        mean_rm=0.3,
        n=8,
        extra={"len": 3.5},
    )
    text = json.dumps(m.to_dict(), allow_nan=False)
    back = ModelMetrics.from_dict(json.loads(text))
    assert back.name == m.name and back.param == 0.05 and back.mean_cm is None
    assert back.helpful_win[:2] == (0.6, 0.5) and math.isnan(back.helpful_win[2])
    assert math.isnan(back.mean_safety) and math.isnan(back.kl_se)
    assert back.extra == {"len": 3.5}
    with pytest.raises(ValueError, match="unknown"):
        ModelMetrics.from_dict({**m.to_dict(), "bogus": 1})
