"""Lagrange multipliers: a generic monotone λ calibration and the exact dual of the constrained KL problem.

Constrained alignment (Wachi et al. 2024, SACPO, problem statement and Lagrangian; Dai et al. 2023, Safe RLHF):

    max_π  E_x E_{y~π}[r(x,y)] − β·KL(π‖π_ref)   s.t.   E_x E_{y~π}[g(x,y)] ≥ b

Lagrangian relaxation with λ ≥ 0 gives π_λ ∝ π_ref·exp((r + λg)/β) and the dual function

    D(λ) = β·E_x log Σ_y π_ref(y|x)·exp((r + λg)/β) − λ·b,      D'(λ) = E_x E_{π_λ}[g] − b,

convex in λ (D'' = E_x Var_{π_λ}(g)/β ≥ 0). So λ* = 0 if π_0 already satisfies the constraint, and otherwise
E_{π_λ*}[g] = b, found by bisection on the monotone map λ ↦ E_{π_λ}[g]. `calibrate_lambda` is that bisection for
any monotone statistic (e.g. the cost of a constrained best-of-n policy as a function of its penalty λ).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sacpo.math.tabular import ArrayLike, as_distribution, as_scores, kl_regularized_optimum


def calibrate_lambda(
    fn: Callable[[float], float],
    target: float,
    *,
    increasing: bool = False,
    lo: float = 0.0,
    step: float = 1.0,
    xtol: float = 1e-12,
    rtol: float = 1e-12,
    max_lambda: float = 1e12,
    max_iter: int = 300,
) -> float:
    """Smallest λ ≥ lo at which a monotone statistic meets a threshold, by bracket expansion and bisection.

    increasing=False (default): fn is non-increasing in λ (e.g. expected cost under a penalty λ) and the
    constraint is fn(λ) ≤ target. increasing=True: fn is non-decreasing (e.g. expected safety E_{π_λ}[g]) and the
    constraint is fn(λ) ≥ target. Returns lo if it already satisfies the constraint; otherwise the upper bracket
    end, which always satisfies it, once the bracket is narrower than xtol + rtol·λ. For a continuous fn that is
    the root fn(λ) = target; for a step function (an empirical statistic) it is the jump point.
    The bracket [lo, lo + step·2^k] doubles until feasible; ValueError if λ would exceed max_lambda (infeasible).
    """
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step}")

    def feasible(lam: float) -> bool:
        value = float(fn(lam))
        if math.isnan(value):
            raise ValueError(f"fn({lam}) is NaN")
        return value >= target if increasing else value <= target

    if feasible(lo):
        return lo
    hi = lo + step
    while not feasible(hi):
        if hi > max_lambda:
            relation = ">=" if increasing else "<="
            raise ValueError(
                f"no λ <= {max_lambda:g} gives fn(λ) {relation} {target}; the target looks infeasible"
            )
        lo, step = hi, 2.0 * step
        hi = lo + step
    for _ in range(max_iter):
        if hi - lo <= xtol + rtol * abs(hi):
            break
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _expected_g(p: torch.Tensor, r: torch.Tensor, g: torch.Tensor, beta: float, lam: float) -> float:
    """E_x E_{π_λ}[g] with π_λ ∝ p·exp((r + λg)/β); the prompt average is uniform over leading dimensions."""
    return (kl_regularized_optimum(p, r + lam * g, beta) * g).sum(-1).mean().item()


def dual_objective(p: ArrayLike, r: ArrayLike, g: ArrayLike, beta: float, b: float, lam: float) -> float:
    """D(λ) = β·mean_x log Σ_y p(y|x)·exp((r + λg)/β) − λ·b (see the module docstring); p, r, g: (..., Y)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    p = as_distribution(p)
    r = as_scores(r, p, "r")
    g = as_scores(g, p, "g")
    log_z = torch.logsumexp(p.log() + (r + lam * g) / beta, dim=-1)  # (...,)
    return (beta * log_z.mean() - lam * b).item()


def constrained_optimum(
    p: ArrayLike, r: ArrayLike, g: ArrayLike, beta: float, b: float
) -> tuple[torch.Tensor, float]:
    """Exact solution (π*, λ*) of max E[r] − β·KL(π‖p) s.t. E[g] ≥ b on a finite space.

    π* = p·exp((r + λ*g)/β)/Z (the form of SACPO's optimum, Wachi et al. 2024), λ* = argmin_{λ≥0} D(λ): λ* = 0 when the
    unconstrained optimum already has E[g] ≥ b, otherwise E_{π*}[g] = b (to ~1e-12 in λ, never below b).
    p: (..., Y) probabilities (leading dimensions are prompts, averaged uniformly in the constraint, with one
    shared λ); r, g: broadcastable to p. Returns π* (..., Y) float64 and λ* as a float.
    ValueError if b ≥ mean_x max_{y: p(y|x)>0} g(x,y) and the constraint does not already hold: b above that is
    infeasible, and b equal to it is reached only as λ → ∞.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    p = as_distribution(p)
    r = as_scores(r, p, "r")
    g = as_scores(g, p, "g")
    if _expected_g(p, r, g, beta, 0.0) >= b:
        return kl_regularized_optimum(p, r, beta), 0.0
    g_max = g.masked_fill(p == 0, -math.inf).amax(-1).mean().item()  # best E[g] any policy ≪ p can reach
    if b >= g_max:
        raise ValueError(
            f"constraint E[g] >= b = {b} is infeasible: the largest E[g] under the support of p is {g_max} "
            "(reached only as λ → ∞)"
        )
    lam = calibrate_lambda(lambda lam: _expected_g(p, r, g, beta, lam), b, increasing=True)
    return kl_regularized_optimum(p, r + lam * g, beta), lam
