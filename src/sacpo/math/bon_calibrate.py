"""Calibration of λ for constrained best-of-n (inference-time SACPO), on cached candidate scores (pure torch).

Select by r + λ·g (g: safety, higher = safer) and find the smallest λ ≥ 0 whose selections meet

    constraint "prob":  P(g(x, y_sel) > threshold) ≥ target        constraint "mean":  E[g(x, y_sel)] ≥ target

with a margin: the one-sided lower confidence bound m − z·s·√(1/C + 1/H) of the per-prompt statistic
(`lower_bound`; s its spread over the C calibration prompts, H held-out prompts, z = Φ⁻¹(confidence)) must meet
the target. The statistic is monotone in λ (for λ₁ < λ₂ the two maximisers satisfy (λ₂ − λ₁)(g₂ − g₁) ≥ 0), so
bisection (`sacpo.math.lagrange.calibrate_lambda`) is valid; λ = ∞ (safest first, then most rewarding) missing
the target means infeasible.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from sacpo.math.bon_select import safety_values, select_best, take
from sacpo.math.lagrange import calibrate_lambda

TIE_NUDGE = 1e-6  # calibrate_bon: relative step past a jump point of the constraint statistic


def lower_bound(per_prompt: torch.Tensor, confidence: float, n_future: int | None = None) -> float:
    """One-sided lower confidence bound on the mean of a prompt-level statistic (normal approximation).

        LB = m − z·s·√(1/C + 1/H),   z = Φ⁻¹(confidence)

    per_prompt: (C,) the statistic of each calibration prompt (its S draws averaged: draws of one prompt are
    correlated, prompts are independent), m its mean, s its standard deviation (ddof 1). H = n_future: the number
    of prompts the statistic will be measured on next (a held-out set): then LB bounds that set's mean — the
    difference of two independent means has variance s²(1/C + 1/H) — with probability ≈ confidence; None bounds
    the population mean (√(1/C)). confidence = 0.5 returns m (the point estimate); with C < 2 and confidence > 0.5
    the spread is unknown and the bound is −∞."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    x = per_prompt.double().flatten()
    if x.numel() == 0:
        raise ValueError("no prompts")
    m = x.mean().item()
    if confidence == 0.5:
        return m
    if x.numel() < 2:
        return -math.inf
    z = statistics.NormalDist().inv_cdf(confidence)
    scale = math.sqrt(1.0 / x.numel() + (1.0 / n_future if n_future else 0.0))
    return m - z * x.std().item() * scale


@dataclass(frozen=True)
class Calibration:
    """λ (math.inf when infeasible: the safest-first selection is used), whether the target is met on the
    calibration set, the statistic there, its lower confidence bound (the statistic itself at confidence ½), and
    the number of selections it took (each a re-selection only)."""

    lam: float
    feasible: bool
    statistic: float
    evaluations: int
    bound: float


def calibrate_bon(
    reward: torch.Tensor,
    safety: torch.Tensor,
    keys: torch.Tensor,
    n: int,
    target: float,
    constraint: str = "prob",
    threshold: float = 0.0,
    confidence: float = 0.5,
    heldout_prompts: int | None = None,
) -> Calibration:
    """Smallest λ ≥ 0 at which best-of-n by r + λ·g meets the target on cached candidates (P, S, N).

    "Meets": `lower_bound` of the per-prompt statistic ≥ target. At confidence ½ that is the statistic itself (the
    point estimate: a held-out set then misses the target about half the time when λ sits at the edge); above ½
    a margin z·s·√(1/C + 1/H) is required (heldout_prompts = H, None = a bound on the population), so a held-out
    set of H prompts meets the target with probability ≈ confidence. The point statistic is monotone in λ, so
    bisection finds its jump; the bound subtracts a spread that need not be monotone, so with confidence > ½ the λ
    returned always meets it but may lie above the smallest such λ (conservative).

    The statistic is a step function of λ; its jumps are the λ₀ where r + λ₀·g ties between two candidates, and
    *at* λ₀ its value depends on how the random tie keys fell. A λ₀ found feasible only thanks to the tie-break is
    not used: a λ > 0 is returned as λ·(1 + 1e-6), just past the jump, where the statistic takes its upper value
    (monotone, so the target still holds on the calibration set; the held-out set does not inherit the luck of the
    calibration set's ties). Every evaluation only re-selects among the cached scores. Infeasible (λ = ∞ misses
    the target): λ = ∞."""
    count = 0

    def per_prompt(lam: float) -> torch.Tensor:
        nonlocal count
        count += 1
        g = take(safety, select_best(reward, keys, n, safety, lam))  # (P, S)
        return safety_values(g, constraint, threshold).mean(-1)  # (P,)

    def bound(lam: float) -> float:
        return lower_bound(per_prompt(lam), confidence, heldout_prompts)

    safest = per_prompt(math.inf)
    best = lower_bound(safest, confidence, heldout_prompts)
    if best < target:
        return Calibration(math.inf, False, safest.mean().item(), count, best)
    lam = calibrate_lambda(bound, target, increasing=True, xtol=1e-9, rtol=1e-9)
    if lam > 0:
        lam *= 1.0 + TIE_NUDGE  # past a jump point: not feasible by tie-breaking luck
    final = per_prompt(lam)
    return Calibration(lam, True, final.mean().item(), count, lower_bound(final, confidence, heldout_prompts))
