"""Report figures (PNG) from ModelMetrics — the SACPO paper's win-rate plane and KL trade-off curves.

    win_rates.png      helpfulness win rate (x) vs harmlessness win rate (y) vs SFT, CI error bars, SFT at
                       (½, ½), dashed lines at ½; sweeps (SACPO β/λ, P-SACPO q, …) connected and labelled
    helpful_vs_kl.png  helpfulness win rate vs KL(π‖π_SFT) (± standard error)
    gold_vs_kl.png     two panels: E[r] vs KL and P(safe) vs KL

Rows of family "optimum" (π*_λ estimated from the gold oracles) are not models but the target frontier: they are
drawn as one black line without error bars, labelled "π* (exact optimum)" — sorted by KL on the KL axes, by their
param (β/λ) on the win-rate plane.

On the KL axes, families whose KL is not the evaluation's k1 sample mean say what it is in the legend (KL_KINDS:
best-of-n's ε-estimator or level estimate, token-wise CD's exact per-token sum, blockwise CD's per-block
ε-estimate), and rows with a KL bound (best-of-n: log n − (n−1)/n, blockwise CD: Σ_blocks (log K − (K−1)/K))
are drawn a second time, hollow, at that bound.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas: no pyplot, no display, and the
caller's matplotlib backend is left alone. Error bars are drawn from the interval ends; an undefined (NaN) interval
draws no bar, a point with an undefined coordinate is left out (and counted in the caption).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sacpo.evaluate.metrics import ModelMetrics
from sacpo.fsutil import atomic_write_bytes

FAMILY_STYLES: dict[str, tuple[str, str]] = {  # family → (colour, marker)
    "sft": ("black", "*"),
    "dpo-helpful": ("tab:orange", "s"),
    "dpo-safe": ("tab:green", "s"),
    "sacpo": ("tab:blue", "o"),
    "p-sacpo": ("tab:purple", "D"),
    "naive-merge": ("tab:red", "X"),
    "optimum": ("black", "."),
    "kto": ("tab:brown", "^"),
    "bon": ("tab:olive", "v"),
    "bon-safe": ("darkolivegreen", "^"),
    "cd-token": ("tab:cyan", "o"),
    "cd-block": ("navy", "s"),
    "cd-bon": ("tab:gray", "v"),
}
_SPARE_STYLES = [("tab:pink", "P"), ("tab:gray", "h"), ("tab:cyan", "<"), ("gold", ">"), ("navy", "d")]
PARAM_LABELS: dict[str, str] = {  # how a family's param is written next to its points
    "sacpo": "β/λ",
    "p-sacpo": "q",
    "naive-merge": "q",
    "optimum": "β/λ",
    "dpo-helpful": "β",
    "dpo-safe": "β",
    "kto": "β/λ",
    "bon": "n",
    "bon-safe": "n",
    "cd-token": "β",
    "cd-block": "K",
    "cd-bon": "K",
}
FAMILY_ORDER = [
    "sft", "dpo-helpful", "dpo-safe", "sacpo", "optimum", "p-sacpo", "naive-merge", "kto",
    "bon", "bon-safe", "cd-token", "cd-block", "cd-bon",
]  # fmt: skip
# What the KL column / axis holds for families whose KL is not the k1 sample mean of `sacpo eval`
# (log π(y) − log π_SFT(y) on the policy's samples): best-of-n has no log π⁽ⁿ⁾(y), blockwise CD neither.
KL_KINDS: dict[str, str] = {
    "bon": "ε / level estimate",  # Beirami et al. 2024's KL̂(ε), log(M̂/q̂) under ties; the bound in kl_bound
    "bon-safe": "ε / level estimate",
    "cd-token": "exact per-token sum",  # Σ_t KL(q_t‖p_t) on the sampled path
    "cd-block": "per-block ε-estimate",  # Σ_blocks KL̂(ε_b, K); the bound Σ_blocks (log K − (K−1)/K) in kl_bound
    "cd-bon": "ε-estimator",  # one block: best-of-K by the scorer; the bound log K − (K−1)/K in kl_bound
}


OPTIMUM_FAMILY = "optimum"
OPTIMUM_LABEL = "π* (exact optimum)"


def kl_kind(family: str) -> str:
    """What a family's KL value is: KL_KINDS, else the evaluation's k1 sample mean."""
    return KL_KINDS.get(family, "k1 sample mean")


Point = tuple[float, float, float]  # (value, error below, error above)
Getter = Callable[[ModelMetrics], Point]


def family_key(family: str) -> tuple[int, str]:
    """Sort key: the known families in paper order, then the others alphabetically."""
    return (FAMILY_ORDER.index(family), "") if family in FAMILY_ORDER else (len(FAMILY_ORDER), family)


def family_style(family: str) -> tuple[str, str]:
    """(colour, marker) of a family; unknown families get a stable spare style from their name."""
    if family in FAMILY_STYLES:
        return FAMILY_STYLES[family]
    return _SPARE_STYLES[sum(map(ord, family)) % len(_SPARE_STYLES)]


def param_label(family: str, param: float) -> str:
    return f"{PARAM_LABELS.get(family, 'p')}={param:g}"


def _finite(x: float) -> bool:
    return x is not None and not math.isnan(x) and not math.isinf(x)


def _interval(rate: float, lo: float, hi: float) -> Point:
    """(value, below, above) from a CI; a NaN end gives no bar; ends on the wrong side of the estimate (possible
    for percentile intervals) are drawn as 0-length (a display choice — the table shows the raw interval)."""
    below = max(0.0, rate - lo) if _finite(lo) else 0.0
    above = max(0.0, hi - rate) if _finite(hi) else 0.0
    return rate, below, above


def _helpful(m: ModelMetrics) -> Point:
    return _interval(*m.helpful_win)


def _harmless(m: ModelMetrics) -> Point:
    return _interval(*m.harmless_win)


def _kl(m: ModelMetrics) -> Point:
    se = m.kl_se if _finite(m.kl_se) else 0.0
    return m.kl, se, se


def _reward(m: ModelMetrics) -> Point:
    se = m.reward_se if _finite(m.reward_se) else 0.0
    return m.mean_reward, se, se


def _p_safe(m: ModelMetrics) -> Point:
    return m.p_safe, 0.0, 0.0


def _scatter(ax, results: Sequence[ModelMetrics], x: Getter, y: Getter, kl_axis: bool = False) -> int:
    """Plot every model with error bars, connect and label sweeps; returns the number of points left out.

    kl_axis: x is KL — legend entries of families in KL_KINDS say what their KL is, and rows with a KL bound in
    extra["kl_bound"] that differs from their KL (best-of-n: the ε-estimator) are drawn a second time, hollow,
    at the bound."""
    groups: dict[str, list[tuple[ModelMetrics, Point, Point]]] = defaultdict(list)
    skipped = 0
    for m in results:
        px, py = x(m), y(m)
        if not (_finite(px[0]) and _finite(py[0])):
            skipped += 1
            continue
        groups[m.family].append((m, px, py))
    for family in sorted(groups, key=family_key):
        pts = groups[family]
        colour, marker = family_style(family)
        if family == OPTIMUM_FAMILY:
            _frontier(ax, pts, by_x=kl_axis)
            continue
        ax.errorbar(
            [p[1][0] for p in pts],
            [p[2][0] for p in pts],
            xerr=[[p[1][1] for p in pts], [p[1][2] for p in pts]],
            yerr=[[p[2][1] for p in pts], [p[2][2] for p in pts]],
            fmt=marker,
            color=colour,
            ecolor=colour,
            elinewidth=0.8,
            capsize=2,
            markersize=9 if family == "sft" else 6,
            label=f"{family} (KL: {KL_KINDS[family]})" if kl_axis and family in KL_KINDS else family,
            zorder=3,
        )
        sweep = sorted((p for p in pts if p[0].param is not None), key=lambda p: p[0].param)
        if len(sweep) >= 2:
            ax.plot([p[1][0] for p in sweep], [p[2][0] for p in sweep], "-", color=colour, lw=1, alpha=0.7)
            for m, px, py in sweep:
                ax.annotate(
                    param_label(family, m.param),
                    (px[0], py[0]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=colour,
                )
    if kl_axis:
        _bound_points(ax, [m for pts in groups.values() for m, _, _ in pts], y)
    if not groups:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center", color="gray")
    else:
        ax.legend(fontsize=7, loc="best")
    ax.grid(True, alpha=0.3)
    return skipped


def _frontier(ax, pts: list[tuple[ModelMetrics, Point, Point]], by_x: bool) -> None:
    """The π* frontier: one line through the optimum rows (sorted by x, or by param), no error bars."""
    colour, marker = family_style(OPTIMUM_FAMILY)
    line = sorted(pts, key=lambda p: p[1][0] if by_x else (p[0].param is None, p[0].param or 0.0))
    ax.plot(
        [p[1][0] for p in line], [p[2][0] for p in line], "-", marker=marker, color=colour, lw=1.5, ms=6,
        label=OPTIMUM_LABEL, zorder=2,
    )  # fmt: skip
    # one label per position: coinciding points (e.g. λ values whose π* is the same) share it
    labels: list[tuple[float, float, list[float]]] = []
    for m, px, py in line:
        if m.param is None:
            continue
        if (
            labels
            and math.isclose(labels[-1][0], px[0], rel_tol=1e-3, abs_tol=1e-6)
            and math.isclose(labels[-1][1], py[0], rel_tol=1e-3, abs_tol=1e-6)
        ):
            labels[-1][2].append(m.param)
        else:
            labels.append((px[0], py[0], [m.param]))
    name = PARAM_LABELS[OPTIMUM_FAMILY]
    for x, y, params in labels:
        text = f"{name}=" + ", ".join(f"{p:g}" for p in sorted(params))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, -9), fontsize=7, color=colour)


def _bound_points(ax, shown: Sequence[ModelMetrics], y: Getter) -> None:
    """Hollow markers at (extra["kl_bound"], y) for rows whose KL is an estimate below a known bound."""
    groups: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for m in shown:
        bound = m.extra.get("kl_bound")
        if bound is not None and _finite(bound) and not math.isclose(bound, m.kl, abs_tol=1e-12):
            groups[m.family].append((m.param if m.param is not None else 0.0, bound, y(m)[0]))
    for family in sorted(groups, key=family_key):
        pts = sorted(groups[family])
        colour, marker = family_style(family)
        ax.plot(
            [p[1] for p in pts], [p[2] for p in pts], marker=marker, ls=":", color=colour, mfc="none", lw=0.8,
            label=f"{family} at its KL bound" + (" log n − (n−1)/n" if family.startswith("bon") else ""),
        )  # fmt: skip


def _caption(ax, skipped: int) -> None:
    if skipped:
        ax.text(
            0.01,
            0.01,
            f"{skipped} model(s) with undefined values not shown",
            transform=ax.transAxes,
            fontsize=7,
            color="gray",
        )


def _new_figure(ncols: int = 1, width: float = 6.0, height: float = 5.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Render a figure to PNG bytes in memory and write them atomically (`sacpo.fsutil.atomic_write_bytes`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_win_rates(results: Sequence[ModelMetrics], path: str | Path, title: str | None = None) -> Path:
    """Helpfulness (x) vs harmlessness (y) win rate against SFT, with CI error bars; dashed lines at ½."""
    fig, (ax,) = _new_figure()
    ax.axvline(0.5, ls="--", color="gray", lw=0.8)
    ax.axhline(0.5, ls="--", color="gray", lw=0.8)
    skipped = _scatter(ax, results, _helpful, _harmless)
    ax.set_xlabel("helpfulness win rate vs SFT")
    ax.set_ylabel("harmlessness win rate vs SFT")
    ax.set_title(title or "Win rates against the SFT policy")
    _caption(ax, skipped)
    return save_png(fig, path)


def plot_helpful_vs_kl(results: Sequence[ModelMetrics], path: str | Path, title: str | None = None) -> Path:
    """Helpfulness win rate vs KL(π‖π_SFT), error bars: CI (y) and ± standard error (x)."""
    fig, (ax,) = _new_figure()
    ax.axhline(0.5, ls="--", color="gray", lw=0.8)
    skipped = _scatter(ax, results, _kl, _helpful, kl_axis=True)
    ax.set_xlabel("KL(π‖π_SFT) [nats]")
    ax.set_ylabel("helpfulness win rate vs SFT")
    ax.set_title(title or "Helpfulness against divergence from SFT")
    _caption(ax, skipped)
    return save_png(fig, path)


def plot_gold_vs_kl(results: Sequence[ModelMetrics], path: str | Path, title: str | None = None) -> Path:
    """Two panels: mean reward E[r] (± s.e.) vs KL, and P(safe) vs KL."""
    fig, (left, right) = _new_figure(ncols=2, width=5.5)
    _caption(left, _scatter(left, results, _kl, _reward, kl_axis=True))
    left.set_xlabel("KL(π‖π_SFT) [nats]")
    left.set_ylabel("mean reward E[r]")
    _caption(right, _scatter(right, results, _kl, _p_safe, kl_axis=True))
    right.set_xlabel("KL(π‖π_SFT) [nats]")
    right.set_ylabel("P(safe)")
    fig.suptitle(title or "Reward and safety against divergence from SFT")
    return save_png(fig, path)


PLOTS: dict[str, Callable[[Sequence[ModelMetrics], str | Path], Path]] = {
    "win_rates.png": plot_win_rates,
    "helpful_vs_kl.png": plot_helpful_vs_kl,
    "gold_vs_kl.png": plot_gold_vs_kl,
}


def make_plots(results: Sequence[ModelMetrics], out_dir: str | Path) -> dict[str, Path]:
    """Write every figure of PLOTS to out_dir; returns file name → path."""
    return {name: fn(results, Path(out_dir) / name) for name, fn in PLOTS.items()}
