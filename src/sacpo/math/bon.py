"""Exact best-of-n on a finite space: pmf, KL to the base policy, the log n − (n−1)/n bound, the ε-estimator, win rate.

Best-of-n draws y_1..y_n i.i.d. from p and returns the one with the highest reward r. With the reward CDF and
strict CDF of the base policy

    F(y) = P_{y'~p}(r(y') ≤ r(y)),      F⁻(y) = P_{y'~p}(r(y') < r(y)),

a reward level ℓ (the outcomes sharing one reward value, base mass q_ℓ = F − F⁻) is selected with probability
F^n − F⁻^n (all n draws at or below ℓ, not all strictly below). Ties are broken at random, so the level's mass is
shared among its outcomes in proportion to p — the law of "the first of the n draws with the highest reward",
i.e. of `argmax` over sampled rewards. Hence

    π⁽ⁿ⁾(y) = (F(y)^n − F⁻(y)^n)·p(y)/q_ℓ(y)                    (= F^n − F⁻^n for distinct rewards)
    KL(π⁽ⁿ⁾‖p) = Σ_ℓ M_ℓ·log(M_ℓ/q_ℓ),   M_ℓ = F_ℓ^n − F⁻_ℓ^n   ≤ log n − (n−1)/n

For a *sampled* selection, log(M_ℓ/q_ℓ) = log π⁽ⁿ⁾(y)/p(y) is then known from the level alone: with F and q of
the selected reward (estimated from base samples) it is an unbiased per-selection KL estimate under ties
(`bon_kl_level_estimate`, `bon_level_frequencies`), where the ε-estimator with ε = p(y) is not.

References: Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy" (§2 the pmf, §3 the
upper bound and its looseness, e.g. the binary example KL = log 2 − h(2⁻ⁿ), §4 the estimator KL̂(ε), §5 the win
rate ≤ n/(n+1)); Beirami, "LM alignment: theory & practice" (tutorial). All results are float64 tensors.
"""

from __future__ import annotations

import math
import numbers

import torch

from sacpo.math.tabular import ArrayLike, as_distribution

TIE_RULES = ("random", "index")
REDUCTIONS = ("none", "mean")


# ------------------------------------------------------------------------------------------------ validation
def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return int(n)


def _check_n_tensor(n: int | torch.Tensor) -> torch.Tensor:
    """Vectorised n: an int or an integer-valued tensor, all >= 1; returned as float64."""
    if isinstance(n, torch.Tensor):
        t = n.to(torch.float64)
        if not torch.isfinite(t).all() or (t < 1).any() or (t != t.floor()).any():
            raise ValueError("n must hold integers >= 1")
        return t
    return torch.tensor(float(_check_n(n)), dtype=torch.float64)


def _inputs(p: ArrayLike, r: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    p = as_distribution(p)
    r = torch.as_tensor(r, dtype=torch.float64)
    if r.shape != p.shape:
        raise ValueError(f"p and r must have the same shape, got {tuple(p.shape)} and {tuple(r.shape)}")
    if torch.isnan(r).any():
        raise ValueError("r must not contain NaN")
    return p, r


# ------------------------------------------------------------------------------------------------ levels
def _levels(
    p: torch.Tensor, r: torch.Tensor, ties: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort by reward and group into levels. Returns (order, level, q, log_F, log_F_below), all (..., Y).

    order: outcome indices sorted by ascending reward; level[i]: level id of the i-th sorted outcome (levels are
    numbered 0.. in ascending reward, unused ids have q = 0); q: base mass per level id; log_F, log_F_below: log of
    the CDF F and strict CDF F⁻ at each level id. F is summed from below while ≤ ½ and as 1 − (mass above) beyond,
    so that F = 1 exactly at the top and F^n keeps its accuracy for huge n.
    ties="index" makes every outcome its own level, the lower index ranking higher among equal rewards.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r}; valid: {', '.join(TIE_RULES)}")
    n_out = r.shape[-1]
    if ties == "random":
        order = torch.argsort(r, dim=-1, stable=True)  # (..., Y)
        r_sorted = r.gather(-1, order)  # (..., Y)
        new_level = (r_sorted[..., 1:] != r_sorted[..., :-1]).long()  # (..., Y−1)
        first = torch.zeros(*r.shape[:-1], 1, dtype=torch.long)
        level = torch.cat([first, new_level.cumsum(-1)], dim=-1)  # (..., Y)
    else:  # stable sort of the reversed array puts higher indices first within a tie
        order = n_out - 1 - torch.argsort(r.flip(-1), dim=-1, stable=True)  # (..., Y)
        level = torch.arange(n_out).expand(r.shape)  # (..., Y)
    p_sorted = p.gather(-1, order)  # (..., Y)
    q = torch.zeros_like(p).scatter_add(-1, level, p_sorted)  # (..., Y) mass per level id
    below_incl = q.cumsum(-1)  # (..., Y) F
    above_incl = q.flip(-1).cumsum(-1).flip(-1)  # (..., Y) 1 − F⁻
    above = torch.cat([above_incl[..., 1:], torch.zeros_like(q[..., :1])], dim=-1)  # (..., Y) 1 − F
    log_F = torch.where(below_incl <= 0.5, below_incl.log(), torch.log1p(-above))  # (..., Y)
    log_F_below = torch.cat([torch.full_like(q[..., :1], -math.inf), log_F[..., :-1]], dim=-1)  # (..., Y)
    return order, level, q, log_F, log_F_below


def _log_level_mass(q: torch.Tensor, log_F: torch.Tensor, n: int) -> torch.Tensor:
    """log M = log(F^n − (F − q)^n) = n·log F + log(−expm1(n·log1p(−q/F))); −inf where q = 0. Shapes (..., Y).

    Written with q/F rather than F⁻ so that a level whose mass is below the round-off of F keeps M ≈ n·F^{n−1}·q.
    """
    pos = q > 0
    log_F = torch.where(pos, log_F, 0.0)
    ratio = (q * torch.exp(-log_F)).clamp(max=1.0)  # q/F ∈ [0, 1]; the clamp only absorbs fp round-off
    log_mass = n * log_F + torch.log(-torch.expm1(n * torch.log1p(-ratio)))
    return torch.where(pos, log_mass, -math.inf)


# ------------------------------------------------------------------------------------------------ pmf and KL
def bon_pmf(p: ArrayLike, r: ArrayLike, n: int, ties: str = "random") -> torch.Tensor:
    """Exact best-of-n pmf π⁽ⁿ⁾(y) = (F(y)^n − F⁻(y)^n)·p(y)/q_ℓ(y) (Beirami et al. 2024, §2).

    p: (..., Y) base probabilities; r: (..., Y) rewards; n ≥ 1. ties="random" shares a tied level's mass in
    proportion to p (the law of argmax over n sampled rewards); ties="index" ranks equal rewards by index, lower
    index higher (a deterministic order: every outcome is its own level). Returns (..., Y) float64; n = 1 gives p.
    """
    n = _check_n(n)
    p, r = _inputs(p, r)
    order, level, q, log_F, _ = _levels(p, r, ties)
    mass = _log_level_mass(q, log_F, n).exp()  # (..., Y) per level id
    q_of = q.gather(-1, level)  # (..., Y) level mass of each sorted outcome
    p_sorted = p.gather(-1, order)
    share = torch.where(q_of > 0, p_sorted / torch.where(q_of > 0, q_of, 1.0), 0.0)  # (..., Y)
    pmf_sorted = mass.gather(-1, level) * share  # (..., Y)
    return torch.zeros_like(p).scatter(-1, order, pmf_sorted)


def bon_reward_levels(p: ArrayLike, r: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Per outcome y: F(y) = P_p(r ≤ r(y)) and the mass q(y) = P_p(r = r(y)) of its reward level. (..., Y) each."""
    p, r = _inputs(p, r)
    order, level, q, log_F, _ = _levels(p, r, "random")
    f_sorted, q_sorted = log_F.gather(-1, level).exp(), q.gather(-1, level)
    return torch.zeros_like(p).scatter(-1, order, f_sorted), torch.zeros_like(p).scatter(-1, order, q_sorted)


def bon_kl_exact(p: ArrayLike, r: ArrayLike, n: int, ties: str = "random") -> torch.Tensor:
    """Exact KL(π⁽ⁿ⁾‖p) = Σ_ℓ M_ℓ·log(M_ℓ/q_ℓ), M_ℓ = F_ℓ^n − F⁻_ℓ^n (within a level π⁽ⁿ⁾/p is constant).

    p, r: (..., Y); returns (...,) in nats. Always ≤ `bon_kl_bound(n)` (Beirami et al. 2024, Thm. 3.1) and
    ties="index" gives a KL at least that of ties="random" (a refinement).
    """
    n = _check_n(n)
    p, r = _inputs(p, r)
    _, _, q, log_F, _ = _levels(p, r, ties)
    log_mass = _log_level_mass(q, log_F, n)  # (..., Y)
    keep = log_mass > -math.inf  # levels with q = 0, or whose M underflows, contribute 0
    terms = log_mass.exp() * (log_mass - torch.where(keep, q, 1.0).log())  # (..., Y)
    return torch.where(keep, terms, 0.0).sum(-1)


def bon_kl_bound(n: int | torch.Tensor) -> float | torch.Tensor:
    """log n − (n−1)/n, the classic "KL of best-of-n" — an upper bound, not the value (Beirami et al. 2024, Thm. 3.1).

    n: an int (returns a float) or an integer-valued tensor (returns a float64 tensor of the same shape).
    """
    t = _check_n_tensor(n)
    out = t.log() - (t - 1.0) / t
    return out if isinstance(n, torch.Tensor) else out.item()


def bon_kl_estimate(
    eps: float | torch.Tensor, n: int | torch.Tensor, reduce: str = "none"
) -> float | torch.Tensor:
    """Beirami et al.'s KL estimator (2024, §4), with ε = p(y) of the selected outcome y:

        KL̂(ε) = (1−ε)^n·(log n + (n−1)·log(1−ε) − (n−1)/n) + (1 − (1−ε)^n)·log((1 − (1−ε)^n)/ε)

    It is the exact KL when y is an atom of mass ε on top of a continuous reward distribution; it lies in
    [0, log n − (n−1)/n], tends to the bound as ε → 0 and is 0 at ε = 1 or n = 1. Evaluated with log1p/expm1 so
    that tiny ε (down to the smallest float64) is accurate; ε = 0 gives the limit, the bound.

    eps: a float or a tensor of ε ∈ [0, 1] (e.g. the base probabilities of the selected samples); n broadcasts with
    it. reduce="none" returns one value per ε (a float for a float ε and int n), "mean" their mean — the estimate of
    KL(π⁽ⁿ⁾‖p) averaged over the selected samples.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; valid: {', '.join(REDUCTIONS)}")
    e = torch.as_tensor(eps, dtype=torch.float64)
    if torch.isnan(e).any() or (e < 0).any() or (e > 1).any():
        raise ValueError("eps must lie in [0, 1]")
    nn = _check_n_tensor(n)
    e, nn = torch.broadcast_tensors(e, nn)
    interior = (e > 0) & (e < 1)
    e_in = torch.where(interior, e, 0.5)
    log_keep = nn * torch.log1p(-e_in)  # log (1−ε)^n
    keep = log_keep.exp()  # (1−ε)^n
    win = -torch.expm1(log_keep)  # 1 − (1−ε)^n, accurate for tiny ε
    est = keep * (nn.log() + (nn - 1.0) * torch.log1p(-e_in) - (nn - 1.0) / nn) + win * (
        win.log() - e_in.log()
    )
    bound = nn.log() - (nn - 1.0) / nn
    out = torch.where(interior, est, torch.where(e == 0, bound, torch.zeros_like(est)))
    if reduce == "mean":
        out = out.mean()
    scalar_in = isinstance(eps, numbers.Real) and not isinstance(n, torch.Tensor)
    return out.item() if scalar_in else out


def bon_kl_level_estimate(F: float | torch.Tensor, q: float | torch.Tensor, n: int) -> float | torch.Tensor:
    """KL estimate of one best-of-n selection whose reward level has base CDF F and base mass q (ties random):

        log(M/q),   M = F^n − (F − q)^n      (F = P_p(r ≤ r_sel), q = P_p(r = r_sel), 0 < q ≤ F ≤ 1)

    Within a level π⁽ⁿ⁾/p = M_ℓ/q_ℓ, so this is log π⁽ⁿ⁾(y)/p(y) itself and E_{y~π⁽ⁿ⁾}[log(M/q)] =
    Σ_ℓ M_ℓ·log(M_ℓ/q_ℓ) = `bon_kl_exact`: unbiased for any reward, tied or not (Beirami et al. 2024, §2's pmf).
    Why not the ε-estimator (§4) under ties: KL̂(ε) is exact for an atom of mass ε on top of a *continuous*
    reward distribution. ε = p(y) counts the rest of y's own level as mass strictly below y, so it overestimates
    (K = 50 outcomes, Dirichlet p, 5 levels of 10, n = 64: exact 1.193, E[KL̂(p(y))] 2.798); ε = q_ℓ counts the
    levels below as continuous, a smaller bias that vanishes only once the top level is selected almost surely
    (n = 8 there: exact 0.994, E[KL̂(q_ℓ)] 1.009, E[log(M/q)] 0.994). A single value can be negative (a level
    selected less often than p picks it) or exceed the bound log n − (n−1)/n; only the mean estimates the KL.

    F, q: floats or broadcastable tensors (e.g. (P, S) per selection); n ≥ 1. Returns float64 of the broadcast
    shape (a float for float inputs); exactly 0 at n = 1.
    """
    n = _check_n(n)
    f_t = torch.as_tensor(F, dtype=torch.float64)
    q_t = torch.as_tensor(q, dtype=torch.float64)
    f_t, q_t = torch.broadcast_tensors(f_t, q_t)
    bad = ~((q_t > 0) & (f_t <= 1.0 + 1e-12) & (q_t <= f_t * (1.0 + 1e-12)))
    if bad.any():
        raise ValueError("need 0 < q <= F <= 1 (the base mass of the selected level and the CDF at it)")
    f_t = f_t.clamp(max=1.0)
    log_mass = _log_level_mass(q_t.clamp(max=f_t), f_t.log(), n)
    out = torch.zeros_like(f_t) if n == 1 else log_mass - q_t.log()
    scalar_in = isinstance(F, numbers.Real) and isinstance(q, numbers.Real)
    return out.item() if scalar_in else out


def bon_level_frequencies(pool: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plug-in (F̂, q̂) of selected rewards from base samples of the same prompt:

        F̂ = #{pool ≤ r_sel}/M,   q̂ = #{pool = r_sel}/M

    pool: (P, M) rewards of M i.i.d. base-policy samples per prompt; selected: (P, S) rewards of selections.
    Returns two (P, S) float64 tensors. q̂ > 0 whenever the selected response is itself in the pool (as in
    `sacpo bon`, whose every candidate is a base sample); q̂ = 0 marks a reward the pool never produced.
    """
    if pool.dim() != 2 or selected.dim() != 2 or pool.shape[0] != selected.shape[0]:
        raise ValueError(
            f"pool (P, M) and selected (P, S) expected, got {tuple(pool.shape)}, {tuple(selected.shape)}"
        )
    a = pool.unsqueeze(1)  # (P, 1, M)
    b = selected.unsqueeze(-1)  # (P, S, 1)
    return (a <= b).double().mean(-1), (a == b).double().mean(-1)


# ------------------------------------------------------------------------------------------------ win rate
def bon_win_rate_exact(p: ArrayLike, r: ArrayLike, n: int) -> torch.Tensor:
    """P(r(y_bon) > r(y)) + ½·P(r(y_bon) = r(y)), y_bon ~ π⁽ⁿ⁾, y ~ p independent (Beirami et al. 2024, §5):

        win = 1 − ½·E_{y~p}[F(y)^n + F⁻(y)^n] = 1 − Σ_ℓ q_ℓ·(F_ℓ^n + F⁻_ℓ^n)/2.

    The sum is the trapezoid rule for ∫₀¹ uⁿ du = 1/(n+1) on the grid of reward levels; uⁿ is convex, so
        n/(n+1) − ½·max_ℓ q_ℓ ≤ win ≤ n/(n+1),
    with equality for n = 1 (win = ½, ties included) and strict inequality for n ≥ 2; the gap vanishes only as the
    largest level mass → 0 (e.g. uniform p over K distinct rewards, n = 2: win = 2/3 − 1/(6K²)).
    p, r: (..., Y); returns (...,). Ties in reward count ½, so the tie rule of the pmf does not matter.
    """
    n = _check_n(n)
    p, r = _inputs(p, r)
    _, _, q, log_F, log_F_below = _levels(p, r, "random")
    return 1.0 - 0.5 * (q * ((n * log_F).exp() + (n * log_F_below).exp())).sum(-1)


def bon_win_rate_bound(n: int | torch.Tensor) -> float | torch.Tensor:
    """n/(n+1), the win rate of best-of-n against the base policy for a continuous reward (Beirami et al. 2024, §5);
    an upper bound on finite spaces. n: int → float, integer-valued tensor → float64 tensor."""
    t = _check_n_tensor(n)
    out = t / (t + 1.0)
    return out if isinstance(n, torch.Tensor) else out.item()
