"""The evaluation report: report.md + report.html with the table of every model, the figures and the findings.

The HTML is self-contained (figures embedded as base64 PNG data URIs), so it can be mailed or archived alone;
the Markdown references the PNG files written next to it by relative path. The findings (`sacpo.evaluate.findings`)
are the SACPO paper's claims checked on the results.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from sacpo.evaluate.findings import OPTIMUM, check_findings
from sacpo.evaluate.format import fmt_ci, num, plus_minus, sort_results
from sacpo.evaluate.judge_report import Table
from sacpo.evaluate.metrics import ModelMetrics
from sacpo.evaluate.plots import KL_KINDS, kl_kind, make_plots
from sacpo.fsutil import atomic_write_text
from sacpo.math.kl import kl_health

KL_NOTE = (
    "KL kind: k1 sample mean = mean of log π(y) − log π_SFT(y) on the model's samples (trained models); "
    "ε-estimator = best-of-n's KL̂(ε), ε = π_SFT(y_sel) (Beirami et al. 2024), an estimate, with the bound "
    "log n − (n−1)/n in kl_bound (where the selection score ties, the level estimate log(M̂/q̂) replaces it: "
    "kl_level_fraction); exact per-token sum = token-wise CD's Σ_t KL(q_t‖p_t) on the sampled path; "
    "per-block ε-estimate = blockwise CD's Σ_blocks KL̂(p(block | prefix), K), with the upper bound "
    "Σ_blocks (log K − (K−1)/K) in kl_bound."
)


TABLE_NOTE = (
    "Win rates: every sample of a model against every SFT sample of the same prompt (independent draws; ties "
    "count ½). E[g] LCB: the one-sided bootstrap lower confidence bound of E[g]; 'E[g] ≥ b' judges it (rows without "
    "a bound: the point estimate). degenerate: share of samples with a word repeated ≥ 3 times in a row; degen. KL "
    "share: the share of the model's KL sum those samples carry. NaN = undefined."
)
OPTIMUM_NOTE = (
    "optimum rows: π*_λ ∝ π_SFT·exp(s·(r + λg)/β), estimated from the gold oracles (param β/λ, the SACPO step it is "
    "the target of) — targets, not trained models; their KL is KL(π*‖π_SFT)."
)


# ------------------------------------------------------------------------------------------------ table
def _columns(results: Sequence[ModelMetrics]) -> tuple[list[str], list[list[str]]]:
    # the optimum rows' extra (λ, β, s, ESS, J) is shown in the findings and the note, not as columns
    extra_keys = sorted({k for m in results if m.family != OPTIMUM for k in m.extra if k not in ("rm", "cm")})
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
        "E[g] LCB",
        "P(safe)",
        "E[g] ≥ b",
        "KL(π‖π_SFT) ± se",
        "degenerate",
        "degen. KL share",
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
            fmt_ci(m.helpful_win),
            fmt_ci(m.harmless_win),
            plus_minus(m.mean_reward, m.reward_se),
            plus_minus(m.mean_safety, m.safety_se),
            num(m.safety_lcb),
            num(m.p_safe),
            "✓" if m.constraint_ok else "✗",
            plus_minus(m.kl, m.kl_se),
            num(m.degenerate_share),
            num(m.degenerate_kl_share),
        ]
        row += [kl_kind(m.family)] if kinds else []
        row += ([num(m.mean_rm)] if has_rm else []) + ([num(m.mean_cm)] if has_cm else [])
        row += [num(m.extra.get(k)) for k in extra_keys] + [str(m.n)]
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


def _optimum_note(results: Sequence[ModelMetrics]) -> str:
    rows = [m for m in sort_results(results) if m.family == OPTIMUM]
    if not rows:
        return ""
    ess = ", ".join(f"{m.name} {num(m.extra.get('ess'), 0)}" for m in rows)
    note = f"{OPTIMUM_NOTE} Effective sample size of the estimate (mean over prompts): {ess}."
    limit = [m for m in rows if m.extra.get("bon_limit") is not None]
    if limit:  # best-of-n of the SFT samples on r + λg: where the frontier goes as β → 0
        note += (
            " β → 0 limit (best-of-n of the SFT samples on r + λg, mean over prompts): "
            + ", ".join(f"λ = {num(m.extra.get('lam'), 2)}: {num(m.extra['bon_limit'])}" for m in limit)
            + "."
        )
    return note


def _markdown(title, notes, header, rows, plots, findings, warnings, optimum_note="", tables=()) -> str:
    lines = [f"# {title}", ""]
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    lines += ["## Results", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    lines += ["", TABLE_NOTE, ""]
    if optimum_note:
        lines += [optimum_note, ""]
    if "KL kind" in header:
        lines += [KL_NOTE, ""]
    if warnings:
        lines += ["### Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    for t in tables:
        lines += [f"## {t.title}", "", "| " + " | ".join(_md_cell(h) for h in t.header) + " |"]
        lines += ["|" + "---|" * len(t.header)] + [
            "| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows
        ]
        lines += ["", t.note, ""]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in plots] + [""]
    lines += ["## Findings", ""]
    if findings:
        lines += [f"- {'✓' if f[1] else '✗'} **{f[0]}** — {f[2]}" for f in findings]
    else:
        lines += ["- none checked (the families a claim needs are not in the results)"]
    return "\n".join(lines) + "\n"


def _html(title, notes, header, rows, plots, findings, warnings, optimum_note="", tables=()) -> str:
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
    parts.append(f"<p>{e(TABLE_NOTE)}</p>")
    if optimum_note:
        parts.append(f"<p>{e(optimum_note)}</p>")
    if "KL kind" in header:
        parts.append(f"<p>{e(KL_NOTE)}</p>")
    if warnings:
        parts.append("<h3>Warnings</h3><ul>" + "".join(f"<li>{e(w)}</li>" for w in warnings) + "</ul>")
    for t in tables:
        parts.append(
            f"<h2>{e(t.title)}</h2><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header)
        )
        parts.append("</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in t.rows]
        parts.append(f"</tbody></table><p>{e(t.note)}</p>")
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
    tables: Sequence[Table] = (),
) -> dict[str, Path]:
    """Write report.md, report.html (figures embedded as base64) and the PNG figures to out_dir.

    One table row per model (sorted by family, then param), the figures of `plots.make_plots`, KL health warnings
    (`sacpo.math.kl.kl_health`), and the findings: each (claim, holds, evidence) as ✓/✗. findings=None runs
    `check_findings(results)`; pass [] for none. tables: more sections after the results (e.g. the judges'
    `judge_report.judge_tables`). Returns {"report.md": …, "report.html": …, <figure>: …}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = list(results)
    found = check_findings(results) if findings is None else [tuple(f) for f in findings]
    header, rows = _columns(results)
    plots = make_plots(results, out)
    warnings = _warnings(results)
    note = _optimum_note(results)
    md = atomic_write_text(
        out / "report.md", _markdown(title, notes or [], header, rows, plots, found, warnings, note, tables)
    )
    page = atomic_write_text(
        out / "report.html", _html(title, notes or [], header, rows, plots, found, warnings, note, tables)
    )
    return {"report.md": md, "report.html": page, **plots}
