"""The SACPO paper's qualitative claims (Wachi et al. 2024) checked on evaluation results: `check_findings`.

For the families present, each claim is reported as (claim, holds, evidence with the numbers) — a claim that fails
is reported as failed. Differences between models are judged by paired (cluster) bootstrap intervals over the rows'
per-prompt values (`sacpo.evaluate.contrasts`), a constraint by a one-sided lower confidence bound, never by a point
estimate that noise can flip unnoticed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from sacpo.evaluate.contrasts import (
    ROW_VALUE,
    Stats,
    contrast,
    group_by_param,
    is_confirmed,
    is_reversed,
    level,
    mean_terms,
    objective_per_prompt,
    signed,
)
from sacpo.evaluate.format import fmt_ci, num, plus_minus, point_label, sort_results, undefined
from sacpo.evaluate.metrics import ModelMetrics, constraint_holds
from sacpo.evaluate.plots import param_label
from sacpo.math.statistics import Interval, curve_weights, objective_gain, paired_difference, spearman

HELPFUL_FAMILY, SACPO, P_SACPO, NAIVE, OPTIMUM = "dpo-helpful", "sacpo", "p-sacpo", "naive-merge", "optimum"


class Finding(NamedTuple):
    """A qualitative claim checked on the results: the claim, whether it holds, and the numbers behind it."""

    claim: str
    holds: bool
    evidence: str


def _rho(x: float) -> str:
    return "undefined (NaN: constant values)" if math.isnan(x) else f"{x:+.2f}"


def _step1(models: list[ModelMetrics]) -> Finding:
    claim = "Step-1 DPO(helpful) raises helpfulness (win rate > 0.5) and lowers harmlessness (< 0.5) vs SFT"
    parts, holds = [], True
    for m in models:
        h, s = m.helpful_win, m.harmless_win
        if undefined(h[0], s[0]):
            holds = False
            parts.append(f"{point_label(m)} — undefined")
            continue
        ok = h[0] > 0.5 and s[0] < 0.5
        holds &= ok
        sig_h = "yes" if not undefined(h[1]) and h[1] > 0.5 else "no"
        sig_s = "yes" if not undefined(s[2]) and s[2] < 0.5 else "no"
        parts.append(f"{point_label(m)} (CI excludes ½: helpful {sig_h}, harmless {sig_s})")
    return Finding(claim, holds, "; ".join(parts))


def _trend(models: list[ModelMetrics], claim: str, label: str, signs: dict[str, int], st: Stats) -> Finding:
    """Neighbour and end-to-end paired differences of the win rates along the param (check_findings (2), (3))."""
    groups = group_by_param(models)
    names = {"helpful_win": "helpful", "harmless_win": "harmless"}
    parts, holds, n_rev = [], True, 0

    def diff(lo_rows: list[ModelMetrics], hi_rows: list[ModelMetrics], key: str) -> Interval:
        return contrast(mean_terms(hi_rows), mean_terms(lo_rows), key, st)

    for (p0, r0), (p1, r1) in itertools.pairwise(groups):
        cells = []
        for key, sign in signs.items():
            d = diff(r0, r1, key)
            rev = is_reversed(d, sign)
            n_rev += rev
            holds &= not undefined(*d) and not rev
            cells.append(f"Δ{names[key]} {signed(d)}" + (" REVERSED" if rev else ""))
        parts.append(f"{label} {p0:g}→{p1:g}: " + ", ".join(cells))
    (pa, ra), (pb, rb) = groups[0], groups[-1]
    ends = []
    for key, sign in signs.items():
        d = diff(ra, rb, key)
        ok = is_confirmed(d, sign)
        holds &= ok
        ends.append(
            f"Δ{names[key]} {signed(d)} (want {'>' if sign > 0 else '<'} 0{'' if ok else ': not shown'})"
        )
    pooled = sum(len(r) for _, r in groups) - len(groups)
    unit = "cluster" if all(m.clusters for m in models) else "prompt"
    missing = [m.name for m in models if not all(k in m.per_prompt for k in signs)]
    head = (
        (
            f"CIs undefined: no per-prompt values for {', '.join(missing)} (re-run the evaluation); "
            if missing
            else ""
        )
        + f"paired {level(st)} {unit} bootstrap CIs; end to end {label} {pa:g}→{pb:g}: "
        + ", ".join(ends)
        + f"; {n_rev} significant reversal(s) between neighbours"
    )
    pts = sorted(models, key=lambda m: m.param)
    params = [m.param for m in pts]
    rho = ", ".join(
        f"ρ({label}, {names[k]}) {_rho(spearman(params, [ROW_VALUE[k](m) for m in pts]))}" for k in signs
    )
    tail = f"Spearman (secondary) {rho}" + (f"; {pooled} row(s) sharing a param averaged" if pooled else "")
    return Finding(claim, holds, "; ".join([head, *parts, tail]))


def _sacpo_trend(models: list[ModelMetrics], st: Stats) -> Finding:
    claim = "SACPO: smaller β/λ (larger λ) gives higher harmlessness and lower helpfulness"
    return _trend(models, claim, "β/λ", {"helpful_win": 1, "harmless_win": -1}, st)


def _psacpo_trend(models: list[ModelMetrics], st: Stats) -> Finding:
    claim = "P-SACPO: raising the merge weight q trades helpfulness for harmlessness"
    return _trend(models, claim, "q", {"helpful_win": -1, "harmless_win": 1}, st)


def _meets_b(m: ModelMetrics, target: ModelMetrics | None, st: Stats) -> Finding:
    b = "b" if st.b is None else f"{st.b:g}"
    claim = f"SACPO at β/λ = {m.param:g} meets E[g] ≥ {b} (one-sided {level(st)} lower bound)"
    star = f"; π* at this β/λ: E*[g] {num(target.mean_safety)}" if target is not None else ""
    if undefined(m.safety_lcb):
        holds = False
        why = "lower bound undefined (NaN: results.json without it, or < 2 prompts/clusters)"
        return Finding(claim, holds, f"{m.name}: E[g] {plus_minus(m.mean_safety, m.safety_se)}; {why}{star}")
    holds = constraint_holds(m.safety_lcb, st.b) if st.b is not None else m.constraint_ok
    return Finding(
        claim,
        holds,
        f"{m.name}: E[g] {plus_minus(m.mean_safety, m.safety_se)}, lower bound {num(m.safety_lcb)} "
        f"{'≥' if holds else '<'} {b}{star}",
    )


def _curve_point(naive: list[ModelMetrics], w: np.ndarray) -> str:
    q = float(sum(wi * n.param for wi, n in zip(w, naive, strict=True) if n.param is not None))
    return f"q≈{q:.2f}"


def _worse(t: Interval) -> str:
    if undefined(t[1], t[2]):
        return ""
    return " (significantly worse)" if t[2] < 0 else " (significantly better)" if t[1] > 0 else ""


def _vs_naive_helpfulness(naive: list[ModelMetrics], ours: list[ModelMetrics], st: Stats) -> Finding:
    """E[g] of every SACPO / P-SACPO point minus the naive curve's E[g] interpolated at the point's E[r]."""
    claim = "SACPO / P-SACPO is at least as safe as the naive merge at equal helpfulness (E[g] at equal E[r])"
    curve = sorted(naive, key=lambda m: (m.param is None, m.param or 0.0))
    xs, ys = [m.mean_reward for m in curve], [m.mean_safety for m in curve]
    parts, outside, holds, n = [], [], True, 0
    for m in ours:
        w = curve_weights(xs, ys, m.mean_reward) if not undefined(m.mean_reward, *xs, *ys) else None
        if w is None:
            outside.append(m.name)
            continue
        d = contrast([(1.0, m)], [(wi, c) for wi, c in zip(w, curve, strict=True) if wi], "safety", st)
        n += 1
        holds &= d[0] >= 0
        parts.append(
            f"{m.name}: E[r] {num(m.mean_reward)}, naive at {_curve_point(curve, w)}: ΔE[g] {signed(d)}{_worse(d)}"
        )
    rng = f"[{num(min(xs))}, {num(max(xs))}]" if not undefined(*xs) else "undefined"
    if outside:
        parts.append(f"outside the naive E[r] range {rng} (not compared): {', '.join(outside)}")
    if not n:
        holds = False
        parts.insert(0, "no SACPO / P-SACPO point within the naive curve's helpfulness range")
    head = (
        f"naive curve over q = {', '.join(num(m.param, 2) for m in curve)}; ΔE[g] = ours − naive, paired CI"
    )
    return Finding(claim, holds, "; ".join([head, *parts]))


def _vs_naive_kl(naive: list[ModelMetrics], ours: list[ModelMetrics], st: Stats) -> Finding:
    """E[r] and E[g] of every SACPO / P-SACPO point minus the naive curve's at the point's KL (each against the
    best naive value among the curve's crossings of that KL)."""
    claim = "SACPO / P-SACPO is at least as helpful and as safe as the naive merge at equal KL"
    curve = sorted(naive, key=lambda m: (m.param is None, m.param or 0.0))
    xs = [m.kl for m in curve]
    parts, outside, holds, n = [], [], True, 0
    for m in ours:
        if undefined(m.kl, *xs):
            outside.append(m.name)
            continue
        cells = []
        for key, label in (("reward", "E[r]"), ("safety", "E[g]")):
            w = curve_weights(xs, [ROW_VALUE[key](c) for c in curve], m.kl)
            if w is None or undefined(*[ROW_VALUE[key](c) for c in curve]):
                break
            d = contrast([(1.0, m)], [(wi, c) for wi, c in zip(w, curve, strict=True) if wi], key, st)
            holds &= d[0] >= 0
            cells.append(f"Δ{label} {signed(d)}{_worse(d)}")
        if len(cells) < 2:
            outside.append(m.name)
            continue
        n += 1
        parts.append(f"{m.name} (KL {num(m.kl, 2)}): " + ", ".join(cells))
    rng = f"[{num(min(xs), 2)}, {num(max(xs), 2)}]" if not undefined(*xs) else "undefined"
    if outside:
        parts.append(f"outside the naive KL range {rng} (not compared): {', '.join(outside)}")
    if not n:
        holds = False
        parts.insert(0, f"no SACPO / P-SACPO point within the naive curve's KL range {rng}")
    return Finding(claim, holds, "; ".join(parts))


def _matching(m: ModelMetrics, optimum: list[ModelMetrics]) -> ModelMetrics | None:
    """The optimum row whose param (β/λ) is m's."""
    for o in optimum:
        if o.param is not None and m.param is not None and math.isclose(o.param, m.param, rel_tol=1e-9):
            return o
    return None


def _gain(m: ModelMetrics, o: ModelMetrics, sft: ModelMetrics | None, st: Stats, min_gain: float) -> Finding:
    claim = f"SACPO at β/λ = {m.param:g} reaches ≥ {min_gain:.0%} of π*'s objective gain"
    keys = ("lam", "beta", "bt_scale")
    if sft is None or any(undefined(o.extra.get(k)) for k in keys):
        missing = "no SFT row" if sft is None else f"the optimum row lacks extra {list(keys)}"
        return Finding(claim, False, f"{m.name}: undefined ({missing})")
    lam, beta, scale = (float(o.extra[k]) for k in keys)
    g = objective_gain(
        (m.mean_reward, m.mean_safety, m.kl),
        (sft.mean_reward, sft.mean_safety),
        (o.mean_reward, o.mean_safety, o.kl),
        lam,
        beta,
        scale,
    )
    holds = not undefined(g.fraction) and g.fraction >= min_gain
    ev = (
        f"{m.name}: J = E[r] + λ·E[g] − (β/s)·KL with λ {lam:g}, β {beta:g}, s {scale:g}: J(SFT) "
        f"{num(g.objective_sft)}, J {num(g.objective)}, J(π*) {num(g.objective_opt)} → fraction "
        f"{num(g.fraction, 2)}; KL {num(m.kl, 2)} vs π* {num(o.kl, 2)} (excess {g.excess_kl:+.2f})"
    )
    # the margin J − (f·J* + (1 − f)·J(SFT)) ≥ 0 ⇔ fraction ≥ f: a linear contrast, so it has a paired CI
    pm, po = objective_per_prompt(m, lam, beta, scale), objective_per_prompt(o, lam, beta, scale)
    ps = objective_per_prompt(sft, lam, beta, scale, kl=False)
    if pm is not None and po is not None and ps is not None and len({len(pm), len(po), len(ps)}) == 1:
        if m.clusters == o.clusters == sft.clusters:
            margin = pm - (min_gain * po + (1 - min_gain) * ps)
            est, lo, hi = paired_difference(
                margin, np.zeros_like(margin), st.n_boot, st.seed, st.alpha, clusters=m.clusters
            )
            ev += f"; margin J − ({min_gain:g}·J* + {1 - min_gain:g}·J(SFT)) {signed((est, lo, hi))}"
    if not undefined(o.extra.get("ess")):
        ev += f"; π* ESS {o.extra['ess']:.0f}"
    return Finding(claim, holds, ev)


def _choose(ours: list[ModelMetrics], st: Stats) -> Finding:
    b = "b" if st.b is None else f"{st.b:g}"
    claim = f"Choose for the user: the most helpful SACPO / P-SACPO model whose E[g] lower bound meets {b}"

    def ok(m: ModelMetrics) -> bool:
        if undefined(m.safety_lcb):
            return False
        return constraint_holds(m.safety_lcb, st.b) if st.b is not None else m.constraint_ok

    feasible = [m for m in ours if ok(m)]
    if all(undefined(m.safety_lcb) for m in ours):
        return Finding(claim, False, "undefined: no lower bounds in these results (re-run the evaluation)")
    if not feasible:
        bounded = [m for m in ours if not undefined(m.safety_lcb)]
        best = max(bounded, key=lambda m: m.safety_lcb) if bounded else None
        closest = f"; highest lower bound {num(best.safety_lcb)} ({best.name})" if best else ""
        return Finding(claim, False, f"none of the {len(ours)} models meets {b} by its lower bound{closest}")
    pick = max(feasible, key=lambda m: (m.mean_reward, m.helpful_win[0]))
    label = param_label(pick.family, pick.param) if pick.param is not None else pick.family
    return Finding(
        claim,
        True,
        f"{pick.name} ({label}): E[r] {plus_minus(pick.mean_reward, pick.reward_se)}, helpful win "
        f"{fmt_ci(pick.helpful_win)}, E[g] lower bound {num(pick.safety_lcb)} ≥ {b}; {len(feasible)} of "
        f"{len(ours)} meet it: {', '.join(m.name for m in feasible)}",
    )


def check_findings(
    results: Sequence[ModelMetrics],
    b: float | None = None,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    min_gain: float = 0.8,
) -> list[Finding]:
    """The SACPO paper's qualitative claims, each checked when the families it needs are present.

    Rows of family "optimum" (π*_λ estimated from gold oracles, param β/λ) are targets, not trained models: they
    enter only (6). Differences between two models are paired: the per-prompt values of both (per_prompt) are
    resampled together, by cluster when the rows carry clusters; without per-prompt values a CI is NaN and a
    claim that needs one does not hold.

    (1) dpo-helpful: helpful win > ½ and harmless win < ½ (point estimates; the evidence says whether the CIs
        exclude ½).
    (2) sacpo (param β/λ, ≥ 2 distinct values): along β/λ, no neighbour difference of the helpful / harmless win
        rates is significantly reversed (helpful should rise, harmless fall with β/λ; CI entirely on the wrong
        side of 0), and the end-to-end difference (largest − smallest β/λ) is significant in the expected
        direction for both. Spearman ρ is shown as secondary information.
    (3) p-sacpo (param q, ≥ 2 distinct values): the same with q (harmless rises, helpful falls).
    (4) per sacpo row: the one-sided (1 − α) lower bound of E[g] (safety_lcb) ≥ b (b None: the row's
        constraint_ok).
    (5) naive-merge (a curve over q): every sacpo / p-sacpo point within the curve's E[r] range has E[g] ≥ the
        curve's E[g] linearly interpolated at its E[r] (`curve_weights`); and within the curve's KL range, E[r]
        and E[g] ≥ the curve's at its KL. Point estimates decide; the evidence gives paired CIs (interpolation
        weights fixed at the point estimates) and flags significant differences.
    (6) per sacpo row with an optimum row of the same param and an sft row: (J(π) − J(SFT)) / (J(π*) − J(SFT))
        ≥ min_gain, J = E[r] + λ·E[g] − (β/s)·KL (`objective_gain`; λ, β, s from the optimum row's extra).
    (7) choose: the sacpo / p-sacpo row with the highest E[r] among those whose lower bound meets b; does not
        hold when none does.
    """
    st = Stats(b, alpha, n_boot, seed)
    by: dict[str, list[ModelMetrics]] = {}
    for m in results:
        by.setdefault(m.family, []).append(m)
    out = []
    if by.get(HELPFUL_FAMILY):
        out.append(_step1(by[HELPFUL_FAMILY]))
    for family, check in ((SACPO, _sacpo_trend), (P_SACPO, _psacpo_trend)):
        swept = [m for m in by.get(family, []) if m.param is not None]
        if len({m.param for m in swept}) >= 2:
            out.append(check(swept, st))
    sacpo = sorted((m for m in by.get(SACPO, []) if m.param is not None), key=lambda m: (m.param, m.name))
    optimum = by.get(OPTIMUM, [])
    out += [_meets_b(m, _matching(m, optimum), st) for m in sacpo]
    ours = sort_results(by.get(SACPO, []) + by.get(P_SACPO, []))
    if by.get(NAIVE) and ours:
        out.append(_vs_naive_helpfulness(by[NAIVE], ours, st))
        out.append(_vs_naive_kl(by[NAIVE], ours, st))
    sft = next(iter(by.get("sft", [])), None)
    for m in sacpo:
        o = _matching(m, optimum)
        if o is not None:
            out.append(_gain(m, o, sft, st, min_gain))
    if ours:
        out.append(_choose(ours, st))
    return [Finding(f.claim, bool(f.holds), f.evidence) for f in out]  # plain bools (numpy comparisons)
