"""sacpo.math.statistics: win rates, (cluster) bootstrap CIs and bounds, paired differences, stderr, Spearman, the
π* objective gain and curve interpolation — by hand."""

import math

import numpy as np
import pytest
import torch

from sacpo.math.statistics import (
    bootstrap_ci,
    bootstrap_lower_bound,
    cluster_codes,
    cross_outcomes,
    cross_win_rate,
    curve_weights,
    kl_objective,
    mean_and_stderr,
    objective_gain,
    outcomes,
    paired_difference,
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


def test_spearman_hand():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [10, 20, 25]) == pytest.approx(1.0)
    # ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4] → Σ dx·dy = 4.5, Σ dx² = 4.5, Σ dy² = 5 → 4.5/√22.5
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


# ------------------------------------------------------------------------------------------------ cross pairs
def test_cross_outcomes_hand_value():
    # pairs (1,2) loss 0, (1,3) loss 0, (3,2) win 1, (3,3) tie ½ → 3/8; prompt 2: (5 vs 4) 1, (5 vs 6) 0 → ½
    assert cross_outcomes([[1, 3], [5, 5]], [[2, 3], [4, 6]]).tolist() == [0.375, 0.5]
    # one sample against two: 1-D a is (P, 1)
    assert cross_outcomes([2.0], [[1.0, 3.0]]).tolist() == [0.5]
    # the paired rate of the same data differs: prompt 1 pairs (1,2), (3,3) → ¼
    assert per_prompt(outcomes([[1, 3]], [[2, 3]])).tolist() == [0.25]
    with pytest.raises(ValueError, match="same prompts"):
        cross_outcomes([[1.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="NaN"):
        cross_outcomes([[NAN]], [[1.0]])


def test_cross_win_rate_self_is_half_and_uses_clusters():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    assert cross_win_rate(x, x) == (0.5, 0.5, 0.5)
    a, b = rng.normal(size=(20, 4)) + 0.3, rng.normal(size=(20, 4))
    u = cross_outcomes(a, b)
    labels = [i // 5 for i in range(20)]
    rate, lo, hi = cross_win_rate(a, b, n_boot=500, seed=1, clusters=labels)
    assert rate == pytest.approx(u.mean())
    assert (lo, hi) == bootstrap_ci(u, n_boot=500, seed=1, clusters=labels)


# ------------------------------------------------------------------------------------------------ clusters
def test_cluster_bootstrap_two_clusters_hand():
    # 2 clusters of 2 equal prompts: resampled means 0, ½, 1 with probabilities ¼, ½, ¼ (as two prompts would)
    v, labels = [0.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"]
    assert bootstrap_ci(v, n_boot=4000, seed=0, clusters=labels) == (0.0, 1.0)
    assert bootstrap_ci(v, n_boot=4000, seed=0, alpha=0.6, clusters=labels) == (0.5, 0.5)
    # unequal sizes: values [0 | 1, 1]: resamples {a,a} → 0, {a,b} (p ½) → (0 + 2)/(1 + 2) = ⅔, {b,b} → 1
    assert bootstrap_ci([0.0, 1.0, 1.0], n_boot=4000, seed=0, alpha=0.6, clusters=["a", "b", "b"]) == (
        pytest.approx(2 / 3),
        pytest.approx(2 / 3),
    )


def test_cluster_bootstrap_is_wider_when_prompts_in_a_cluster_agree():
    v = np.repeat([0.0, 1.0, 0.0, 1.0], 10)  # 4 tasks × 10 paraphrases, identical within a task
    labels = np.repeat(["t0", "t1", "t2", "t3"], 10)
    lo_p, hi_p = bootstrap_ci(v, n_boot=2000, seed=0)
    lo_c, hi_c = bootstrap_ci(v, n_boot=2000, seed=0, clusters=labels)
    assert hi_c - lo_c > 2 * (hi_p - lo_p)  # 4 independent units, not 40
    assert lo_c <= 0.25 and hi_c >= 0.75


def test_cluster_errors_and_undefined():
    assert cluster_codes(["b", "a", "b"], 3).tolist() == [1, 0, 1]
    assert cluster_codes(None, 3) is None
    with pytest.raises(ValueError, match="2 labels for 3 prompts"):
        bootstrap_ci([1.0, 2.0, 3.0], clusters=["a", "b"])
    assert all(math.isnan(x) for x in bootstrap_ci([1.0, 2.0], clusters=["a", "a"]))  # one cluster: no spread
    with pytest.raises(ValueError, match="custom statistic"):
        bootstrap_ci([1.0, 2.0], statistic=lambda m: m.max(axis=1), clusters=["a", "b"])


def test_lower_bound_hand():
    # resampled means of [0, 1]: 0, ½, 1 with probabilities ¼, ½, ¼ → 30% quantile ½, 10% quantile 0
    assert bootstrap_lower_bound([0.0, 1.0], alpha=0.3, n_boot=4000) == 0.5
    assert bootstrap_lower_bound([0.0, 1.0], alpha=0.1, n_boot=4000) == 0.0
    assert bootstrap_lower_bound([0.0, 0.0, 1.0, 1.0], alpha=0.3, n_boot=4000, clusters=list("aabb")) == 0.5
    assert bootstrap_lower_bound([2.0, 2.0, 2.0]) == 2.0
    assert math.isnan(bootstrap_lower_bound([1.0]))
    # one-sided: the 95% lower bound lies above the lower end of the two-sided 95% interval
    v = np.random.default_rng(0).normal(size=100)
    assert bootstrap_ci(v)[0] < bootstrap_lower_bound(v) < v.mean()


def test_paired_difference_hand_and_pairing_matters():
    # d = [1, 1, 2] → Δ = 4/3
    assert paired_difference([1, 2, 4], [0, 1, 2])[0] == pytest.approx(4 / 3)
    # b = a − 1 on prompts of very different levels: the paired CI is exactly 1, an unpaired one would be wide
    a = np.array([0.0, 10.0, -5.0, 3.0, 7.0])
    assert paired_difference(a, a - 1.0) == (1.0, 1.0, 1.0)
    assert paired_difference(a, a - 1.0, clusters=list("aabbc")) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same number of prompts"):
        paired_difference([1.0, 2.0], [1.0])


def test_clustered_stderr_hand():
    # clusters {1, 3}, {5, 7}: totals 4, 12, mean 4 → se² = 2/1 · ((4 − 8)² + (12 − 8)²) / 4² = 4
    assert mean_and_stderr([1.0, 3.0, 5.0, 7.0], clusters=list("aabb")) == pytest.approx((4.0, 2.0))
    # singleton clusters are the unclustered s/√P
    v = [1.0, 2.0, 3.0, 4.0]
    assert mean_and_stderr(v, clusters=list("abcd")) == pytest.approx(mean_and_stderr(v))
    mean, se = mean_and_stderr(v, clusters=list("aaaa"))
    assert mean == 2.5 and math.isnan(se)


# ------------------------------------------------------------------------------------------------ objective
def test_kl_objective_and_gain_hand():
    # J = 1 + 2·0.5 − (0.1/4)·2 = 1.95
    assert kl_objective(1.0, 0.5, 2.0, lam=2.0, beta=0.1, scale=4.0) == pytest.approx(1.95)
    g = objective_gain((1.0, 0.5, 2.0), (0.5, 0.0), (1.5, 0.8, 1.0), lam=2.0, beta=0.1, scale=4.0)
    # J(SFT) = 0.5 + 0 = 0.5; J(π*) = 1.5 + 1.6 − 0.025 = 3.075; fraction = (1.95 − 0.5)/(3.075 − 0.5)
    assert g.objective == pytest.approx(1.95) and g.objective_sft == pytest.approx(0.5)
    assert g.objective_opt == pytest.approx(3.075)
    assert g.fraction == pytest.approx(1.45 / 2.575)
    assert g.excess_kl == pytest.approx(1.0)
    # a model below SFT: negative fraction, not clamped; no gain to share: NaN
    assert objective_gain((0.0, 0.0, 1.0), (0.5, 0.0), (1.5, 0.8, 1.0), 2.0, 0.1, 4.0).fraction < 0
    assert math.isnan(objective_gain((1.0, 0.0, 0.0), (1.0, 0.0), (1.0, 0.0, 0.0), 2.0, 0.1, 4.0).fraction)
    with pytest.raises(ValueError):
        kl_objective(1.0, 0.0, 0.0, 1.0, beta=0.0, scale=1.0)


def test_curve_weights_hand():
    assert curve_weights([0.0, 2.0], [0.0, 4.0], 0.5).tolist() == [0.75, 0.25]
    assert curve_weights([2.0, 0.0], [4.0, 0.0], 0.5).tolist() == [0.25, 0.75]  # either direction
    assert curve_weights([0.0, 2.0], [0.0, 4.0], 2.5) is None  # no extrapolation
    assert curve_weights([1.0], [3.0], 1.0).tolist() == [1.0] and curve_weights([1.0], [3.0], 1.1) is None
    # a curve that turns back crosses x = 1 twice: at y = 0.5 (first segment) and y = 2 (second) → the higher
    assert curve_weights([0.0, 2.0, 0.0], [0.0, 1.0, 3.0], 1.0).tolist() == [0.0, 0.5, 0.5]
    assert curve_weights([0.0, NAN], [0.0, 1.0], 0.0) is None
    assert curve_weights([0.0, 1.0], [0.0, 1.0], NAN) is None
