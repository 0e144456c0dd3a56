"""sacpo.math.bon: the best-of-n cases of Beirami et al. 2024, by hand, by simulation and as properties.

Here's the maths used below. Sort outcomes by reward; F = P(r ≤ r(y)), F⁻ = P(r < r(y)).
  • pmf: a level is selected iff all n draws are at or below it and not all strictly below: F^n − F⁻^n.
  • binary uniform p, distinct rewards: π = (2⁻ⁿ, 1 − 2⁻ⁿ) so KL = log 2 − h(2⁻ⁿ) ≤ log 2, while the "formula"
    log n − (n−1)/n grows without bound.
  • uniform p on K distinct rewards: M_i = (i/K)^n − ((i−1)/K)^n and KL = Σ M_i log(K·M_i) → log n − (n−1)/n.
  • win rate: 1 − Σ q_ℓ (F_ℓ^n + F⁻_ℓ^n)/2 is one minus the trapezoid rule for ∫ uⁿ = 1/(n+1); for n = 2 on a
    uniform K-grid the trapezoid error is 1/(6K²), so win = 2/3 − 1/(6K²).
"""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sacpo.math.bon import (
    TIE_RULES,
    bon_kl_bound,
    bon_kl_estimate,
    bon_kl_exact,
    bon_pmf,
    bon_win_rate_bound,
    bon_win_rate_exact,
)

D = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def binary_entropy(x: float) -> float:
    return -x * math.log(x) - (1 - x) * math.log1p(-x)


def random_problem(seed: int, batch: int, size: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random p (some exact zeros) and integer rewards with ties, shapes (batch, size)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(batch, size, generator=g, dtype=D) ** 3
    w = w * (torch.rand(batch, size, generator=g) > 0.15)
    w[:, 0] += 1e-3  # every row keeps some mass
    r = torch.randint(0, levels, (batch, size), generator=g).to(D)
    return w / w.sum(-1, keepdim=True), r


def level_masses(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Base mass of each outcome's reward level, q(y) = P(r = r(y)), (..., Y)."""
    same = r[..., :, None] == r[..., None, :]  # (..., Y, Y)
    return (same * p[..., None, :]).sum(-1)


# ------------------------------------------------------------------------------------------------ pmf
def test_pmf_distinct_rewards_by_hand():
    # F = (0.2, 0.5, 1): π = (0.2², 0.5² − 0.2², 1 − 0.5²)
    expected = t(0.04, 0.21, 0.75)
    torch.testing.assert_close(bon_pmf([0.2, 0.3, 0.5], [1.0, 2.0, 3.0], 2), expected, rtol=0, atol=1e-15)
    perm = [2, 0, 1]
    got = bon_pmf(t(0.2, 0.3, 0.5)[perm], t(1.0, 2.0, 3.0)[perm], 2)
    torch.testing.assert_close(got, expected[perm], rtol=0, atol=1e-15)


def test_pmf_ties_shared_in_proportion_to_p():
    # levels: {0}: 0.1, {1,2}: 0.5, {3}: 0.4; F = (0.1, 0.6, 1); level masses 0.001, 0.215, 0.784.
    p, r = t(0.1, 0.2, 0.3, 0.4), t(0.0, 1.0, 1.0, 2.0)
    torch.testing.assert_close(
        bon_pmf(p, r, 3), t(0.001, 0.215 * 0.4, 0.215 * 0.6, 0.784), rtol=0, atol=1e-15
    )
    # "index": outcome 1 ranks above outcome 2; strict CDF order 0, 2, 1, 3 → F = 0.1, 0.4, 0.6, 1.
    expected_index = t(0.001, 0.6**3 - 0.4**3, 0.4**3 - 0.1**3, 1 - 0.6**3)
    torch.testing.assert_close(bon_pmf(p, r, 3, ties="index"), expected_index, rtol=0, atol=1e-15)


@pytest.mark.parametrize("ties", TIE_RULES)
def test_pmf_n1_is_p_and_rows_sum_to_one(ties):
    p, r = random_problem(seed=0, batch=64, size=9, levels=4)
    torch.testing.assert_close(bon_pmf(p, r, 1, ties=ties), p, rtol=0, atol=1e-15)
    for n in (2, 7, 1000):
        pmf = bon_pmf(p, r, n, ties=ties)
        assert (pmf >= 0).all()
        torch.testing.assert_close(pmf.sum(-1), torch.ones(64, dtype=D), rtol=0, atol=1e-12)
        assert (pmf <= n * p + 1e-15).all()  # π/p = (F^n − F⁻^n)/(F − F⁻) ≤ n


def test_pmf_batches_like_rows():
    p, r = random_problem(seed=1, batch=12, size=6, levels=3)
    p, r = p.view(3, 4, 6), r.view(3, 4, 6)
    batched = bon_pmf(p, r, 5)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(batched[i, j], bon_pmf(p[i, j], r[i, j], 5), rtol=0, atol=0)


def test_pmf_zero_probability_outcomes_get_no_mass():
    # the best reward has p = 0; a zero-p outcome is tied with a positive one
    p, r = t(0.5, 0.0, 0.5, 0.0), t(0.0, 1.0, 1.0, 9.0)
    torch.testing.assert_close(bon_pmf(p, r, 3), t(0.125, 0.0, 0.875, 0.0), rtol=0, atol=1e-15)


def test_pmf_huge_n_concentrates_on_the_top_level():
    p, r = t(0.3, 0.6, 0.1), t(0.0, 1.0, 2.0)
    pmf = bon_pmf(p, r, 10**6)
    assert torch.isfinite(pmf).all()
    torch.testing.assert_close(pmf, t(0.0, 0.0, 1.0), rtol=0, atol=1e-15)
    # tiny top mass: 1 − (1 − 1e-12)^n ≈ n·1e-12 must keep its relative accuracy
    p, r = t(1 - 1e-12, 1e-12), t(0.0, 1.0)
    assert bon_pmf(p, r, 1000)[1].item() == pytest.approx(1000 * 1e-12, rel=1e-9)


@pytest.mark.parametrize("ties", TIE_RULES)
def test_pmf_matches_simulation(ties):
    p = t(0.05, 0.25, 0.1, 0.3, 0.2, 0.1)
    r = t(3.0, 1.0, 2.0, 1.0, 0.0, 3.0)  # ties at 1 and at 3
    n, draws = 4, 200_000
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(p, draws * n, replacement=True, generator=g).view(draws, n)  # (N, n)
    key = r[y] if ties == "random" else r[y] - 1e-3 * y  # "index": lower index wins a tie
    chosen = y.gather(1, key.argmax(1, keepdim=True)).squeeze(1)  # argmax returns the first maximal draw
    freq = torch.bincount(chosen, minlength=6).to(D) / draws
    pmf = bon_pmf(p, r, n, ties=ties)
    stderr = (pmf * (1 - pmf) / draws).sqrt()
    assert ((freq - pmf).abs() <= 5 * stderr + 1e-12).all(), (freq, pmf)
    # win rate of the selected sample against a fresh base sample, ties counting ½
    base = torch.multinomial(p, draws, replacement=True, generator=g)
    wins = (r[chosen] > r[base]).to(D) + 0.5 * (r[chosen] == r[base]).to(D)
    assert wins.mean().item() == pytest.approx(
        bon_win_rate_exact(p, r, n).item(), abs=5 * wins.std().item() / draws**0.5
    )


# ------------------------------------------------------------------------------------------------ exact KL
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 30])
def test_binary_uniform_kl_is_log2_minus_entropy(n):
    kl = bon_kl_exact([0.5, 0.5], [0.0, 1.0], n).item()
    assert kl == pytest.approx(math.log(2) - binary_entropy(2.0**-n), abs=1e-14)
    assert kl <= math.log(2) + 1e-15
    assert kl <= bon_kl_bound(n) + 1e-15


def test_binary_kl_is_bernoulli_kl():
    for a in (0.01, 0.3, 0.9):
        for n in (2, 4, 50):
            bottom = (1 - a) ** n  # P(all n draws are the bottom outcome)
            top = 1 - bottom
            expected = top * math.log(top / a) + bottom * n * math.log(1 - a) - bottom * math.log(1 - a)
            assert bon_kl_exact([1 - a, a], [0.0, 1.0], n).item() == pytest.approx(expected, rel=1e-12)


def test_bound_grows_without_limit_while_binary_kl_saturates():
    n = 10**4
    assert bon_kl_bound(n) > 8.0
    assert bon_kl_exact([0.5, 0.5], [0.0, 1.0], n).item() == pytest.approx(math.log(2), abs=1e-15)


def test_uniform_ten_outcomes_by_hand_and_below_bound():
    K = 10
    p, r = torch.full((K,), 1 / K, dtype=D), torch.arange(K, dtype=D)
    # n = 2: M_i = (2i − 1)/K²
    expected = sum((2 * i - 1) / K**2 * math.log((2 * i - 1) / K) for i in range(1, K + 1))
    assert bon_kl_exact(p, r, 2).item() == pytest.approx(expected, rel=1e-13)
    for n in (1, 2, 4, 16, 128, 1024):
        assert bon_kl_exact(p, r, n).item() <= bon_kl_bound(n) + 1e-15
        assert bon_kl_exact(p, r, n).item() <= math.log(K) + 1e-15


@pytest.mark.parametrize("n", [2, 8, 64])
def test_bound_is_approached_as_uniform_support_grows(n):
    gaps = []
    for K in (2, 10, 100, 1000, 10_000):
        p, r = torch.full((K,), 1 / K, dtype=D), torch.arange(K, dtype=D)
        gaps.append(bon_kl_bound(n) - bon_kl_exact(p, r, n).item())
    assert all(gap > 0 for gap in gaps)
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-5


def test_kl_is_the_kl_of_the_pmf():
    p, r = random_problem(seed=2, batch=32, size=10, levels=5)
    for ties in TIE_RULES:
        pmf = bon_pmf(p, r, 6, ties=ties)
        direct = torch.where(pmf > 0, pmf * (pmf / torch.where(p > 0, p, 1.0)).log(), 0.0).sum(-1)
        torch.testing.assert_close(bon_kl_exact(p, r, 6, ties=ties), direct, rtol=1e-10, atol=1e-14)


def test_kl_large_n_tends_to_minus_log_top_mass():
    p, r = t(0.5, 0.4, 0.1), t(0.0, 1.0, 2.0)
    assert bon_kl_exact(p, r, 10**4).item() == pytest.approx(math.log(10), abs=1e-12)
    assert math.isfinite(bon_kl_exact(p, r, 10**9).item())


def test_bound_holds_for_many_random_problems():
    p, r = random_problem(seed=3, batch=2000, size=12, levels=6)
    for n in (1, 2, 3, 10, 100, 5000):
        kl_random = bon_kl_exact(p, r, n)
        kl_index = bon_kl_exact(p, r, n, ties="index")
        assert (kl_random >= -1e-15).all()
        assert (kl_index <= bon_kl_bound(n) + 1e-12).all()
        assert (kl_random <= kl_index + 1e-12).all()  # random ties are a coarsening of the index order


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=15),
    data=st.data(),
    n=st.integers(1, 10_000),
)
def test_bound_property(weights, data, n):
    if sum(weights) <= 0:
        weights = [1.0, *weights[1:]]
    p = torch.tensor(weights, dtype=D) / sum(weights)
    rewards = data.draw(st.lists(st.integers(-3, 3), min_size=len(weights), max_size=len(weights)))
    r = torch.tensor(rewards, dtype=D)
    for ties in TIE_RULES:
        pmf = bon_pmf(p, r, n, ties=ties)
        assert abs(pmf.sum().item() - 1) < 1e-12
        assert -1e-15 <= bon_kl_exact(p, r, n, ties=ties).item() <= bon_kl_bound(n) + 1e-12
    assert bon_win_rate_exact(p, r, n).item() <= bon_win_rate_bound(n) + 1e-12


def test_kl_bound_values_and_vectorisation():
    assert bon_kl_bound(1) == 0.0
    assert bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    ns = torch.tensor([1, 2, 10, 1000])
    expected = torch.tensor([math.log(k) - (k - 1) / k for k in (1, 2, 10, 1000)], dtype=D)
    torch.testing.assert_close(bon_kl_bound(ns), expected, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------ estimator
N_GRID = [1, 2, 3, 4, 16, 256, 10**4, 10**6]


@pytest.mark.parametrize("n", N_GRID)
def test_estimate_between_zero_and_bound(n):
    eps = torch.cat([torch.logspace(-300, -1, 300, dtype=D), torch.linspace(0, 1, 5001, dtype=D)])
    est = bon_kl_estimate(eps, n)
    assert torch.isfinite(est).all()
    assert (est >= -1e-15).all()
    assert (est <= bon_kl_bound(n) + 1e-14).all()


def test_estimate_limits():
    for n in (2, 16, 10**6):
        assert bon_kl_estimate(0.0, n) == bon_kl_bound(n)
        assert bon_kl_estimate(1e-300, n) == pytest.approx(bon_kl_bound(n), abs=1e-12)
        assert bon_kl_estimate(1.0, n) == 0.0
    assert bon_kl_estimate(torch.linspace(0, 1, 11, dtype=D), 1).abs().max().item() < 1e-15


def test_estimate_matches_the_formula_at_moderate_eps():
    for eps, n in ((0.2, 5), (0.5, 3), (0.01, 100)):
        a = (1 - eps) ** n
        naive = a * (math.log(n) + (n - 1) * math.log(1 - eps) - (n - 1) / n) + (1 - a) * math.log(
            (1 - a) / eps
        )
        assert bon_kl_estimate(eps, n) == pytest.approx(naive, rel=1e-12)


@pytest.mark.parametrize("eps", [0.05, 0.3, 0.8])
def test_estimate_is_exact_for_an_atom_on_a_continuum(eps):
    # top outcome of mass ε above K tiny equal atoms: the exact KL tends to KL̂(ε) as K → ∞
    K = 20_000
    p = torch.cat([torch.full((K,), (1 - eps) / K, dtype=D), t(eps)])
    r = torch.arange(K + 1, dtype=D)
    for n in (2, 8, 64):
        assert bon_kl_exact(p, r, n).item() == pytest.approx(bon_kl_estimate(eps, n), abs=1e-7)


def test_estimate_reduce_and_types():
    eps = t(0.1, 0.2, 0.7)
    per_sample = bon_kl_estimate(eps, 4)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(bon_kl_estimate(eps, 4, reduce="mean"), per_sample.mean())
    assert isinstance(bon_kl_estimate(0.3, 4), float)
    assert bon_kl_estimate(0.3, torch.tensor([1, 4])).shape == (2,)
    with pytest.raises(ValueError, match="none, mean"):
        bon_kl_estimate(eps, 4, reduce="sum")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            bon_kl_estimate(bad, 4)


# ------------------------------------------------------------------------------------------------ win rate
def test_win_rate_n1_is_half_even_with_ties():
    p, r = random_problem(seed=4, batch=50, size=8, levels=3)
    torch.testing.assert_close(
        bon_win_rate_exact(p, r, 1), torch.full((50,), 0.5, dtype=D), rtol=0, atol=1e-14
    )


def test_win_rate_all_tied_is_half():
    assert bon_win_rate_exact([0.2, 0.3, 0.5], [1.0, 1.0, 1.0], 50).item() == pytest.approx(0.5, abs=1e-15)


def test_win_rate_binary_by_hand():
    # P(win) = P(bon = top)·P(base = bottom) + ½·P(tie) = ¾ − 2^{−(n+1)}
    for n in (1, 2, 5, 20):
        assert bon_win_rate_exact([0.5, 0.5], [0.0, 1.0], n).item() == pytest.approx(0.75 - 2.0 ** -(n + 1))


@pytest.mark.parametrize("K", [2, 10, 1000])
def test_win_rate_uniform_grid_n2_by_hand(K):
    p, r = torch.full((K,), 1 / K, dtype=D), torch.arange(K, dtype=D)
    assert bon_win_rate_exact(p, r, 2).item() == pytest.approx(2 / 3 - 1 / (6 * K**2), abs=1e-14)


def test_win_rate_sandwiched_by_bound_and_largest_level():
    p, r = random_problem(seed=5, batch=2000, size=10, levels=5)
    q_max = level_masses(p, r).amax(-1)
    for n in (1, 2, 3, 10, 100):
        win = bon_win_rate_exact(p, r, n)
        assert (win <= bon_win_rate_bound(n) + 1e-14).all()
        assert (win >= bon_win_rate_bound(n) - 0.5 * q_max - 1e-14).all()
        if n >= 2:
            assert (win < bon_win_rate_bound(n)).all()  # strict on any finite space: uⁿ is strictly convex


def test_win_rate_is_the_pmf_against_the_base():
    p, r = random_problem(seed=6, batch=40, size=7, levels=4)
    pmf = bon_pmf(p, r, 5)
    below = ((r[..., None, :] < r[..., :, None]) * p[..., None, :]).sum(-1)  # F⁻(y), (B, Y)
    expected = (pmf * (below + 0.5 * level_masses(p, r))).sum(-1)
    torch.testing.assert_close(bon_win_rate_exact(p, r, 5), expected, rtol=0, atol=1e-14)


def test_win_rate_bound_values():
    assert bon_win_rate_bound(1) == 0.5
    assert bon_win_rate_bound(9) == pytest.approx(0.9)
    torch.testing.assert_close(bon_win_rate_bound(torch.tensor([1, 3])), t(0.5, 0.75))


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("p", "r", "n", "match"),
    [
        ([0.5, 0.6], [0.0, 1.0], 2, "sum to 1"),
        ([1.2, -0.2], [0.0, 1.0], 2, "non-negative"),
        ([0.5, 0.5], [0.0, 1.0, 2.0], 2, "same shape"),
        ([0.5, 0.5], [0.0, float("nan")], 2, "NaN"),
        ([0.5, 0.5], [0.0, 1.0], 0, "integer >= 1"),
        ([0.5, 0.5], [0.0, 1.0], 2.5, "integer >= 1"),
        ([0.5, 0.5], [0.0, 1.0], True, "integer >= 1"),
    ],
)
def test_invalid_inputs_raise(p, r, n, match):
    for fn in (bon_pmf, bon_kl_exact, bon_win_rate_exact):
        with pytest.raises(ValueError, match=match):
            fn(p, r, n)


def test_unknown_tie_rule_lists_valid_ones():
    with pytest.raises(ValueError, match="random, index"):
        bon_pmf([0.5, 0.5], [0.0, 1.0], 2, ties="first")
    with pytest.raises(ValueError, match="integers >= 1"):
        bon_kl_bound(torch.tensor([0, 2]))
