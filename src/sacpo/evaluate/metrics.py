"""Evaluation metrics of aligned models against the SFT policy — PURE: numpy/torch only, no I/O, no devices.

Scores come per prompt: a 1-D array (P,) (one sample per prompt) or a 2-D array (P, S) (S samples per prompt,
sample s of the model paired with sample s of the SFT model on the same prompt). Uncertainty is always taken over
*prompts* (the unit the evaluation set samples): with S > 1 each prompt's S values are averaged first, then the
P prompt-level values are bootstrapped (a paired, cluster bootstrap).

    outcome(a, b) = 1[a > b] + ½·1[a = b]                  (win = 1, tie = ½, loss = 0)
    win rate      = (1/P) Σ_p (1/S) Σ_s outcome(a_ps, b_ps)
    KL(π‖π_SFT)   ≈ (1/P) Σ_p (1/S) Σ_s [log π(y_ps|x_p) − log π_SFT(y_ps|x_p)],   y_ps ~ π(·|x_p)

No metric is clamped: an undefined value is NaN (e.g. a standard error from fewer than two prompts) and a
negative KL estimate is sampling noise that is reported as such.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from sacpo.math.kl import mean_and_stderr as _torch_mean_and_stderr

ArrayLike = np.ndarray | torch.Tensor | Sequence[float] | Sequence[Sequence[float]]
Interval = tuple[float, float, float]  # (estimate, lo, hi)

NAN = float("nan")


def _as_array(x: ArrayLike, name: str = "values") -> np.ndarray:
    """float64 numpy array of a tensor / array / (nested) list."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name}: expected shape (P,) or (P, S), got {arr.shape}")
    return arr


def per_prompt(values: ArrayLike, name: str = "values") -> np.ndarray:
    """(P,) → itself; (P, S) → the mean of each row (the prompt-level value). Returns (P,) float64."""
    arr = _as_array(values, name)
    return arr.mean(axis=1) if arr.ndim == 2 else arr


def bootstrap_ci(
    values: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap (1 − α) confidence interval of a statistic over prompts.

    values: (P,) prompt-level values or (P, S) (rows averaged first). Draw n_boot resamples of P prompts with
    replacement (numpy Generator seeded with `seed`, so the interval is deterministic), compute the statistic on
    each — `statistic` maps (B, P) → (B,), default the mean over axis 1 — and return the α/2 and 1 − α/2
    quantiles (lo, hi). Undefined (NaN, NaN) for fewer than two prompts, where a resample can show no spread.
    """
    v = per_prompt(values)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    if v.size < 2 or not np.isfinite(v).all():
        return NAN, NAN
    rng = np.random.default_rng(seed)
    stat = statistic or (lambda m: m.mean(axis=1))
    # Resample in blocks so memory stays O(block · P) for large P.
    block = max(1, min(n_boot, 4_000_000 // v.size))
    stats = []
    for start in range(0, n_boot, block):
        idx = rng.integers(0, v.size, size=(min(block, n_boot - start), v.size))  # (b, P)
        stats.append(np.asarray(stat(v[idx]), dtype=np.float64))  # (b,)
    boot = np.concatenate(stats)  # (n_boot,)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def outcomes(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Per-pair outcome 1[a > b] + ½·1[a = b], same shape as a and b. Non-finite scores raise."""
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired scores must have the same shape, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("scores contain NaN or inf: a win rate of undefined scores is undefined")
    return (x > y).astype(np.float64) + 0.5 * (x == y)


def win_rate(a: ArrayLike, b: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> Interval:
    """Win rate of scores a (model) over paired scores b (SFT), ties counting ½, with a bootstrap CI.

    a, b: (P,) or (P, S), element [p, s] of a paired with element [p, s] of b.
        rate = (1/P) Σ_p (1/S) Σ_s (1[a_ps > b_ps] + ½·1[a_ps = b_ps])
    The interval resamples prompts (`bootstrap_ci` of the P prompt-level win rates). Example: a = [1, 2, 3],
    b = [1, 1, 4] → (½ + 1 + 0)/3 = 0.5. Returns (rate, lo, hi); all NaN for no prompts, CI NaN for one.
    """
    w = per_prompt(outcomes(a, b))  # (P,)
    if w.size == 0:
        return NAN, NAN, NAN
    lo, hi = bootstrap_ci(w, n_boot=n_boot, seed=seed, alpha=alpha)
    return float(w.mean()), lo, hi


def mean_and_stderr(values: ArrayLike) -> tuple[float, float]:
    """Mean and its standard error s/√P over prompts ((P, S) rows averaged first); stderr NaN for P < 2.

    s is the unbiased sample standard deviation of the prompt-level values.
    """
    return _torch_mean_and_stderr(torch.from_numpy(per_prompt(values)))


def kl_estimate(policy_logps: ArrayLike, ref_logps: ArrayLike) -> tuple[float, float]:
    """KL(π‖π_ref) from samples y ~ π: the mean sequence log-ratio and its standard error.

        KL ≈ mean over samples of [log π(y|x) − log π_ref(y|x)]   (k1: unbiased; single terms can be < 0)

    Inputs are per-sequence log-prob sums (response tokens only), (N,) or (P, S) per prompt; the standard error
    is over prompts as in `mean_and_stderr` (NaN for fewer than two). No clamping: a negative estimate is noise
    and is returned as is; it is exactly 0 when the two log-probs are identical.
    """
    lp, lq = _as_array(policy_logps, "policy_logps"), _as_array(ref_logps, "ref_logps")
    if lp.shape != lq.shape:
        raise ValueError(f"log-prob shapes differ: {lp.shape} vs {lq.shape}")
    return mean_and_stderr(lp - lq)


def constraint_holds(mean_g: float, b: float) -> bool:
    """The SACPO safety constraint E[g(x, y)] ≥ b on the point estimate; False when E[g] is undefined (NaN)."""
    return bool(mean_g >= b) if not math.isnan(mean_g) else False


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation ρ (ties get average ranks); NaN for < 2 points or a constant input.

    ρ = Pearson correlation of rank(x) and rank(y).
    """
    xs, ys = _as_array(x, "x"), _as_array(y, "y")
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


@dataclass(frozen=True)
class ModelMetrics:
    """Everything the report shows about one model, measured against the SFT policy's samples.

    helpful_win / harmless_win are (rate, lo, hi) of the gold reward / gold safety score vs SFT; mean_reward,
    mean_safety are E[r*], E[g*] over all samples (reward_se, safety_se over prompts); p_safe = P(is_safe);
    constraint_ok = E[g*] ≥ b; kl ± kl_se = KL(π‖π_SFT) in nats. mean_rm / mean_cm: learned reward / cost model
    scores when evaluated; extra: the mean of every further scorer by name.
    """

    name: str
    family: str
    param: float | None
    helpful_win: Interval
    harmless_win: Interval
    mean_reward: float
    mean_safety: float
    p_safe: float
    constraint_ok: bool
    kl: float
    kl_se: float
    mean_rm: float | None = None
    mean_cm: float | None = None
    n: int = 0
    n_prompts: int = 0
    reward_se: float = NAN
    safety_se: float = NAN
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON-safe dict: NaN → None, intervals → lists."""
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetrics:
        """Inverse of `to_dict` (None in a required float field reads back as NaN); unknown keys raise."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelMetrics field(s) {unknown}; valid: {', '.join(sorted(names))}")
        d = dict(data)
        for key in ("helpful_win", "harmless_win"):
            if key in d:
                d[key] = tuple(_float(v) for v in d[key])
        for key in ("mean_reward", "mean_safety", "p_safe", "kl", "kl_se", "reward_se", "safety_se"):
            if key in d:
                d[key] = _float(d[key])
        if "extra" in d:
            d["extra"] = {k: _float(v) for k, v in (d["extra"] or {}).items()}
        return cls(**d)


def _float(v: Any) -> float:
    return NAN if v is None else float(v)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x
