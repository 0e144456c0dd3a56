"""KL of best-of-n under reward ties (sacpo.math.bon.bon_kl_level_estimate, sacpo.math.bon_select.kl_per_selection).

Here's the maths. With ties broken at random, π⁽ⁿ⁾(y)/p(y) = M_ℓ/q_ℓ on a reward level ℓ (base mass q_ℓ, CDF F_ℓ,
M_ℓ = F_ℓⁿ − (F_ℓ − q_ℓ)ⁿ), so the per-selection value log(M_ℓ/q_ℓ) is log π⁽ⁿ⁾(y)/p(y) and its expectation over
y ~ π⁽ⁿ⁾ is Σ_ℓ M_ℓ·log(M_ℓ/q_ℓ) = KL(π⁽ⁿ⁾‖p) exactly. The ε-estimator KL̂(ε) is exact only for an atom on a
continuum: with ε = p(y) it counts y's own level as mass below y and overestimates; with ε = q_ℓ it still counts
the lower levels as continuous.
"""

import math

import pytest
import torch

from sacpo.math.bon import (
    bon_kl_bound,
    bon_kl_estimate,
    bon_kl_exact,
    bon_kl_level_estimate,
    bon_level_frequencies,
    bon_pmf,
    bon_reward_levels,
)
from sacpo.math.bon_select import kl_per_selection, kl_stats, selected_levels

D = torch.float64


def expectation(p: torch.Tensor, r: torch.Tensor, n: int, estimate) -> torch.Tensor:
    """E_{y~π⁽ⁿ⁾}[estimate(F(y), q(y), p(y))], exactly (a sum over the pmf). (...,)"""
    F, q = bon_reward_levels(p, r)
    return (bon_pmf(p, r, n) * estimate(F, q, p)).sum(-1)


def test_the_tied_case_by_hand():
    """p = (0.1, 0.3, 0.2, 0.4), r = (0, 0, 1, 1), n = 2. Levels: low q₀ = F₀ = 0.4, high q₁ = 0.6, F₁ = 1.
    M₀ = 0.4² = 0.16, M₁ = 1 − 0.4² = 0.84, so π⁽²⁾ = (0.16·¼, 0.16·¾, 0.84·⅓, 0.84·⅔) = (0.04, 0.12, 0.28, 0.56)
    and KL = 0.16·log(0.16/0.4) + 0.84·log(0.84/0.6) = 0.16·log 0.4 + 0.84·log 1.4 = 0.136030.
    Level estimates: log 0.4 = −0.916291 (low), log 1.4 = 0.336472 (high); their mean under π⁽²⁾ is the KL.
    At n = 2, KL̂(ε) = (1−ε)²(log 2 − ½ + log(1−ε)) + ε(2−ε)·log(2−ε):
      ε = p(y):  KL̂ = 0.193059, 0.190492, 0.192406, 0.186438 → E = 0.188860 (+39%)
      ε = q_ℓ:   KL̂(0.4) = 0.186438, KL̂(0.6) = 0.166934 → E = 0.16·0.186438 + 0.84·0.166934 = 0.170054 (+25%)."""
    p = torch.tensor([0.1, 0.3, 0.2, 0.4], dtype=D)
    r = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=D)
    F, q = bon_reward_levels(p, r)
    assert F.tolist() == pytest.approx([0.4, 0.4, 1.0, 1.0]) and q.tolist() == pytest.approx(
        [0.4, 0.4, 0.6, 0.6]
    )
    assert bon_pmf(p, r, 2).tolist() == pytest.approx([0.04, 0.12, 0.28, 0.56], abs=1e-15)
    exact = 0.16 * math.log(0.4) + 0.84 * math.log(1.4)
    assert exact == pytest.approx(0.136030, abs=1e-6)
    assert bon_kl_exact(p, r, 2).item() == pytest.approx(exact, abs=1e-15)
    assert bon_kl_level_estimate(0.4, 0.4, 2) == pytest.approx(math.log(0.4), abs=1e-15)
    assert bon_kl_level_estimate(1.0, 0.6, 2) == pytest.approx(math.log(1.4), abs=1e-15)
    level = expectation(p, r, 2, lambda F, q, p: bon_kl_level_estimate(F, q, 2)).item()
    eps_p = expectation(p, r, 2, lambda F, q, p: bon_kl_estimate(p, 2)).item()
    eps_q = expectation(p, r, 2, lambda F, q, p: bon_kl_estimate(q, 2)).item()
    assert level == pytest.approx(exact, abs=1e-15)
    assert bon_kl_estimate(p, 2).tolist() == pytest.approx([0.193059, 0.190492, 0.192406, 0.186438], abs=1e-6)
    assert eps_p == pytest.approx(0.188860, abs=1e-6)
    assert eps_q == pytest.approx(0.170054, abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 10**6])
def test_the_level_estimate_is_unbiased_on_random_tied_cases(n):
    """E over the exact pmf (no sampling) of log(M/q) equals bon_kl_exact, on 200 random (p, r) with 2–6 tied
    levels over 12 outcomes (Dirichlet p, some outcomes of mass 0)."""
    g = torch.Generator().manual_seed(n)
    w = -torch.log(torch.rand(200, 12, generator=g, dtype=D))
    w[:20, :3] = 0.0  # zero-mass outcomes: their levels have q = 0 and are never selected
    p = w / w.sum(-1, keepdim=True)
    levels = torch.randint(2, 7, (200, 1), generator=g)
    r = (torch.rand(200, 12, generator=g, dtype=D) * levels).floor()
    F, q = bon_reward_levels(p, r)
    pos = q > 0  # a level of mass 0 is never selected (pmf 0) and has no estimate
    est = torch.zeros_like(p)
    est[pos] = bon_kl_level_estimate(F[pos], q[pos], n)
    level = (bon_pmf(p, r, n) * est).sum(-1)
    torch.testing.assert_close(level, bon_kl_exact(p, r, n), rtol=0, atol=1e-12)


def test_the_issue_case_epsilon_estimators_against_the_level_estimate():
    """K = 50 outcomes with the Dirichlet(1) p of `sacpo theory`'s tied case (`bon_cases(0)`), r = ⌊index/10⌋
    (5 levels of 10). Computed exactly: n = 64: exact 1.1929, E[KL̂(p(y))] 2.7976, E[KL̂(q_ℓ)] 1.1929; n = 8:
    0.9935, 1.2008, 1.0090. (The issue's 1.197 / 2.964 came from a p we do not have; this one is reproducible.)"""
    g = torch.Generator().manual_seed(0)
    (
        torch.randn(1000, generator=g, dtype=D),
        torch.randn(10, generator=g, dtype=D),
    )  # bon_cases' first two cases
    w = -torch.log(torch.rand(50, generator=g, dtype=D))
    p, r = w / w.sum(), (torch.arange(50) // 10).to(D)
    for n, want in ((64, (1.1929, 2.7976, 1.1929)), (8, (0.9935, 1.2008, 1.0090))):
        exact = bon_kl_exact(p, r, n).item()
        level = expectation(p, r, n, lambda F, q, p, n=n: bon_kl_level_estimate(F, q, n)).item()
        eps_p = expectation(p, r, n, lambda F, q, p, n=n: bon_kl_estimate(p, n)).item()
        eps_q = expectation(p, r, n, lambda F, q, p, n=n: bon_kl_estimate(q, n)).item()
        assert (exact, eps_p, eps_q) == pytest.approx(want, abs=1e-4)
        assert level == pytest.approx(exact, abs=1e-12)
        assert eps_p > eps_q > exact - 1e-9


def test_level_estimate_limits_types_and_validation():
    F = torch.tensor([1.0, 0.5, 0.3, 1.0], dtype=D)
    q = torch.tensor([1.0, 0.2, 0.3, 1e-300], dtype=D)
    assert bon_kl_level_estimate(F, q, 1).tolist() == [0.0] * 4  # n = 1: best-of-1 is p
    est = bon_kl_level_estimate(F, q, 16)
    assert est[0] == 0.0  # one level holding everything: π⁽ⁿ⁾ = p
    assert est[2] == pytest.approx(15 * math.log(0.3))  # the bottom level: M = qⁿ
    assert est[3] == pytest.approx(math.log(16), abs=1e-12)  # a tiny top level: M/q → n
    assert (est <= math.log(16) + 1e-12).all()  # M/q ≤ n·F^{n−1} ≤ n
    assert isinstance(bon_kl_level_estimate(0.5, 0.25, 3), float)
    for bad_F, bad_q in ((0.5, 0.0), (0.3, 0.5), (1.5, 0.5), (0.5, -0.1)):
        with pytest.raises(ValueError, match="0 < q <= F <= 1"):
            bon_kl_level_estimate(bad_F, bad_q, 4)


def test_level_frequencies_and_the_tie_rule_on_a_synthetic_pool():
    """Two prompts, M = 6 pooled base samples each, S = 2 selections, n = 2.
    Prompt 0, a discrete score: 3 is the score of two distinct responses (columns 3, 4), so selecting column 3
    gives F̂ = 6/6, q̂ = 2/6 and log(M̂/q̂) = log((1 − (2/3)²)·3) = log(5/3); selecting column 1 (score 2, also
    tied: column 2) gives F̂ = 4/6, q̂ = 2/6: log(((⅔)² − (⅓)²)·3) = log 1 = 0 (selected as often as p picks it).
    Prompt 1, a continuous score: column 1 ties only column 2, which is the *same* response (equal ids): no
    evidence of a discrete score, so the ε-estimator with ε = p(y) stays; column 5 is distinct from all."""
    score = torch.tensor([[1.0, 2.0, 2.0, 3.0, 3.0, 0.0], [0.1, 0.5, 0.5, 0.7, 0.2, 0.3]], dtype=D)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 1, 3, 4, 5]])
    col = torch.tensor([[3, 1], [1, 5]])
    logp = torch.tensor([[-3.0, -4.0], [-2.0, -5.0]], dtype=D)
    F, q = bon_level_frequencies(score, score.gather(1, col))
    torch.testing.assert_close(F, torch.tensor([[1.0, 4 / 6], [5 / 6, 3 / 6]], dtype=D))
    torch.testing.assert_close(q, torch.tensor([[2 / 6, 2 / 6], [2 / 6, 1 / 6]], dtype=D))
    levels = selected_levels(score, ids, col)
    assert levels[2].tolist() == [[True, True], [False, False]]
    per, used = kl_per_selection(logp, 2, levels)
    assert used.tolist() == [[True, True], [False, False]]
    assert per[0].tolist() == pytest.approx([math.log(5 / 3), 0.0], abs=1e-14)
    eps = bon_kl_estimate(logp.exp(), 2)
    assert torch.equal(per[1], eps[1])  # distinct (or repeated-only) scores: the ε-estimator, unchanged
    plain, none = kl_per_selection(logp, 2)  # no levels: the ε-estimator everywhere
    assert torch.equal(plain, eps) and not none.any()
    st = kl_stats(logp, 2, levels)
    assert st["level_fraction"] == 0.5 and st["bound"] == bon_kl_bound(2)
    assert st["estimate"] == pytest.approx(per.mean().item())
