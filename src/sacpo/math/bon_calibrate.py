"""Calibration of λ for constrained best-of-n (inference-time SACPO), on cached candidate scores (pure torch).

Select by r + λ·g (g: safety, higher = safer) and find a small λ ≥ 0 whose selections meet

    constraint "prob":  P(g(x, y_sel) > threshold) ≥ target        constraint "mean":  E[g(x, y_sel)] ≥ target

with a margin: a one-sided lower confidence bound of the per-prompt statistic (`lower_bound`) must meet the
target. The bounds, for C calibration prompts and H held-out prompts (n_eff = 1/(1/C + 1/H)):

    "wilson" (default for "prob"):  Wilson score bound of the mean m at sample size n_eff (`wilson_lower_bound`)
    "t"      (default for "mean"):  m − t_{C−1}(confidence)·s·√(1/C + 1/H)       (s: spread over prompts)
    "normal" (the former rule):     m − z·s·√(1/C + 1/H),  z = Φ⁻¹(confidence)

The search is a fixed-sequence scan (Bates et al. 2021, "Distribution-free, risk-controlling prediction sets",
RCPS): the selection only changes at the jump points of the envelopes r_i + λ·g_i (`selection_jumps`), so the
candidate λ are λ = ∞ (safest first, then most rewarding), a point just above every jump in descending order,
one just above 0, and λ = 0; the scan walks down while the bound holds and returns the last λ that held.
Testing in a fixed order and stopping at the first failure needs no multiple-testing correction, and it does not
assume that the bound is monotone in λ (the point statistic is; a bound with s is not).
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

import torch

from sacpo.math.bon_select import safety_values, select_best, select_best_many, selection_jumps, take

TIE_NUDGE = 1e-6  # calibrate_bon: relative step past a jump point of the constraint statistic
BOUNDS = ("auto", "wilson", "t", "normal")
MAX_LAMBDAS = 2048  # calibrate_bon: at most this many jump points are scanned (thinned by rank beyond)


# ------------------------------------------------------------------------------------------------ quantiles
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
            -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), x ∈ [0, 1]."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with df > 0 degrees of freedom: 1 − ½·I_{df/(df+t²)}(df/2, ½) for t ≥ 0."""
    tail = 0.5 * _betainc(0.5 * df, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=256)
def student_t_quantile(p: float, df: float) -> float:
    """t_df(p), the p-quantile of Student's t (p ∈ [½, 1), df > 0), by bisection on `student_t_cdf` to 1e-13.

    Checks: df = 1 is Cauchy, tan(π(p − ½)); df = 2 has (2p − 1)/√(2p(1 − p)); df → ∞ tends to Φ⁻¹(p)."""
    if not 0.5 <= p < 1.0 or not df > 0:
        raise ValueError(f"need p in [0.5, 1) and df > 0, got p={p}, df={df}")
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------------------------------------ bounds
def resolve_bound(bound: str, constraint: str) -> str:
    """The bound a calibration uses: "auto" is Wilson for "prob" and Student t for "mean"; Wilson needs "prob"."""
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; valid: {', '.join(BOUNDS)}")
    if bound == "auto":
        return "wilson" if constraint == "prob" else "t"
    if bound == "wilson" and constraint != "prob":
        raise ValueError("the Wilson bound is for probabilities (constraint 'prob')")
    return bound


def effective_size(n_prompts: int, n_future: int | None = None) -> float:
    """n_eff = 1/(1/C + 1/H): the sample size whose variance p(1−p)/n_eff bounds that of the difference of the held-out
    and the calibration means (C, H prompts; H = None: the population mean, n_eff = C)."""
    return 1.0 / (1.0 / n_prompts + (1.0 / n_future if n_future else 0.0))


def wilson_lower_bound(m: torch.Tensor | float, n_eff: float, z: float) -> torch.Tensor:
    """Wilson score lower bound for a probability with mean m ∈ [0, 1] at sample size n_eff:

        LB = (m + z²/(2n) − z·√(m(1−m)/n + z²/(4n²))) / (1 + z²/n)

    the smaller root p of (m − p)² = z²·p(1−p)/n (Wilson 1927). It uses the variance p(1−p) of a [0, 1] variable
    with mean p — an upper bound on the variance of a prompt's mean over several draws — so it does not shrink
    to m when the calibration prompts happen to agree: m = 1 gives n/(n + z²). z = 0 gives m. float64 tensor."""
    m = torch.as_tensor(m, dtype=torch.float64).clamp(0.0, 1.0)
    z2n = z * z / n_eff
    centre = m + 0.5 * z2n
    half = z * torch.sqrt(m * (1.0 - m) / n_eff + 0.25 * z2n / n_eff)
    return ((centre - half) / (1.0 + z2n)).clamp(min=0.0)


def lower_bounds(
    per_prompt: torch.Tensor, confidence: float, n_future: int | None = None, bound: str = "normal"
) -> torch.Tensor:
    """`lower_bound` for K statistics at once: per_prompt (K, C) → (K,) float64 (bound: wilson | t | normal)."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if bound not in BOUNDS[1:]:
        raise ValueError(f"unknown bound {bound!r}; valid: {', '.join(BOUNDS[1:])}")
    x = per_prompt.double()
    c = x.shape[-1]
    if c == 0:
        raise ValueError("no prompts")
    m = x.mean(-1)
    if confidence == 0.5:
        return m
    z = statistics.NormalDist().inv_cdf(confidence)
    if bound == "wilson":
        return wilson_lower_bound(m, effective_size(c, n_future), z)
    if c < 2:
        return torch.full_like(m, -math.inf)
    quantile = student_t_quantile(confidence, c - 1) if bound == "t" else z
    return m - quantile * x.std(-1) / math.sqrt(effective_size(c, n_future))


def lower_bound(
    per_prompt: torch.Tensor, confidence: float, n_future: int | None = None, bound: str = "normal"
) -> float:
    """One-sided lower confidence bound on the mean of a prompt-level statistic; per_prompt (C,).

        "normal":  m − z·s·√(1/C + 1/H),   z = Φ⁻¹(confidence)       (the former rule, anti-conservative)
        "t":       m − t_{C−1}(confidence)·s·√(1/C + 1/H)            (Student t: the spread s is estimated)
        "wilson":  the Wilson score bound of m at n_eff = 1/(1/C + 1/H) (statistics in [0, 1])

    per_prompt: the statistic of each calibration prompt (its S draws averaged: draws of one prompt are correlated,
    prompts are independent), m its mean, s its standard deviation (ddof 1). H = n_future: the number of prompts
    the statistic will be measured on next (a held-out set): then LB bounds that set's mean — the difference of
    two independent means has variance σ²(1/C + 1/H), σ² ≤ p(1−p) for a probability — with probability ≈
    confidence; None bounds the population mean (√(1/C), n_eff = C). confidence = 0.5 returns m (the point
    estimate); with C < 2 and confidence > 0.5 the spread is unknown and the t / normal bounds are −∞."""
    x = per_prompt.double().flatten()
    return lower_bounds(x.unsqueeze(0), confidence, n_future, bound).item()


# ------------------------------------------------------------------------------------------------ the scan
def scan_lambdas(jumps: torch.Tensor, max_lambdas: int = MAX_LAMBDAS) -> torch.Tensor:
    """The finite λ of the scan, descending: a point just above every jump (strictly below the next one), one just
    above 0, and 0.

    jumps: (J,) λ > 0 where the selection may change (`selection_jumps`); near-duplicates (relative 1e-12, round-off
    of one crossing) are merged, keeping the largest. Above jump u_k the point is u_k + min(TIE_NUDGE·u_k,
    (u_{k+1} − u_k)/2): the statistic there is the value it takes on the whole open interval, never the value
    *at* a jump, where r + λ·g ties and the random tie keys decide. Just above 0 (TIE_NUDGE·u₁, or TIE_NUDGE
    without jumps) ties in r go to the safer candidate; at λ = 0 itself to the tie keys, as in plain best-of-n.
    With more than max_lambdas jumps, max_lambdas of them evenly spaced in rank (the largest and the smallest
    included) are used. Returns (K,) float64."""
    u = torch.unique(jumps.double())
    if u.numel() > 1:
        keep = torch.ones_like(u, dtype=torch.bool)
        keep[:-1] = u[1:] - u[:-1] > 1e-12 * u[1:]
        u = u[keep]
    gap = torch.cat([(u[1:] - u[:-1]) / 2, torch.full_like(u[-1:], math.inf)])
    pts = u + torch.minimum(TIE_NUDGE * u, gap)
    if pts.numel() > max_lambdas:
        idx = torch.linspace(0, pts.numel() - 1, max_lambdas).round().long().unique()
        pts = pts[idx]
    above_zero = TIE_NUDGE * (u[0].item() if u.numel() else 1.0)
    return torch.cat([pts.flip(0), torch.tensor([above_zero, 0.0], dtype=torch.float64)])


@dataclass(frozen=True)
class Calibration:
    """λ (math.inf when infeasible: the safest-first selection is used), whether the target is met on the
    calibration set, the statistic there, its lower confidence bound (the statistic itself at confidence ½), the
    number of λ tested in the scan (λ = ∞ first, up to and including the first failure), the bound used and the
    number of candidate λ in the scan (∞ and 0 included)."""

    lam: float
    feasible: bool
    statistic: float
    evaluations: int
    bound: float
    bound_kind: str = "normal"
    candidates: int = 1


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
    bound: str = "auto",
    max_lambdas: int = MAX_LAMBDAS,
) -> Calibration:
    """λ for best-of-n by r + λ·g on cached candidates (P, S, N): the smallest λ of the passing run of a scan.

    "Meets": `lower_bound` (kind `resolve_bound(bound, constraint)`) of the per-prompt statistic ≥ target. At
    confidence ½ that is the statistic itself (the point estimate: a held-out set then misses the target about half
    the time when λ sits at the edge); above ½ a margin is required, so a held-out set of H = heldout_prompts
    prompts (None: a bound on the population) meets the target with probability ≈ confidence.

    The scan (RCPS-style, Bates et al. 2021): λ = ∞, then `scan_lambdas` — just above each jump point of the
    selection, descending, then just above 0 — then λ = 0; it stops at the first λ whose bound misses the target
    and returns the λ before it, so every λ' ≥ λ in the sequence passed (for the monotone point statistic that is
    the smallest feasible λ, up to thinning beyond max_lambdas jumps; for a bound with a spread it may be larger
    than the smallest passing λ, never one past a failure). No λ sits *on* a jump, where r + λ·g ties between
    candidates and the tie keys decide: a λ is never feasible only thanks to lucky tie-breaking on the calibration
    set. Every evaluation only re-selects among the cached scores (vectorised over λ). Infeasible (λ = ∞ misses):
    λ = ∞."""
    kind = resolve_bound(bound, constraint)

    def stat_of(chosen: torch.Tensor) -> torch.Tensor:  # (..., P, S) → (..., P)
        g = take(safety.expand(*chosen.shape, safety.shape[-1]), chosen)
        return safety_values(g, constraint, threshold).mean(-1)

    def bounds_of(per: torch.Tensor) -> torch.Tensor:  # (K, P) → (K,)
        return lower_bounds(per, confidence, heldout_prompts, kind)

    safest = stat_of(select_best(reward, keys, n, safety, math.inf))  # (P,)
    best = bounds_of(safest.unsqueeze(0)).item()
    lams = scan_lambdas(selection_jumps(reward, safety, n), max_lambdas)  # (K,) descending, 0 last
    if best < target:
        return Calibration(math.inf, False, safest.mean().item(), 1, best, kind, lams.numel() + 1)
    last = (math.inf, safest.mean().item(), best)
    chunk = max(1, 2**22 // max(1, safety[..., :n].numel()))
    for start in range(0, lams.numel(), chunk):
        part = lams[start : start + chunk]
        per = stat_of(select_best_many(reward, keys, n, safety, part))  # (k, P)
        lb = bounds_of(per)  # (k,)
        fails = (lb < target).nonzero()
        stop = int(fails[0]) if fails.numel() else part.numel()
        if stop > 0:
            last = (part[stop - 1].item(), per[stop - 1].mean().item(), lb[stop - 1].item())
        if fails.numel():
            evaluations = 1 + start + stop + 1
            break
    else:
        evaluations = 1 + lams.numel()
    return Calibration(last[0], True, last[1], evaluations, last[2], kind, lams.numel() + 1)
