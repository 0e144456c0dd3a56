"""The evaluation report: report.md + report.html with the table of every model, the figures and the findings.

The HTML is self-contained (figures embedded as base64 PNG data URIs), so it can be mailed or archived alone;
the Markdown references the PNG files written next to it by relative path.

`check_findings` tests the SACPO paper's qualitative claims (Wachi et al. 2024) on the results, for the families
present, and reports each as (claim, holds, evidence with the numbers) — a claim that fails is reported as failed.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from sacpo.evaluate.metrics import ModelMetrics, spearman
from sacpo.evaluate.plots import KL_KINDS, family_key, kl_kind, make_plots, param_label
from sacpo.math.kl import kl_health

HELPFUL_FAMILY, SACPO, P_SACPO, NAIVE = "dpo-helpful", "sacpo", "p-sacpo", "naive-merge"


KL_NOTE = (
    "KL kind: k1 sample mean = mean of log π(y) − log π_SFT(y) on the model's samples (trained models); "
    "ε-estimator = best-of-n's KL̂(ε), ε = π_SFT(y_sel) (Beirami et al. 2024), an estimate, with the bound "
    "log n − (n−1)/n in kl_bound; exact per-token sum = token-wise CD's Σ_t KL(q_t‖p_t) on the sampled path; "
    "upper bound = blockwise CD's Σ_blocks (log K − (K−1)/K), not an estimate — the true KL is lower."
)


class Finding(NamedTuple):
    """A qualitative claim checked on the results: the claim, whether it holds, and the numbers behind it."""

    claim: str
    holds: bool
    evidence: str


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


# ------------------------------------------------------------------------------------------------ formatting
def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return f"{x:.{digits}f}"


def _ci(t: tuple[float, float, float]) -> str:
    rate, lo, hi = t
    return f"{_num(rate)} [{_num(lo)}, {_num(hi)}]"


def _pm(x: float, se: float) -> str:
    return f"{_num(x)} ± {_num(se)}"


def _point(m: ModelMetrics) -> str:
    p = f" ({param_label(m.family, m.param)})" if m.param is not None else ""
    return f"{m.name}{p}: helpful {_ci(m.helpful_win)}, harmless {_ci(m.harmless_win)}"


def _rho(x: float) -> str:
    return "undefined (NaN: constant values)" if math.isnan(x) else f"{x:+.2f}"


def _nan(*xs: float) -> bool:
    return any(x is None or math.isnan(x) for x in xs)


# ------------------------------------------------------------------------------------------------ findings
def _step1(models: list[ModelMetrics]) -> Finding:
    claim = "Step-1 DPO(helpful) raises helpfulness (win rate > 0.5) and lowers harmlessness (< 0.5) vs SFT"
    parts, holds = [], True
    for m in models:
        h, s = m.helpful_win, m.harmless_win
        if _nan(h[0], s[0]):
            holds = False
            parts.append(f"{_point(m)} — undefined")
            continue
        ok = h[0] > 0.5 and s[0] < 0.5
        holds &= ok
        sig_h = "yes" if not _nan(h[1]) and h[1] > 0.5 else "no"
        sig_s = "yes" if not _nan(s[2]) and s[2] < 0.5 else "no"
        parts.append(f"{_point(m)} (CI excludes ½: helpful {sig_h}, harmless {sig_s})")
    return Finding(claim, holds, "; ".join(parts))


def _trend(models: list[ModelMetrics]) -> tuple[float, float, str]:
    """Spearman ρ of param with helpful and harmless win rates, and the points as text."""
    pts = sorted(models, key=lambda m: m.param)
    params = [m.param for m in pts]
    rho_h = spearman(params, [m.helpful_win[0] for m in pts])
    rho_s = spearman(params, [m.harmless_win[0] for m in pts])
    text = "; ".join(
        f"{param_label(m.family, m.param)}: ({_num(m.helpful_win[0])}, {_num(m.harmless_win[0])})"
        for m in pts
    )
    return rho_h, rho_s, text


def _sacpo_trend(models: list[ModelMetrics]) -> Finding:
    claim = "SACPO: smaller β/λ (larger λ) gives higher harmlessness and lower helpfulness"
    rho_h, rho_s, text = _trend(models)
    holds = not _nan(rho_h, rho_s) and rho_s < 0 and rho_h > 0
    evidence = (
        f"(helpful, harmless) by β/λ: {text}; Spearman ρ(β/λ, harmless) = {_rho(rho_s)} (want < 0), "
        f"ρ(β/λ, helpful) = {_rho(rho_h)} (want > 0)"
    )
    return Finding(claim, holds, evidence)


def _psacpo_trend(models: list[ModelMetrics]) -> Finding:
    claim = "P-SACPO: the merge weight q traces the trade-off — harmlessness increases with q"
    rho_h, rho_s, text = _trend(models)
    holds = not _nan(rho_s) and rho_s > 0
    evidence = (
        f"(helpful, harmless) by q: {text}; Spearman ρ(q, harmless) = {_rho(rho_s)} (want > 0); "
        f"ρ(q, helpful) = {_rho(rho_h)} (a trade-off expects < 0)"
    )
    return Finding(claim, holds, evidence)


def _beats_naive(naive: list[ModelMetrics], ours: list[ModelMetrics]) -> Finding:
    claim = "SACPO / P-SACPO is at least as harmless as the naive merge at the closest helpfulness"
    parts, holds = [], True
    candidates = [m for m in ours if not _nan(m.helpful_win[0], m.harmless_win[0])]
    for n in naive:
        if _nan(n.helpful_win[0], n.harmless_win[0]) or not candidates:
            holds = False
            parts.append(f"{_point(n)} — undefined or no SACPO point to compare")
            continue
        best = min(candidates, key=lambda m: abs(m.helpful_win[0] - n.helpful_win[0]))
        ok = best.harmless_win[0] >= n.harmless_win[0]
        holds &= ok
        parts.append(
            f"naive {n.name}: helpful {_num(n.helpful_win[0])}, harmless {_num(n.harmless_win[0])} vs closest "
            f"{best.name}: helpful {_num(best.helpful_win[0])} (Δ {best.helpful_win[0] - n.helpful_win[0]:+.3f}), "
            f"harmless {_num(best.harmless_win[0])} (Δ {best.harmless_win[0] - n.harmless_win[0]:+.3f})"
        )
    return Finding(claim, holds, "; ".join(parts))


def check_findings(results: Sequence[ModelMetrics]) -> list[Finding]:
    """The SACPO paper's qualitative claims, each checked when the families it needs are present.

    (1) dpo-helpful: helpful win > ½ and harmless win < ½ (point estimates; the evidence says whether the CIs
        exclude ½).
    (2) sacpo (param β/λ, ≥ 2 distinct values): Spearman ρ(β/λ, harmless) < 0 and ρ(β/λ, helpful) > 0.
    (3) p-sacpo (param q, ≥ 2 distinct values): ρ(q, harmless) > 0.
    (4) naive-merge: the sacpo / p-sacpo point with the closest helpfulness win rate has a harmlessness win rate
        ≥ the naive merge's.
    """
    by: dict[str, list[ModelMetrics]] = {}
    for m in results:
        by.setdefault(m.family, []).append(m)
    out = []
    if by.get(HELPFUL_FAMILY):
        out.append(_step1(by[HELPFUL_FAMILY]))
    for family, check in ((SACPO, _sacpo_trend), (P_SACPO, _psacpo_trend)):
        swept = [m for m in by.get(family, []) if m.param is not None]
        if len({m.param for m in swept}) >= 2:
            out.append(check(swept))
    ours = by.get(SACPO, []) + by.get(P_SACPO, [])
    if by.get(NAIVE) and ours:
        out.append(_beats_naive(by[NAIVE], ours))
    return out


# ------------------------------------------------------------------------------------------------ table
def _columns(results: Sequence[ModelMetrics]) -> tuple[list[str], list[list[str]]]:
    extra_keys = sorted({k for m in results for k in m.extra if k not in ("rm", "cm")})
    has_rm = any(m.mean_rm is not None for m in results)
    has_cm = any(m.mean_cm is not None for m in results)
    header = [
        "model",
        "family",
        "param",
        "helpful win [CI]",
        "harmless win [CI]",
        "E[r] ± se",
        "E[g] ± se",
        "P(safe)",
        "E[g] ≥ b",
        "KL(π‖π_SFT) ± se",
    ]
    kinds = any(m.family in KL_KINDS for m in results)
    header += ["KL kind"] if kinds else []
    header += (["RM"] if has_rm else []) + (["CM"] if has_cm else []) + extra_keys + ["n"]
    rows = []
    for m in sort_results(results):
        row = [
            m.name,
            m.family,
            "–" if m.param is None else f"{m.param:g}",
            _ci(m.helpful_win),
            _ci(m.harmless_win),
            _pm(m.mean_reward, m.reward_se),
            _pm(m.mean_safety, m.safety_se),
            _num(m.p_safe),
            "✓" if m.constraint_ok else "✗",
            _pm(m.kl, m.kl_se),
        ]
        row += [kl_kind(m.family)] if kinds else []
        row += ([_num(m.mean_rm)] if has_rm else []) + ([_num(m.mean_cm)] if has_cm else [])
        row += [_num(m.extra.get(k)) for k in extra_keys] + [str(m.n)]
        rows.append(row)
    return header, rows


def _warnings(results: Sequence[ModelMetrics]) -> list[str]:
    out = []
    for m in sort_results(results):
        w = kl_health(m.kl)
        if w:
            out.append(f"{m.name}: {w}")
    return out


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _markdown(title, notes, header, rows, plots, findings, warnings) -> str:
    lines = [f"# {title}", ""]
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    lines += ["## Results", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    lines += ["", "Win rates are against the SFT policy's samples (ties count ½); NaN = undefined.", ""]
    if "KL kind" in header:
        lines += [KL_NOTE, ""]
    if warnings:
        lines += ["### Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in plots] + [""]
    lines += ["## Findings", ""]
    if findings:
        lines += [f"- {'✓' if f[1] else '✗'} **{f[0]}** — {f[2]}" for f in findings]
    else:
        lines += ["- none checked (the families a claim needs are not in the results)"]
    return "\n".join(lines) + "\n"


def _html(title, notes, header, rows, plots, findings, warnings) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px;"
        "text-align:right}td:first-child,td:nth-child(2),th{text-align:left}img{max-width:100%}"
        ".ok{color:#080}.fail{color:#b00}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Results</h2><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    parts.append("</thead><tbody>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</tbody></table>")
    parts.append("<p>Win rates are against the SFT policy's samples (ties count ½); NaN = undefined.</p>")
    if "KL kind" in header:
        parts.append(f"<p>{e(KL_NOTE)}</p>")
    if warnings:
        parts.append("<h3>Warnings</h3><ul>" + "".join(f"<li>{e(w)}</li>" for w in warnings) + "</ul>")
    parts.append("<h2>Figures</h2>")
    for name, path in plots.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{data}"></figure>')
    parts.append("<h2>Findings</h2><ul>")
    if findings:
        for claim, holds, evidence in findings:
            mark = '<span class="ok">✓</span>' if holds else '<span class="fail">✗</span>'
            parts.append(f"<li>{mark} <b>{e(claim)}</b> — {e(evidence)}</li>")
    else:
        parts.append("<li>none checked (the families a claim needs are not in the results)</li>")
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    results: Sequence[ModelMetrics],
    out_dir: str | Path,
    title: str = "SACPO evaluation",
    notes: list[str] | None = None,
    findings: Sequence[tuple[str, bool, str]] | None = None,
) -> dict[str, Path]:
    """Write report.md, report.html (figures embedded as base64) and the PNG figures to out_dir.

    One table row per model (sorted by family, then param), the figures of `plots.make_plots`, KL health warnings
    (`sacpo.math.kl.kl_health`), and the findings: each (claim, holds, evidence) as ✓/✗. findings=None runs
    `check_findings(results)`; pass [] for none. Returns {"report.md": …, "report.html": …, <figure>: …}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = list(results)
    found = check_findings(results) if findings is None else [tuple(f) for f in findings]
    header, rows = _columns(results)
    plots = make_plots(results, out)
    warnings = _warnings(results)
    md = out / "report.md"
    md.write_text(_markdown(title, notes or [], header, rows, plots, found, warnings), encoding="utf-8")
    page = out / "report.html"
    page.write_text(_html(title, notes or [], header, rows, plots, found, warnings), encoding="utf-8")
    return {"report.md": md, "report.html": page, **plots}
