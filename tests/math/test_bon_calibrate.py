"""Calibration of λ for constrained best-of-n (sacpo.math.bon_calibrate): the bounds, the scan, its coverage.

Here's the maths. A λ passes when a lower confidence bound of the calibration statistic meets the target. For a
probability the Wilson score bound at n_eff = 1/(1/C + 1/H) uses the variance p(1−p) ≥ Var(prompt statistic), so
it does not shrink when few calibration prompts fail (m = 1 gives n/(n + z²), not 1); for a mean the t quantile
replaces z. λ is the last of a fixed descending sequence (∞, just above each jump point of the selection, 0) at
which the bound still held: a fixed-sequence test, valid without monotonicity of the bound.
"""

import math

import pytest
import torch

from sacpo.math.bon_calibrate import (
    TIE_NUDGE,
    calibrate_bon,
    lower_bound,
    resolve_bound,
    scan_lambdas,
    student_t_quantile,
    wilson_lower_bound,
)
from sacpo.math.bon_select import (
    safety_values,
    select_best,
    select_best_many,
    selection_jumps,
    take,
    tie_keys,
)
from sacpo.math.lagrange import calibrate_lambda

D = torch.float64
Z90 = 1.2815515655446004  # Φ⁻¹(0.9)


# ------------------------------------------------------------------------------------------------ bounds
def test_student_t_quantile_by_hand():
    # df = 1 is Cauchy: tan(π(p − ½)); df = 2: (2p − 1)/√(2p(1 − p)); tables: t₁₉(0.9), t₄(0.95), t₃(0.9)
    assert student_t_quantile(0.9, 1) == pytest.approx(math.tan(0.4 * math.pi), rel=1e-11)  # 3.077684
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-11)  # 12.706205
    assert student_t_quantile(0.9, 2) == pytest.approx(0.8 / math.sqrt(0.18), rel=1e-11)  # 1.885618
    assert student_t_quantile(0.9, 19) == pytest.approx(1.327728, abs=1e-6)
    assert student_t_quantile(0.95, 4) == pytest.approx(2.131847, abs=1e-6)
    assert student_t_quantile(0.9, 3) == pytest.approx(1.637744, abs=1e-6)
    assert student_t_quantile(0.9, 1e6) == pytest.approx(Z90, abs=1e-5)  # → Φ⁻¹
    assert student_t_quantile(0.5, 7) == 0.0
    with pytest.raises(ValueError):
        student_t_quantile(0.3, 5)


def test_wilson_and_t_bounds_by_hand():
    """x = (1, 0, 1, 1): m = 0.75, s = 0.5 (ddof 1), C = 4 prompts, H = 4 held out.
    Wilson at n_eff = 1/(¼ + ¼) = 2, z² = 1.642374: (0.75 + z²/4 − z·√(0.1875/2 + z²/16))/(1 + z²/2)
      = (1.160594 − 0.567946)/1.821187 = 0.325420.
    t: 0.75 − t₃(0.9)·0.5·√(¼ + ¼) = 0.75 − 1.637744·0.353553 = 0.170970 (normal: 0.75 − 1.281552·0.353553 = 0.296897).
    No failures among C = H = 20 prompts (m = 1, n_eff = 10): Wilson 10/(10 + z²) = 0.858931, where the t and
    normal bounds return 1 (s = 0) — the anti-conservative case of the issue."""
    x = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert lower_bound(x, 0.9, 4, "wilson") == pytest.approx(0.325420, abs=1e-6)
    assert lower_bound(x, 0.9, 4, "t") == pytest.approx(0.170970, abs=1e-6)
    assert lower_bound(x, 0.9, 4, "normal") == pytest.approx(0.75 - Z90 * 0.5 * math.sqrt(0.5), abs=1e-12)
    ones = torch.ones(20)
    assert lower_bound(ones, 0.9, 20, "wilson") == pytest.approx(10 / (10 + Z90**2), abs=1e-12)  # 0.858931
    assert lower_bound(ones, 0.9, 20, "t") == lower_bound(ones, 0.9, 20, "normal") == 1.0
    assert lower_bound(ones, 0.9, None, "wilson") == pytest.approx(20 / (20 + Z90**2), abs=1e-12)  # n_eff = C
    assert float(wilson_lower_bound(0.0, 10, Z90)) == 0.0
    for kind in ("wilson", "t", "normal"):
        assert lower_bound(x, 0.5, 4, kind) == 0.75  # confidence ½: the point estimate
    assert lower_bound(torch.tensor([0.9]), 0.9, 5, "t") == -math.inf  # one prompt: no spread for t
    assert resolve_bound("auto", "prob") == "wilson" and resolve_bound("auto", "mean") == "t"
    with pytest.raises(ValueError, match="probabilities"):
        resolve_bound("wilson", "mean")


# ------------------------------------------------------------------------------------------------ the scan
def test_selection_jumps_are_exactly_where_the_selection_changes():
    """Brute force over all pairs: λ_ij = (r_j − r_i)/(g_i − g_j) > 0 is a jump iff the selection differs just
    below and just above it; the envelope walk finds those and no others (continuous and discrete scores)."""
    g_ = torch.Generator().manual_seed(3)
    for discrete in (False, True):
        r, g = torch.randn(12, 6, generator=g_, dtype=D), torch.randn(12, 6, generator=g_, dtype=D)
        if discrete:
            r, g = r.round(), (g > 0).double() + (g > 1).double()
        keys = tie_keys((12, 6), 0)
        brute = set()
        for p in range(12):
            for i in range(6):
                for j in range(6):
                    if g[p, i] > g[p, j] and r[p, j] > r[p, i]:
                        lam = ((r[p, j] - r[p, i]) / (g[p, i] - g[p, j])).item()
                        lo, hi = (select_best(r[p], keys[p], 6, g[p], lam * f) for f in (1 - 1e-9, 1 + 1e-9))
                        if (g[p, lo], r[p, lo]) != (g[p, hi], r[p, hi]):
                            brute.add((p, round(lam, 9)))
        jumps = selection_jumps(r, g, 6)
        torch.testing.assert_close(jumps, torch.tensor(sorted(x for _, x in brute), dtype=D))


def test_scan_lambdas_sit_strictly_between_jumps_descending():
    jumps = torch.tensor([2.0, 1.0, 1.0, 1.0 + 1e-15, 3.0, 3.0 + 1e-7], dtype=D)
    pts = scan_lambdas(jumps)
    assert pts[-1] == 0.0 and (pts[:-1] > 0).all() and (pts[:-1].diff() < 0).all()
    # 1 and 1 + 1e-15 merge (round-off of one crossing); above 3: 3·(1 + 1e-6) would pass 3 + 1e-7, so halfway
    want = [
        3.0 + 1e-7 + (3.0 + 1e-7) * TIE_NUDGE,
        3.0 + 0.5e-7,
        2.0 * (1 + TIE_NUDGE),
        (1.0 + 1e-15) * (1 + TIE_NUDGE),
        (1.0 + 1e-15) * TIE_NUDGE,  # just above 0: ties in r go to the safer candidate
    ]
    torch.testing.assert_close(pts[:-1], torch.tensor(want, dtype=D), rtol=1e-15, atol=0)
    many = scan_lambdas(torch.arange(1, 5001, dtype=D), max_lambdas=100)
    assert many.numel() == 102 and many[0] > 5000 and many[-3] == pytest.approx(1 + TIE_NUDGE)
    assert scan_lambdas(torch.zeros(0, dtype=D)).tolist() == [TIE_NUDGE, 0.0]  # no jumps: 0⁺ and 0
    # select_best_many makes the same choices as select_best, λ by λ
    g_ = torch.Generator().manual_seed(0)
    r, g = torch.randn(5, 3, 7, generator=g_, dtype=D), torch.randn(5, 3, 7, generator=g_, dtype=D)
    keys, lams = tie_keys((5, 3, 7), 1), scan_lambdas(selection_jumps(r, g, 7))
    many = select_best_many(r, keys, 7, g, lams)
    assert all(torch.equal(many[k], select_best(r, keys, 7, g, lam.item())) for k, lam in enumerate(lams))


def test_the_scan_stops_at_the_first_failure_where_the_bound_is_not_monotone():
    """S = 1 draw, n = 2 candidates, constraint "mean" (t bound, confidence 0.9, population: √(1/C)), C = 3:
      prompt A: (r, g) = (1, 0.5) or (0, 1.5) — switches to g = 1.5 at λ = 1;
      prompts B, C: (10, 0.5) or (0, 1.5) — switch at λ = 10.
    λ < 1: g = (0.5, 0.5, 0.5), m = 0.5, s = 0: bound 0.5.
    1 < λ < 10: g = (1.5, 0.5, 0.5), m = 0.8333, s = 0.57735: bound 0.8333 − t₂(0.9)·0.57735/√3 = 0.2048.
    λ > 10: g = 1.5 everywhere: bound 1.5.
    Target 0.45: the scan passes ∞ and 10⁺, fails at 1⁺ and returns 10·(1 + 1e-6), the bottom of the passing run
    from above. Bisection on the same bound (the former method) tests λ = 0 first, finds it passing and returns 0."""
    r = torch.tensor([[[1.0, 0.0]], [[10.0, 0.0]], [[10.0, 0.0]]], dtype=D)  # (C=3, S=1, N=2)
    g = torch.tensor([[[0.5, 1.5]], [[0.5, 1.5]], [[0.5, 1.5]]], dtype=D)
    keys = tie_keys((3, 1, 2), 0)

    def bound(lam: float) -> float:
        per = take(g, select_best(r, keys, 2, g, lam)).mean(-1)
        return lower_bound(per, 0.9, None, "t")

    assert (
        bound(0.0) == 0.5
        and bound(5.0) == pytest.approx(5 / 6 - 1.885618 / 3, abs=1e-6)
        and bound(20.0) == 1.5
    )
    cal = calibrate_bon(r, g, keys, 2, 0.45, "mean", confidence=0.9, bound="t")
    assert cal.feasible and cal.lam == pytest.approx(10.0 * (1 + TIE_NUDGE), rel=1e-12)
    assert cal.statistic == 1.5 and cal.bound == 1.5 and cal.bound_kind == "t"
    assert (cal.candidates, cal.evaluations) == (5, 3)  # ∞, 10⁺, 1⁺, 0⁺, 0; tested ∞, 10⁺ and the failing 1⁺
    assert calibrate_lambda(bound, 0.45, increasing=True) == 0.0  # bisection: a different λ
    # everything passes: λ = 0; λ = ∞ failing: infeasible
    assert calibrate_bon(r, g, keys, 2, 0.1, "mean", confidence=0.9, bound="t").lam == 0.0
    inf = calibrate_bon(r, g, keys, 2, 1.6, "mean", confidence=0.9, bound="t")
    assert not inf.feasible and math.isinf(inf.lam) and inf.evaluations == 1


# ------------------------------------------------------------------------------------------------ coverage
def _world(g_: torch.Generator, trials: int, prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, P, S=4, N=8) rewards and safety: each prompt has its own safe rate ρ ~ Beta(4, 1) (ρ = U^¼; mean 0.8,
    most prompts near 1); g ~ Bernoulli(ρ) (1 = safe); unsafe answers are more rewarding (r = N(0, 1) + 1 − g),
    so plain best-of-n is less safe and λ has to buy safety."""
    rho = torch.rand(trials, prompts, 1, 1, generator=g_, dtype=D) ** 0.25
    g = (torch.rand(trials, prompts, 4, 8, generator=g_, dtype=D) < rho).double()
    return torch.randn(trials, prompts, 4, 8, generator=g_, dtype=D) + 1.0 - g, g


def test_coverage_of_the_heldout_constraint_by_simulation():
    """300 fresh seeded splits, C = 20 calibration and H = 20 held-out prompts, S = 4 draws, n = 8, constraint
    P(g > ½) ≥ 0.8 at confidence 0.9 (plain best-of-8 has P(safe) ≈ 0.59). Measured: the held-out statistic met
    the target in 300/300 splits (1.000; 2 of them infeasible, λ = ∞) with the Wilson bound (the default), in
    261/300 (0.870) with the former normal bound m − z·s·√(1/C + 1/H) — the issue's ≈ 0.85; the former bisection
    gives the same 261 — and in 262/300 (0.873) with the t bound: with few failing prompts s underestimates the
    spread, whatever the quantile. The Wilson bound is conservative with S > 1 draws (it bounds the per-prompt
    variance by p(1−p)) and costs reward: median λ 2.16 against 1.46, held-out P(safe) 0.951 against 0.871 and
    E[r] 1.398 against 1.533. Monte-Carlo s.e. of a coverage of 0.9 over 300 splits: 0.017."""
    trials, target = 300, 0.8
    g_ = torch.Generator().manual_seed(2024)
    r_c, g_c = _world(g_, trials, 20)
    r_h, g_h = _world(g_, trials, 20)
    k_c, k_h = tie_keys((trials, 20, 4, 8), 1), tie_keys((trials, 20, 4, 8), 2)
    met = {"wilson": 0, "normal": 0}
    for t in range(trials):
        for kind in met:
            cal = calibrate_bon(r_c[t], g_c[t], k_c[t], 8, target, "prob", 0.5, 0.9, 20, kind)
            held = safety_values(take(g_h[t], select_best(r_h[t], k_h[t], 8, g_h[t], cal.lam)), "prob", 0.5)
            met[kind] += held.mean().item() >= target
    cover = {k: v / trials for k, v in met.items()}
    assert cover["wilson"] >= 0.9 - 2.5 * math.sqrt(
        0.9 * 0.1 / trials
    )  # at least the confidence, up to MC noise
    assert cover["normal"] < 0.9  # the former bound is anti-conservative here (the issue)
