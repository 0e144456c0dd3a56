"""sacpo.math.lagrange and the closed-form optimum: λ calibration, the KL-regularised and constrained optima.

Here's the maths. π_λ ∝ p·exp((r + λg)/β) maximises E[r] − β·KL(π‖p) + λ·(E[g] − b), with value
D(λ) = β·log Z_λ − λ·b. If the constraint binds, E_{π_λ*}[g] = b and the primal value E[r] − β·KL equals D(λ*)
(strong duality); D is convex and minimised at λ*. By hand: p uniform on 2, r = (0, β·log 2) → π = (1/3, 2/3).
"""

import itertools
import math

import pytest
import torch

from sacpo.math.lagrange import calibrate_lambda, constrained_optimum, dual_objective
from sacpo.math.tabular import kl_regularized_optimum

D = torch.float64


def kl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.where(q > 0, q * (q / torch.where(p > 0, p, 1.0)).log(), 0.0).sum(-1)


def objective(q: torch.Tensor, p: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """E_q[r] − β·KL(q‖p), per prompt."""
    return (q * r).sum(-1) - beta * kl(q, p)


def problem(seed: int, prompts: int = 3, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(prompts, size, generator=g, dtype=D), -1)
    r = torch.randn(prompts, size, generator=g, dtype=D)
    cost = torch.randn(prompts, size, generator=g, dtype=D)
    return p, r, cost


# ------------------------------------------------------------------------------------------------ calibrate_lambda
def test_calibrate_decreasing_statistic_hits_the_target():
    lam = calibrate_lambda(lambda x: 1.0 / (1.0 + x), 0.25)
    assert lam == pytest.approx(3.0, abs=1e-9)
    assert 1.0 / (1.0 + lam) <= 0.25  # the returned end of the bracket is always feasible


def test_calibrate_increasing_statistic_and_bracket_expansion():
    lam = calibrate_lambda(lambda x: math.log1p(x), 10.0, increasing=True)
    assert lam == pytest.approx(math.expm1(10.0), rel=1e-10)


def test_calibrate_returns_lo_when_already_feasible():
    assert calibrate_lambda(lambda x: 0.1, 0.5) == 0.0
    assert calibrate_lambda(lambda x: 1.0 / (1.0 + x), 0.5, lo=2.0) == 2.0


def test_calibrate_step_function_returns_the_jump():
    # an empirical statistic: number of "violations" left, dropping at λ = 0.7 and at λ = 2.3
    def violations(lam: float) -> float:
        return float((lam < 0.7) + (lam < 2.3))

    assert calibrate_lambda(violations, 1.0) == pytest.approx(0.7, abs=1e-9)
    assert calibrate_lambda(violations, 0.0) == pytest.approx(2.3, abs=1e-9)


def test_calibrate_infeasible_and_nan_raise():
    with pytest.raises(ValueError, match="infeasible"):
        calibrate_lambda(lambda x: 1.0 / (1.0 + x), -0.1)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_lambda(lambda x: float("nan"), 0.0)


# ------------------------------------------------------------------------------------------------ KL-regularised
def test_kl_regularized_optimum_by_hand():
    beta = 0.3
    pi = kl_regularized_optimum([0.5, 0.5], [0.0, beta * math.log(2)], beta)
    torch.testing.assert_close(pi, torch.tensor([1 / 3, 2 / 3], dtype=D), rtol=0, atol=1e-15)


def test_kl_regularized_optimum_stable_and_keeps_zeros():
    pi = kl_regularized_optimum([0.5, 0.0, 0.5], [0.0, 1e4, 1e3], 1e-3)
    assert torch.isfinite(pi).all()
    torch.testing.assert_close(pi, torch.tensor([0.0, 0.0, 1.0], dtype=D), rtol=0, atol=0)


def test_kl_regularized_optimum_is_the_gibbs_maximiser():
    p, r, _ = problem(0)
    beta = 0.4
    pi = kl_regularized_optimum(p, r, beta)
    log_z = torch.logsumexp(p.log() + r / beta, -1)
    torch.testing.assert_close(objective(pi, p, r, beta), beta * log_z, rtol=0, atol=1e-12)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        q = torch.softmax(3 * torch.randn(p.shape, generator=gen, dtype=D), -1)
        assert (objective(q, p, r, beta) <= beta * log_z + 1e-12).all()


# ------------------------------------------------------------------------------------------------ constrained
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_constrained_optimum_binds(beta):
    p, r, g = problem(2)
    free = (kl_regularized_optimum(p, r, beta) * g).sum(-1).mean().item()
    b = free + 0.4
    pi, lam = constrained_optimum(p, r, g, beta, b)
    assert lam > 0
    assert (pi * g).sum(-1).mean().item() == pytest.approx(b, abs=1e-6)
    assert (pi * g).sum(-1).mean().item() >= b - 1e-12  # never on the infeasible side
    torch.testing.assert_close(pi, kl_regularized_optimum(p, r + lam * g, beta), rtol=0, atol=1e-15)


def test_constrained_optimum_slack_constraint_gives_lambda_zero():
    p, r, g = problem(3)
    beta = 0.5
    b = (kl_regularized_optimum(p, r, beta) * g).sum(-1).mean().item() - 0.1
    pi, lam = constrained_optimum(p, r, g, beta, b)
    assert lam == 0.0
    torch.testing.assert_close(pi, kl_regularized_optimum(p, r, beta), rtol=0, atol=0)


def test_strong_duality_and_dual_minimum():
    p, r, g = problem(4)
    beta = 0.3
    b = (kl_regularized_optimum(p, r, beta) * g).sum(-1).mean().item() + 0.3
    pi, lam = constrained_optimum(p, r, g, beta, b)
    primal = objective(pi, p, r, beta).mean().item()
    assert primal == pytest.approx(dual_objective(p, r, g, beta, b, lam), abs=1e-9)
    for delta in (1e-3, 1e-2, 0.1):
        assert dual_objective(p, r, g, beta, b, lam) <= dual_objective(p, r, g, beta, b, lam + delta)
        assert dual_objective(p, r, g, beta, b, lam) <= dual_objective(
            p, r, g, beta, b, max(lam - delta, 0.0)
        )


def test_constrained_optimum_beats_every_feasible_policy():
    p, r, g = problem(5, prompts=1)
    beta = 0.5
    b = (kl_regularized_optimum(p, r, beta) * g).sum(-1).item() + 0.5
    pi, _ = constrained_optimum(p, r, g, beta, b)
    best = objective(pi, p, r, beta).item()
    gen = torch.Generator().manual_seed(6)
    q = torch.softmax(3 * torch.randn(20_000, p.shape[-1], generator=gen, dtype=D), -1)
    feasible = (q * g).sum(-1) >= b
    assert feasible.sum() > 50
    assert (objective(q[feasible], p, r, beta) <= best + 1e-12).all()


def test_lambda_grows_and_value_falls_with_the_threshold():
    p, r, g = problem(7)
    beta = 0.5
    free = (kl_regularized_optimum(p, r, beta) * g).sum(-1).mean().item()
    g_max = g.amax(-1).mean().item()
    lams, values = [], []
    for b in torch.linspace(free - 0.2, g_max - 0.05, 8).tolist():
        pi, lam = constrained_optimum(p, r, g, beta, b)
        lams.append(lam)
        values.append(objective(pi, p, r, beta).mean().item())  # E[r] − β·KL; E[r] alone need not fall
    assert all(b_ <= a_ + 1e-12 for a_, b_ in itertools.pairwise(values))
    assert all(a_ <= b_ for a_, b_ in itertools.pairwise(lams))
    assert lams[0] == 0.0 and lams[-1] > 1.0


def test_infeasible_threshold_raises():
    p, r = torch.tensor([0.5, 0.5], dtype=D), torch.tensor([1.0, 0.0], dtype=D)
    g = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="infeasible"):
        constrained_optimum(p, r, g, 0.5, 1.5)
    with pytest.raises(ValueError, match="λ → ∞"):
        constrained_optimum(p, r, g, 0.5, 1.0)  # max g: reached only in the limit


def test_feasibility_only_counts_the_support_of_p():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=D)
    r, g = torch.tensor([1.0, 0.0, 0.0], dtype=D), torch.tensor([0.0, 1.0, 5.0], dtype=D)
    with pytest.raises(ValueError, match="infeasible"):
        constrained_optimum(p, r, g, 0.5, 2.0)  # g = 5 has p = 0: no policy ≪ p can use it
    pi, lam = constrained_optimum(p, r, g, 0.5, 0.9)
    assert pi[2].item() == 0.0 and (pi * g).sum().item() == pytest.approx(0.9, abs=1e-6) and lam > 0


def test_invalid_beta_raises():
    with pytest.raises(ValueError, match="beta"):
        constrained_optimum([0.5, 0.5], [0.0, 1.0], [1.0, 0.0], 0.0, 0.5)
    with pytest.raises(ValueError, match="beta"):
        kl_regularized_optimum([0.5, 0.5], [0.0, 1.0], -1.0)
