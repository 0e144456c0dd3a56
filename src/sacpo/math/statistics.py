"""Statistics of evaluation scores — PURE: numpy/torch only, no I/O, no devices.

Scores come per prompt: a 1-D array (P,) (one sample per prompt) or a 2-D array (P, S) (S samples per prompt).
A model's samples are compared with the SFT policy's samples on the same prompt, drawn independently (each model
samples from its own random stream), over all S × S' cross pairs — a U-statistic of the papers' estimand
P(r(Y) > r(Y′)) for independent Y ~ π(·|x), Y′ ~ π_SFT(·|x):

    outcome(a, b) = 1[a > b] + ½·1[a = b]                  (win = 1, tie = ½, loss = 0)
    u_p           = (1/(S·S′)) Σ_s Σ_s′ outcome(a_ps, b_ps′)        (prompt p's win rate, `cross_outcomes`)
    win rate      = (1/P) Σ_p u_p                                    (`cross_win_rate`)

(`win_rate` keeps the paired form (1/P) Σ_p (1/S) Σ_s outcome(a_ps, b_ps) for callers whose pairs are matched by
construction, e.g. best-of-n selections against held-out draws.)

Uncertainty is taken over *prompts* — or, when prompts come in clusters (paraphrases of one task), over whole
*clusters*: with labels c_p (G clusters, sizes n_g, totals T_g = Σ_{p∈g} v_p), one bootstrap resample draws G
clusters with replacement (counts k ~ Multinomial(G, 1/G)) and takes the mean of the drawn prompts,

    θ* = Σ_g k_g·T_g / Σ_g k_g·n_g          (singleton clusters: the ordinary prompt bootstrap)

and the standard error of a mean is the cluster-robust one

    se² = G/(G − 1) · Σ_g (T_g − n_g·v̄)² / P²     (= s²/P for singleton clusters, s_cluster-means²/G for equal n_g).

Two models evaluated on the same prompts are compared by the *paired* difference of their prompt-level values,
bootstrapped with the same resamples (`paired_difference`). No metric is clamped: an undefined value is NaN (a
standard error from fewer than two prompts or clusters).

The constrained-alignment objective J = E[r] + λ·E[g] − (β/s)·KL of a model against the optimum's (`objective_gain`)
and the linear interpolation of a curve of models (`curve_weights`) serve the report's comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from sacpo.math.kl import mean_and_stderr as _torch_mean_and_stderr

ArrayLike = np.ndarray | torch.Tensor | Sequence[float] | Sequence[Sequence[float]]
Interval = tuple[float, float, float]  # (estimate, lo, hi)
Clusters = Sequence[Hashable] | np.ndarray | None  # one label per prompt, (P,)

NAN = float("nan")


def as_array(x: ArrayLike, name: str = "values") -> np.ndarray:
    """float64 numpy array of a tensor / array / (nested) list."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name}: expected shape (P,) or (P, S), got {arr.shape}")
    return arr


def per_prompt(values: ArrayLike, name: str = "values") -> np.ndarray:
    """(P,) → itself; (P, S) → the mean of each row (the prompt-level value). Returns (P,) float64."""
    arr = as_array(values, name)
    return arr.mean(axis=1) if arr.ndim == 2 else arr


def cluster_codes(clusters: Clusters, n: int) -> np.ndarray | None:
    """Integer codes 0..G−1 of P cluster labels (labels compared as strings), (P,); None for no clustering.

    Raises when the number of labels is not the number of prompts n."""
    if clusters is None:
        return None
    labels = [str(c) for c in clusters]
    if len(labels) != n:
        raise ValueError(f"clusters: {len(labels)} labels for {n} prompts")
    _, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    return codes.reshape(-1)


def _bootstrap_stats(
    v: np.ndarray,
    n_boot: int,
    seed: int,
    clusters: Clusters,
    statistic: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray | None:
    """(n_boot,) bootstrap replicates of the statistic of prompt-level values v (P,), or None when undefined
    (fewer than two prompts or clusters, or a non-finite value)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    codes = cluster_codes(clusters, v.size)
    if v.size < 2 or not np.isfinite(v).all():
        return None
    rng = np.random.default_rng(seed)
    if codes is None:
        stat = statistic or (lambda m: m.mean(axis=1))
        # Resample in blocks so memory stays O(block · P) for large P.
        block = max(1, min(n_boot, 4_000_000 // v.size))
        stats = []
        for start in range(0, n_boot, block):
            idx = rng.integers(0, v.size, size=(min(block, n_boot - start), v.size))  # (b, P)
            stats.append(np.asarray(stat(v[idx]), dtype=np.float64))  # (b,)
        return np.concatenate(stats)  # (n_boot,)
    if statistic is not None:
        raise ValueError("a custom statistic cannot be combined with a cluster bootstrap (only the mean is)")
    n_clusters = int(codes.max()) + 1
    if n_clusters < 2:
        return None
    totals = np.bincount(codes, weights=v, minlength=n_clusters)  # (G,) T_g
    sizes = np.bincount(codes, minlength=n_clusters).astype(np.float64)  # (G,) n_g
    counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot)  # (B, G) k
    return (counts @ totals) / (counts @ sizes)  # (B,)


def bootstrap_ci(
    values: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    clusters: Clusters = None,
) -> tuple[float, float]:
    """Percentile bootstrap (1 − α) confidence interval of a statistic over prompts (or clusters of prompts).

    values: (P,) prompt-level values or (P, S) (rows averaged first). Without clusters: draw n_boot resamples of
    P prompts with replacement (numpy Generator seeded with `seed`, so the interval is deterministic), compute
    the statistic on each — `statistic` maps (B, P) → (B,), default the mean over axis 1. With clusters (P labels):
    resample whole clusters, θ* = Σ_g k_g·T_g / Σ_g k_g·n_g (module docstring; the mean only). Returns the α/2 and
    1 − α/2 quantiles (lo, hi); undefined (NaN, NaN) for fewer than two prompts or clusters.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    boot = _bootstrap_stats(per_prompt(values), n_boot, seed, clusters, statistic)
    if boot is None:
        return NAN, NAN
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_lower_bound(
    values: ArrayLike, alpha: float = 0.05, n_boot: int = 1000, seed: int = 0, clusters: Clusters = None
) -> float:
    """One-sided (1 − α) percentile-bootstrap lower confidence bound of the mean: the α quantile of the resampled
    means (prompts, or whole clusters when given — as in `bootstrap_ci`). NaN for fewer than two prompts/clusters.

    Example: values [0, 1], α = 0.3: resampled means 0, ½, 1 with probabilities ¼, ½, ¼ → the 30% quantile is ½.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    boot = _bootstrap_stats(per_prompt(values), n_boot, seed, clusters, None)
    return NAN if boot is None else float(np.quantile(boot, alpha))


def _mean_with_ci(v: np.ndarray, n_boot: int, seed: int, alpha: float, clusters: Clusters) -> Interval:
    """(mean, lo, hi) of prompt-level values v (P,) with `bootstrap_ci`'s interval; all NaN for no prompts."""
    if v.size == 0:
        return NAN, NAN, NAN
    lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed, alpha=alpha, clusters=clusters)
    return float(v.mean()), lo, hi


def paired_difference(
    a: ArrayLike,
    b: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    clusters: Clusters = None,
) -> Interval:
    """Mean paired difference of two models' prompt-level values on the same prompts, with a bootstrap CI.

    a, b: (P,) or (P, S) (rows averaged first), prompt p of a paired with prompt p of b;
        d_p = a_p − b_p,   Δ = (1/P) Σ_p d_p,   CI = `bootstrap_ci(d, clusters=…)`
    so both models are resampled together (the same prompts / clusters in every resample). Example: a = [1, 2, 4],
    b = [0, 1, 2] → d = [1, 1, 2], Δ = 4/3. Returns (Δ, lo, hi); CI NaN for fewer than two prompts/clusters.
    """
    x, y = per_prompt(a, "a"), per_prompt(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired values must have the same number of prompts, got {x.shape} and {y.shape}")
    return _mean_with_ci(x - y, n_boot, seed, alpha, clusters)


def outcomes(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Per-pair outcome 1[a > b] + ½·1[a = b], same shape as a and b. Non-finite scores raise."""
    x, y = as_array(a, "a"), as_array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired scores must have the same shape, got {x.shape} and {y.shape}")
    return _outcome(x, y)


def _outcome(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1[x > y] + ½·1[x = y], broadcast; non-finite scores raise."""
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("scores contain NaN or inf: a win rate of undefined scores is undefined")
    return (x > y).astype(np.float64) + 0.5 * (x == y)


def win_rate(
    a: ArrayLike,
    b: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    clusters: Clusters = None,
) -> Interval:
    """Paired win rate of scores a (model) over scores b (baseline), ties counting ½, with a bootstrap CI.

    a, b: (P,) or (P, S), element [p, s] of a paired with element [p, s] of b (pairs matched by construction;
    for two independent sample sets use `cross_win_rate`).
        rate = (1/P) Σ_p (1/S) Σ_s (1[a_ps > b_ps] + ½·1[a_ps = b_ps])
    The interval resamples prompts, or whole clusters (`bootstrap_ci`). Example: a = [1, 2, 3], b = [1, 1, 4] →
    (½ + 1 + 0)/3 = 0.5. Returns (rate, lo, hi); all NaN for no prompts, CI NaN for one.
    """
    return _mean_with_ci(per_prompt(outcomes(a, b)), n_boot, seed, alpha, clusters)


def cross_outcomes(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Prompt-level win rates over all cross pairs: u_p = (1/(S·S′)) Σ_s Σ_s′ outcome(a_ps, b_ps′), (P,).

    a: (P, S) or (P,) (one sample), b: (P, S′) or (P,); the U-statistic of P(A > B) + ½·P(A = B) for independent
    A, B on prompt p. Example: a = [[1, 3]], b = [[2, 3]] → pairs (1,2) 0, (1,3) 0, (3,2) 1, (3,3) ½ → u = 3/8.
    Non-finite scores raise.
    """
    x, y = as_array(a, "a"), as_array(b, "b")
    x = x[:, None] if x.ndim == 1 else x  # (P, S)
    y = y[:, None] if y.ndim == 1 else y  # (P, S')
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"cross pairs need the same prompts, got {x.shape[0]} and {y.shape[0]} rows")
    return _outcome(x[:, :, None], y[:, None, :]).mean(axis=(1, 2))  # (P, S, S') → (P,)


def cross_win_rate(
    a: ArrayLike,
    b: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    clusters: Clusters = None,
) -> Interval:
    """Win rate of a model's samples a over independent baseline samples b on the same prompts, all S × S′ pairs.

        rate = (1/P) Σ_p u_p,   u_p = (1/(S·S′)) Σ_s Σ_s′ (1[a_ps > b_ps′] + ½·1[a_ps = b_ps′])
    with a bootstrap CI over prompts or clusters of prompts (`bootstrap_ci`). A sample set against itself gives
    exactly ½ (outcome(x, y) + outcome(y, x) = 1). Returns (rate, lo, hi); all NaN for no prompts.
    """
    return _mean_with_ci(cross_outcomes(a, b), n_boot, seed, alpha, clusters)


def mean_and_stderr(values: ArrayLike, clusters: Clusters = None) -> tuple[float, float]:
    """Mean over prompts ((P, S) rows averaged first) and its standard error; stderr NaN for < 2 prompts/clusters.

    Without clusters: s/√P, s the unbiased sample standard deviation of the prompt-level values. With clusters
    (P labels): the cluster-robust se² = G/(G − 1) · Σ_g (T_g − n_g·v̄)² / P² (module docstring).
    """
    v = per_prompt(values)
    codes = cluster_codes(clusters, v.size)
    if codes is None:
        return _torch_mean_and_stderr(torch.from_numpy(v))
    if v.size == 0:
        return NAN, NAN
    mean = float(v.mean())
    n_clusters = int(codes.max()) + 1
    if n_clusters < 2:
        return mean, NAN
    totals = np.bincount(codes, weights=v, minlength=n_clusters)  # (G,)
    sizes = np.bincount(codes, minlength=n_clusters)  # (G,)
    var = n_clusters / (n_clusters - 1) * float(((totals - sizes * mean) ** 2).sum()) / v.size**2
    return mean, math.sqrt(var)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation ρ (ties get average ranks); NaN for < 2 points or a constant input.

    ρ = Pearson correlation of rank(x) and rank(y).
    """
    xs, ys = as_array(x, "x"), as_array(y, "y")
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ValueError(f"spearman needs two 1-D arrays of equal length, got {xs.shape} and {ys.shape}")
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    if xs.size < 2:
        return NAN
    rx, ry = _ranks(xs), _ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else NAN


def _ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, ties averaged."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.arange(1, v.size + 1)
    for value in np.unique(v):
        tied = v == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


class ObjectiveGain(NamedTuple):
    """A model's constrained-alignment objective against the SFT policy's and the optimum's."""

    objective: float  # J(π)
    objective_sft: float  # J(π_SFT) = E_SFT[r] + λ·E_SFT[g]   (KL 0)
    objective_opt: float  # J(π*)
    fraction: float  # (J(π) − J(SFT)) / (J(π*) − J(SFT)); NaN when J(π*) − J(SFT) ≤ 0
    excess_kl: float  # KL(π‖π_SFT) − KL(π*‖π_SFT)


def kl_objective(reward: float, safety: float, kl: float, lam: float, beta: float, scale: float) -> float:
    """J(π) = E_π[r] + λ·E_π[g] − (β/s)·KL(π‖π_SFT), the objective π*_λ ∝ π_SFT·exp(s·(r + λg)/β) maximises.

    β is the step-1 DPO β (SACPO's step 2 trains at β/λ on g, which is the same optimum), s the Bradley–Terry
    scale of the preference labels (DPO's implicit reward is s·r). Example: r 1, g 0.5, KL 2, λ 2, β 0.1, s 4 →
    1 + 1 − 0.05 = 1.95.
    """
    if not (beta > 0 and scale > 0):
        raise ValueError(f"beta and scale must be > 0, got {beta}, {scale}")
    return reward + lam * safety - beta / scale * kl


def objective_gain(
    model: tuple[float, float, float],
    sft: tuple[float, float],
    optimum: tuple[float, float, float],
    lam: float,
    beta: float,
    scale: float,
) -> ObjectiveGain:
    """How much of the optimum's objective gain over SFT a model reaches, and its excess KL.

    model = (E[r], E[g], KL(π‖π_SFT)), sft = (E_SFT[r], E_SFT[g]), optimum = (E*[r], E*[g], KL(π*‖π_SFT));
        J = `kl_objective`,   fraction = (J(π) − J(SFT)) / (J(π*) − J(SFT)),   excess KL = KL(π) − KL(π*)
    J(π*) ≥ J(π) for every π (π* is the maximiser), so the fraction is ≤ 1 up to estimation error (a trained model
    above its estimated optimum says the estimate is low). The fraction is NaN when J(π*) − J(SFT) ≤ 0 (no gain
    to share, or an unusable estimate) and can be negative (the model is below SFT).
    """
    j = kl_objective(*model, lam, beta, scale)
    j_sft = kl_objective(*sft, 0.0, lam, beta, scale)
    j_opt = kl_objective(*optimum, lam, beta, scale)
    gain = j_opt - j_sft
    fraction = (j - j_sft) / gain if gain > 0 else NAN
    return ObjectiveGain(j, j_sft, j_opt, fraction, model[2] - optimum[2])


def curve_weights(xs: ArrayLike, ys: ArrayLike, x: float) -> np.ndarray | None:
    """Weights w (n,) that linearly interpolate a curve at abscissa x: Σ_i w_i·xs_i = x, Σ w = 1, ≤ 2 non-zero.

    The curve joins the points (xs_i, ys_i) in the given order (e.g. a merge swept over q). Among the segments
    whose x-range contains x, the one with the highest interpolated y is taken (a curve that turns back offers
    several; the best is the conservative comparison). None when no segment contains x (no extrapolation), a
    value is NaN, or x is NaN. Example: xs = [0, 2], ys = [0, 4], x = 0.5 → w = [¾, ¼] (y = 1).
    """
    px, py = as_array(xs, "xs"), as_array(ys, "ys")
    if px.ndim != 1 or px.shape != py.shape:
        raise ValueError(f"a curve needs xs and ys of equal length, got {px.shape} and {py.shape}")
    if px.size == 0 or math.isnan(x) or not (np.isfinite(px).all() and np.isfinite(py).all()):
        return None
    best: tuple[float, np.ndarray] | None = None
    segments = [(i, i + 1) for i in range(px.size - 1)] or [(0, 0)]
    for i, j in segments:
        lo, hi = min(px[i], px[j]), max(px[i], px[j])
        if not lo <= x <= hi:
            continue
        w = np.zeros(px.size)
        if px[i] == px[j]:  # a vertical segment (or one point): its better end
            w[i if py[i] >= py[j] else j] = 1.0
        else:
            t = (x - px[i]) / (px[j] - px[i])
            w[i], w[j] = 1.0 - t, t
        y = float(w @ py)
        if best is None or y > best[0]:
            best = (y, w)
    return None if best is None else best[1]
