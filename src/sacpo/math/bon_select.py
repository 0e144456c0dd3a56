"""Best-of-n selection over cached candidate scores, and the statistics of a selection (pure torch).

Candidates are laid out (..., N) along the last dimension (N ≥ n; best-of-n uses the *first n*: candidates are
i.i.d., so any n of them are a best-of-n sample, and nested prefixes make the selected score non-decreasing in n).

    select_best:  argmax over the first n of the score r + λ·g (r when λ = 0; λ = ∞ ranks by g, then r), ties to
                  the largest seeded random key (`tie_keys`), i.e. uniformly at random and consistently across n, λ
    select_best_many / selection_jumps:  the same for many finite λ at once; the λ where the selection can change
    win_outcomes: 1[a > b] + ½·1[a = b]
    safety_values / safety_statistic:  constraint "prob" 1[g > threshold] → P(g > threshold); "mean" g → E[g]
    kl_stats:     KL(π⁽ⁿ⁾‖p) bound log n − (n−1)/n and the estimate mean ± s.e.: per selection the level
                  estimate log(M̂/q̂) where the selected score is tied with another response, else KL̂(ε = p(y))
"""

from __future__ import annotations

import math

import torch

from sacpo.math.bon import bon_kl_bound, bon_kl_estimate, bon_kl_level_estimate, bon_level_frequencies
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


def select_best_many(
    reward: torch.Tensor, keys: torch.Tensor, n: int, safety: torch.Tensor, lams: torch.Tensor
) -> torch.Tensor:
    """`select_best` by r + λ·g for K finite λ ≥ 0 at once (the same float operations, so the same choices).

    reward, keys, safety: (..., N) with N ≥ n; lams: (K,). Returns (K, ...) long, indices in [0, n)."""
    if n < 1 or n > reward.shape[-1]:
        raise ValueError(f"n must be in [1, {reward.shape[-1]}], got {n}")
    lam = lams.double().reshape(-1, *([1] * reward.dim()))  # (K, 1, .., 1)
    score = reward[..., :n] + lam * safety[..., :n]  # (K, ..., n)
    alive = score == score.amax(-1, keepdim=True)
    return keys[..., :n].expand_as(score).masked_fill(~alive, -1.0).argmax(-1)


def selection_jumps(reward: torch.Tensor, safety: torch.Tensor, n: int) -> torch.Tensor:
    """Every λ > 0 at which the best of the first n by r + λ·g changes, over all groups (sorted, with repeats).

    reward, safety: (..., N). Per group the selection follows the upper envelope of the lines r_i + λ·g_i: from
    the best at λ = 0⁺ (highest r, then highest g) the next candidate to overtake the current c is the one with
    g_j > g_c that crosses first, at λ_j = (r_c − r_j)/(g_j − g_c) (at a common crossing the largest g goes on).
    At most n − 1 jumps per group, found in at most n − 1 vectorised steps of O(groups·n). Returns (J,) float64.
    """
    r = reward[..., :n].reshape(-1, n).double()  # (G, n)
    g = safety[..., :n].reshape(-1, n).double()
    top = r == r.amax(-1, keepdim=True)
    cur = g.masked_fill(~top, -math.inf).argmax(-1)  # (G,) the selection at λ = 0⁺
    jumps = []
    for _ in range(n - 1):
        r_c, g_c = take(r, cur).unsqueeze(-1), take(g, cur).unsqueeze(-1)
        up = g > g_c  # (G, n) the lines that can still overtake
        cross = ((r_c - r) / torch.where(up, g - g_c, 1.0)).masked_fill(~up, math.inf)  # (G, n)
        nxt = cross.amin(-1)  # (G,)
        live = torch.isfinite(nxt)
        if not live.any():
            break
        jumps.append(nxt[live])
        at = (cross == nxt.unsqueeze(-1)) & live.unsqueeze(-1)
        cur = torch.where(live, g.masked_fill(~at, -math.inf).argmax(-1), cur)
    out = torch.cat(jumps) if jumps else torch.zeros(0, dtype=torch.float64)
    return out[out > 0].sort().values


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


def selected_levels(
    score: torch.Tensor, ids: torch.Tensor, col: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F̂, q̂, tied), each (P, S), of the selections at columns col (P, S) of a pool of base samples.

    score: (P, M) the selection score of every pooled response of each prompt (all i.i.d. base samples);
    ids: (P, M) equal for identical responses. F̂, q̂: `bon_level_frequencies` of the selected scores over the
    prompt's M responses; tied: the selected score equals that of another *distinct* response (ids differ) — the
    score is discrete there; a repeat of the same response is no evidence of that."""
    sel = score.gather(1, col)  # (P, S)
    f_hat, q_hat = bon_level_frequencies(score, sel)
    same = score.unsqueeze(1) == sel.unsqueeze(-1)  # (P, S, M)
    other = ids.unsqueeze(1) != ids.gather(1, col).unsqueeze(-1)
    return f_hat, q_hat, (same & other).any(-1)


def kl_per_selection(
    logp_selected: torch.Tensor,
    n: int,
    levels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-selection KL(π⁽ⁿ⁾‖p) estimates (P, S) and where the level estimate was used (P, S) bool.

    levels = (F̂, q̂, tied), each (P, S) (`sacpo.math.bon.bon_level_frequencies` of the selection score over the
    prompt's base samples, and whether the selected score ties another *distinct* response): where tied, the
    score is discrete there and the estimate is log(M̂/q̂), M̂ = F̂^n − (F̂ − q̂)^n (`bon_kl_level_estimate`,
    unbiased under ties); elsewhere — and everywhere when levels is None — the ε-estimator KL̂(ε), ε = p(y_sel|x)
    = exp(logp) (Beirami et al. 2024, §4; exact for a continuous score, whose distinct responses never tie).
    ValueError for a positive log-prob."""
    if (logp_selected > 1e-4).any():
        raise ValueError(
            f"a base log-prob is positive ({logp_selected.max().item():.3g}): not a log-probability"
        )
    eps = logp_selected.double().clamp(max=0.0).exp()  # the clamp only removes round-off above 0
    per = bon_kl_estimate(eps, n)  # (P, S)
    if levels is None:
        return per, torch.zeros_like(per, dtype=torch.bool)
    f_hat, q_hat, tied = levels
    tied = tied & (q_hat > 0)
    if tied.any():
        per = per.clone()
        per[tied] = bon_kl_level_estimate(f_hat[tied], q_hat[tied], n)
    return per, tied


def kl_stats(
    logp_selected: torch.Tensor,
    n: int,
    levels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """KL(π⁽ⁿ⁾‖p) of a selection with base log-probs logp_selected (P, S): the bound log n − (n−1)/n, the
    estimate (`kl_per_selection`: level estimate where the selected score is tied, else KL̂(ε = p(y))) as mean ±
    s.e. over prompts, and level_fraction, the fraction of selections whose estimate is the level estimate."""
    per, level = kl_per_selection(logp_selected, n, levels)
    est = prompt_mean_se(per)
    return {
        "bound": bon_kl_bound(n),
        "estimate": est["mean"],
        "estimate_se": est["se"],
        "level_fraction": level.double().mean().item(),
    }
