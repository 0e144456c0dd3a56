"""Pairwise judgments with position swap: outcomes, win rates, position consistency and agreement — PURE.

A pairwise judge is asked twice per pair (model response m, SFT response s of the same prompt and sample index):
order AB shows m as "A" and s as "B"; order BA shows s as "A" and m as "B". Each answer is a verdict "A", "B",
"tie", or None (invalid: no parsable verdict after the retries). The model's outcome in one order is

    AB:  A → 1,  B → 0,  tie → ½          BA:  B → 1,  A → 0,  tie → ½

and the pair's outcome combines both (`pair_outcome`): equal outcomes → that outcome (the judge is *position
consistent* on the pair); different outcomes (a judge that always says "A" gives 1 then 0) → ½, a tie; either
order invalid → NaN (the pair is invalid, counted, never guessed). The win rate over a (P, S) grid of outcomes is

    win = (1/P′) Σ_p mean_{s valid} o_ps      over the P′ prompts with at least one valid pair

with a bootstrap CI over those prompts (or whole clusters; `sacpo.math.statistics.bootstrap_ci`). A pointwise
judge (reward model, cost model, oracle) gives the same kind of outcome from its scores: 1[u > v] + ½·1[u = v]
(`score_outcome`), so judges of one criterion can be compared pair by pair (`agreement`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from sacpo.math.statistics import NAN, Clusters, Interval, bootstrap_ci

VERDICTS = ("A", "B", "tie")
_AB = {"A": 1.0, "B": 0.0, "tie": 0.5}  # the model is "A" in order AB
_BA = {"A": 0.0, "B": 1.0, "tie": 0.5}  # the model is "B" in order BA


class PairOutcome(NamedTuple):
    outcome: float  # the model's outcome in {0, ½, 1}; NaN when invalid
    consistent: bool  # both orders gave the same outcome (False when invalid)
    valid: bool


def _check(verdict: str | None) -> None:
    if verdict is not None and verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}; valid: {', '.join(VERDICTS)} or None (invalid)")


def pair_outcome(ab: str | None, ba: str | None) -> PairOutcome:
    """The model's outcome on one pair from the verdicts of order AB (model shown first) and BA (model second).

    Examples: ("A", "B") → 1 consistent; ("B", "A") → 0 consistent; ("tie", "tie") → ½ consistent;
    ("A", "A") → ½ inconsistent (position bias: the first answer always wins); ("A", "tie") → ½ inconsistent;
    (None, "B") → NaN invalid."""
    _check(ab)
    _check(ba)
    if ab is None or ba is None:
        return PairOutcome(NAN, False, False)
    first, second = _AB[ab], _BA[ba]
    if first == second:
        return PairOutcome(first, True, True)
    return PairOutcome(0.5, False, True)


def score_outcome(model_scores: np.ndarray, base_scores: np.ndarray) -> np.ndarray:
    """Outcomes 1[u > v] + ½·1[u = v] of paired scores (same shape), NaN where either is not finite."""
    u, v = np.asarray(model_scores, dtype=np.float64), np.asarray(base_scores, dtype=np.float64)
    if u.shape != v.shape:
        raise ValueError(f"paired scores must have the same shape, got {u.shape} and {v.shape}")
    out = (u > v).astype(np.float64) + 0.5 * (u == v)
    out[~(np.isfinite(u) & np.isfinite(v))] = NAN
    return out


def prompt_means(outcomes: np.ndarray) -> np.ndarray:
    """(P,) mean of each prompt's valid outcomes of a (P, S) grid; NaN for a prompt without a valid pair."""
    o = np.asarray(outcomes, dtype=np.float64)
    if o.ndim != 2:
        raise ValueError(f"outcomes: expected (P, S), got shape {o.shape}")
    valid = np.isfinite(o)
    counts = valid.sum(axis=1)
    sums = np.where(valid, o, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), NAN)


def judged_win_rate(
    outcomes: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, clusters: Clusters = None
) -> Interval:
    """(rate, lo, hi) over the prompts with at least one valid pair (module docstring); all NaN when none is.

    Example: outcomes [[1, NaN], [0, ½]] → prompt means [1, ¼] → rate ⅝."""
    per = prompt_means(outcomes)
    keep = np.isfinite(per)
    if not keep.any():
        return NAN, NAN, NAN
    labels = None if clusters is None else [str(c) for c, k in zip(clusters, keep, strict=True) if k]
    lo, hi = bootstrap_ci(per[keep], n_boot=n_boot, seed=seed, alpha=alpha, clusters=labels)
    return float(per[keep].mean()), lo, hi


def consistency_rate(consistent: np.ndarray, valid: np.ndarray) -> float:
    """Share of valid pairs whose two orders agree; NaN when no pair is valid."""
    v = np.asarray(valid, dtype=bool)
    n = int(v.sum())
    return NAN if n == 0 else float(np.asarray(consistent, dtype=bool)[v].sum()) / n


class Agreement(NamedTuple):
    rate: float  # share of jointly valid pairs with the same outcome (NaN when none)
    decisive_rate: float  # the same among pairs both judges call decisively (outcome ≠ ½)
    n: int  # jointly valid pairs
    n_decisive: int


def agreement(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> Agreement:
    """Agreement of two judges' outcomes on the same pairs (any shape, NaN = invalid).

    Example: a = [1, 0, ½, NaN], b = [1, 1, ½, 0] → jointly valid 3, equal 2 → rate ⅔; decisive in both: the
    first two pairs, equal 1 → ½."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"agreement needs outcomes on the same pairs, got {x.size} and {y.size}")
    both = np.isfinite(x) & np.isfinite(y)
    decisive = both & (x != 0.5) & (y != 0.5)
    n, nd = int(both.sum()), int(decisive.sum())
    rate = NAN if n == 0 else float((x[both] == y[both]).sum()) / n
    drate = NAN if nd == 0 else float((x[decisive] == y[decisive]).sum()) / nd
    return Agreement(rate, drate, n, nd)
