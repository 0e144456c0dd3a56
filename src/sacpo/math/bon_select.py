"""Best-of-n selection over cached candidate scores, and the statistics of a selection (pure torch).

Candidates are laid out (..., N) along the last dimension (N ≥ n; best-of-n uses the *first n*: candidates are
i.i.d., so any n of them are a best-of-n sample, and nested prefixes make the selected score non-decreasing in n).

    select_best:  argmax over the first n of the score r + λ·g (r when λ = 0; λ = ∞ ranks by g, then r), ties to
                  the largest seeded random key (`tie_keys`), i.e. uniformly at random and consistently across n, λ
    win_outcomes: 1[a > b] + ½·1[a = b]
    safety_values / safety_statistic:  constraint "prob" 1[g > threshold] → P(g > threshold); "mean" g → E[g]
    kl_stats:     KL(π⁽ⁿ⁾‖p) bound log n − (n−1)/n and the ε-estimator (Beirami et al. 2024) mean ± s.e.
"""

from __future__ import annotations

import math

import torch

from sacpo.math.bon import bon_kl_bound, bon_kl_estimate
from sacpo.math.kl import mean_and_stderr

CONSTRAINTS = ("prob", "mean")


def tie_keys(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform random keys, fixed per candidate (seeded): ties in score go to the largest key, i.e. uniformly at
    random among the tied candidates, and consistently across n (prefixes) and λ. float64 of `shape`."""
    g = torch.Generator().manual_seed(seed + 1_000_003)
    return torch.rand(shape, generator=g, dtype=torch.float64)


def select_best(
    reward: torch.Tensor,
    keys: torch.Tensor,
    n: int,
    safety: torch.Tensor | None = None,
    lam: float = 0.0,
) -> torch.Tensor:
    """Index in [0, n) of the best of the first n candidates along the last dimension.

    reward, keys (and safety): (..., N) with N ≥ n. Score r + λ·g (r when safety is None or λ = 0); λ = ∞ ranks
    by g first, then r. Ties in the score go to the largest key. Returns (...,) long.
    """
    if n < 1 or n > reward.shape[-1]:
        raise ValueError(f"n must be in [1, {reward.shape[-1]}], got {n}")
    criteria = [reward[..., :n]]
    if safety is not None and lam != 0.0:
        g = safety[..., :n]
        criteria = [g, reward[..., :n]] if math.isinf(lam) else [reward[..., :n] + lam * g]
    alive = torch.ones_like(criteria[0], dtype=torch.bool)  # (..., n)
    for c in criteria:
        masked = c.masked_fill(~alive, -math.inf)
        alive = alive & (masked == masked.amax(-1, keepdim=True))
    return keys[..., :n].masked_fill(~alive, -1.0).argmax(-1)


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (..., N), idx (...,) → (...,) the selected values."""
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def win_outcomes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1[a > b] + ½·1[a = b] elementwise (float64)."""
    return (a > b).double() + 0.5 * (a == b).double()


def safety_values(g: torch.Tensor, constraint: str, threshold: float = 0.0) -> torch.Tensor:
    """What the constraint averages, per selected response: 'prob' 1[g > threshold], 'mean' g (float64, g's
    shape)."""
    if constraint == "prob":
        return (g > threshold).double()
    if constraint == "mean":
        return g.double()
    raise ValueError(f"unknown constraint {constraint!r}; valid: {', '.join(CONSTRAINTS)}")


def safety_statistic(g: torch.Tensor, constraint: str, threshold: float = 0.0) -> float:
    """'prob': P(g > threshold); 'mean': E[g] — over all selected responses g (any shape)."""
    return safety_values(g, constraint, threshold).mean().item()


def prompt_mean_se(x: torch.Tensor) -> dict[str, float]:
    """{mean, se} over prompts of a (P, S) tensor: per-prompt means over the S draws first (draws of one prompt
    are correlated, prompts independent); se is NaN for < 2 prompts."""
    mean, se = mean_and_stderr(x.double().mean(-1))
    return {"mean": mean, "se": se}


def kl_stats(logp_selected: torch.Tensor, n: int) -> dict[str, float]:
    """KL(π⁽ⁿ⁾‖p) of a selection with base log-probs logp_selected (P, S): the bound log n − (n−1)/n and the
    ε-estimator KL̂(ε), ε = exp(logp), as mean ± s.e. over prompts. ValueError for a positive log-prob."""
    if (logp_selected > 1e-4).any():
        raise ValueError(
            f"a base log-prob is positive ({logp_selected.max().item():.3g}): not a log-probability"
        )
    eps = logp_selected.double().clamp(max=0.0).exp()  # the clamp only removes round-off above 0
    per = bon_kl_estimate(eps, n)  # (P, S)
    est = prompt_mean_se(per)
    return {"bound": bon_kl_bound(n), "estimate": est["mean"], "estimate_se": est["se"]}
