"""Paired contrasts between report rows: Σ_i c_i·value(m_i) of two sets of rows on the same prompts, with a paired
(cluster) bootstrap CI from the rows' per-prompt values (`contrast`), and the constrained objective per prompt.

A contrast's estimate uses the rows' overall values; its interval resamples the per-prompt differences
d_p = Σ_i c_i·v_ip(plus) − Σ_j c_j·v_jp(minus) (`sacpo.math.statistics.paired_difference`), by cluster when the rows
carry clusters. Rows without per-prompt values, or with other prompts or clusters, cannot be paired: CI NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from sacpo.evaluate.format import undefined
from sacpo.evaluate.metrics import NAN, ModelMetrics
from sacpo.math.statistics import Interval, paired_difference


class Stats(NamedTuple):
    """How the findings judge uncertainty: the threshold b (None: use each row's constraint_ok), the level α
    (two-sided CIs of differences, one-sided lower bounds), bootstrap resamples and seed."""

    b: float | None = None
    alpha: float = 0.05
    n_boot: int = 1000
    seed: int = 0


ROW_VALUE = {  # a row's overall value of each per-prompt key
    "reward": lambda m: m.mean_reward,
    "safety": lambda m: m.mean_safety,
    "safe": lambda m: m.p_safe,
    "helpful_win": lambda m: m.helpful_win[0],
    "harmless_win": lambda m: m.harmless_win[0],
    "kl": lambda m: m.kl,
}
Terms = Sequence[tuple[float, ModelMetrics]]  # Σ_i c_i·value(m_i)


def _per_prompt(terms: Terms, key: str) -> tuple[np.ndarray, list[str] | None] | None:
    """Σ_i c_i·v_i (P,) from the rows' per_prompt values, and their shared clusters; None when a row lacks the key,
    or the rows differ in prompt count or clustering (then they cannot be paired)."""
    vals = [m.per_prompt.get(key) for _, m in terms]
    if any(v is None for v in vals) or len({len(v) for v in vals}) != 1:  # type: ignore[arg-type]
        return None
    if len({tuple(m.clusters) if m.clusters is not None else None for _, m in terms}) != 1:
        return None
    total = sum(c * np.asarray(v, dtype=np.float64) for (c, _), v in zip(terms, vals, strict=True))
    return np.asarray(total), terms[0][1].clusters


def contrast(plus: Terms, minus: Terms, key: str, st: Stats) -> Interval:
    """Σ c·value(plus) − Σ c·value(minus) with a paired (cluster) bootstrap CI from the per-prompt values (CI NaN
    when they are missing or cannot be paired). The estimate uses the rows' overall values."""
    est = sum(c * ROW_VALUE[key](m) for c, m in plus) - sum(c * ROW_VALUE[key](m) for c, m in minus)
    a, b = _per_prompt(plus, key), _per_prompt(minus, key)
    if a is None or b is None or a[0].shape != b[0].shape or a[1] != b[1]:
        return est, NAN, NAN
    _, lo, hi = paired_difference(a[0], b[0], n_boot=st.n_boot, seed=st.seed, alpha=st.alpha, clusters=a[1])
    return est, lo, hi


def group_by_param(models: Sequence[ModelMetrics]) -> list[tuple[float, list[ModelMetrics]]]:
    """Rows by param, ascending (rows sharing a param — e.g. training seeds — are averaged as one point)."""
    by: dict[float, list[ModelMetrics]] = {}
    for m in models:
        by.setdefault(m.param, []).append(m)
    return sorted(by.items())


def mean_terms(rows: list[ModelMetrics]) -> list[tuple[float, ModelMetrics]]:
    """The average of rows as a linear combination."""
    return [(1.0 / len(rows), m) for m in rows]


def signed(t: Interval) -> str:
    """ "+0.123 [+0.010, +0.240]" (or "CI NaN") of a contrast."""
    est, lo, hi = t
    ci = "CI NaN" if undefined(lo, hi) else f"[{lo:+.3f}, {hi:+.3f}]"
    return f"{est:+.3f} {ci}"


def is_reversed(t: Interval, sign: int) -> bool:
    """The CI lies entirely on the wrong side of 0."""
    return not undefined(t[1], t[2]) and (t[2] < 0 if sign > 0 else t[1] > 0)


def is_confirmed(t: Interval, sign: int) -> bool:
    """The CI lies entirely on the expected side of 0."""
    return not undefined(t[1], t[2]) and (t[1] > 0 if sign > 0 else t[2] < 0)


def level(st: Stats) -> str:
    """The confidence level 1 − α as a percentage ("95%")."""
    return f"{100 * (1 - st.alpha):g}%"


def objective_per_prompt(
    m: ModelMetrics, lam: float, beta: float, scale: float, kl: bool = True
) -> np.ndarray | None:
    """(P,) J_p = r_p + λ·g_p − (β/s)·kl_p, or None when a key is missing (kl=False: the SFT row, KL 0)."""
    r, g = m.per_prompt.get("reward"), m.per_prompt.get("safety")
    k = m.per_prompt.get("kl") if kl else None
    if r is None or g is None or (kl and k is None):
        return None
    j = np.asarray(r) + lam * np.asarray(g)
    return j - beta / scale * np.asarray(k) if kl else j
