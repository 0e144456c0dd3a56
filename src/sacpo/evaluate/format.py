"""How the report writes numbers and orders rows (shared by the table and the findings' evidence)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sacpo.evaluate.metrics import ModelMetrics
from sacpo.evaluate.plots import family_key, param_label


def sort_results(results: Sequence[ModelMetrics]) -> list[ModelMetrics]:
    """By family (paper order, then alphabetical), then param (None first), then name."""
    return sorted(
        results,
        key=lambda m: (
            family_key(m.family),
            m.param is not None,
            m.param if m.param is not None else 0,
            m.name,
        ),
    )


def num(x: float | None, digits: int = 3) -> str:
    """x with `digits` decimals; None → "–", NaN → "NaN"."""
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return f"{x:.{digits}f}"


def fmt_ci(t: tuple[float, float, float]) -> str:
    """(estimate, lo, hi) → "0.600 [0.550, 0.650]"."""
    rate, lo, hi = t
    return f"{num(rate)} [{num(lo)}, {num(hi)}]"


def plus_minus(x: float, se: float) -> str:
    """ "x ± se"."""
    return f"{num(x)} ± {num(se)}"


def point_label(m: ModelMetrics) -> str:
    """A row's name, param and win rates with their CIs."""
    p = f" ({param_label(m.family, m.param)})" if m.param is not None else ""
    return f"{m.name}{p}: helpful {fmt_ci(m.helpful_win)}, harmless {fmt_ci(m.harmless_win)}"


def undefined(*xs: float | None) -> bool:
    """Whether any value is None or NaN."""
    return any(x is None or math.isnan(x) for x in xs)
