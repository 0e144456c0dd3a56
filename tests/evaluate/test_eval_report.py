"""sacpo.evaluate.report: the SACPO paper's claims checked on results (paired CIs, lower bounds, the naive curve,
π*), and the md/html report."""

import dataclasses
import html
import math

from eval_helpers import CLUSTERS, NAN, metrics

from sacpo.evaluate.findings import Finding, check_findings
from sacpo.evaluate.format import sort_results
from sacpo.evaluate.report import write_report


def by_start(findings, start):
    return [f for f in findings if f.claim.startswith(start)]


def test_check_findings_all_hold_on_paper_shaped_results(paper_results):
    found = check_findings(paper_results)
    assert all(isinstance(f, Finding) and f.holds for f in found), [f for f in found if not f.holds]
    claims = [f.claim.split(" ")[0] for f in found]
    assert claims == ["Step-1", "SACPO:", "P-SACPO:", "SACPO", "SACPO", "SACPO", "SACPO", "SACPO", "Choose"]
    step1, sacpo, psacpo = found[:3]
    assert "0.700" in step1.evidence and "0.350" in step1.evidence
    # neighbour differences: paired CIs are exact here (the synthetic rows differ by a constant on every prompt)
    assert (
        "β/λ 0.05→0.1: Δhelpful +0.040 [+0.040, +0.040], Δharmless -0.130 [-0.130, -0.130]" in sacpo.evidence
    )
    assert (
        "end to end β/λ 0.05→0.2: Δhelpful +0.080" in sacpo.evidence
        and "0 significant reversal" in sacpo.evidence
    )
    assert "cluster bootstrap" in sacpo.evidence and "ρ(β/λ, harmless) -1.00" in sacpo.evidence
    assert "q 0.25→0.5: Δhelpful -0.030" in psacpo.evidence
    meets = by_start(found, "SACPO at β/λ = 0.1 meets")
    assert len(meets) == 1 and "lower bound 0.070 ≥ b" in meets[0].evidence


def test_naive_curve_comparisons_by_hand(paper_results):
    found = check_findings(paper_results)
    at_r = next(f for f in found if "equal helpfulness" in f.claim)
    # safe-lam1 at E[r] 1.28: naive between (1.314, 0.02) and (1.2, 0.08), t = 0.034/0.114 → E[g] 0.0379;
    # ours 0.12 → Δ +0.082
    t = (1.28 - 1.314) / (1.2 - 1.314)
    want = 0.12 - (0.02 + t * 0.06)
    assert f"safe-lam1: E[r] 1.280, naive at q≈{0.5 + t * 0.25:.2f}: ΔE[g] {want:+.3f}" in at_r.evidence
    assert "not compared): psacpo-q0.25" in at_r.evidence  # E[r] 1.38 is above the curve's 1.36
    at_kl = next(f for f in found if "equal KL" in f.claim)
    # psacpo-q0.25 at KL 3.2: naive at t = 0.4 between KL 3.0 and 3.5 → E[r] 1.3416, E[g] −0.04
    assert "psacpo-q0.25 (KL 3.20): ΔE[r] +0.038" in at_kl.evidence and "ΔE[g] +0.010" in at_kl.evidence
    assert "outside the naive KL range [3.00, 4.20] (not compared): safe-lam2, safe-lam1" in at_kl.evidence


def test_check_findings_reports_failures_honestly(paper_results):
    r = {m.name: m for m in paper_results}
    r["helpful"] = metrics("helpful", "dpo-helpful", 0.1, 0.70, 0.55)  # step 1 made it safer
    r["safe-lam2"] = metrics("safe-lam2", "sacpo", 0.05, 0.60, 0.40, kl=6.0)  # harmless reversed
    r["psacpo-q0.75"] = metrics("psacpo-q0.75", "p-sacpo", 0.75, 0.63, 0.30, kl=4.6)
    r["naive-q0.75"] = metrics("naive-q0.75", "naive-merge", 0.75, 0.60, 0.95, kl=4.2)
    found = check_findings(list(r.values()), b=0.0)
    step1, sacpo, psacpo = found[:3]
    assert not step1.holds and "harmless 0.550" in step1.evidence
    assert not sacpo.holds and "Δharmless +0.220 [+0.220, +0.220] REVERSED" in sacpo.evidence
    assert "1 significant reversal" in sacpo.evidence
    assert not psacpo.holds and "REVERSED" in psacpo.evidence
    lam2 = by_start(found, "SACPO at β/λ = 0.05 meets E[g] ≥ 0")[0]
    assert not lam2.holds and "lower bound -0.150 < 0" in lam2.evidence  # judged on the bound, not E[g] −0.1
    at_r = next(f for f in found if "equal helpfulness" in f.claim)
    assert not at_r.holds and "(significantly worse)" in at_r.evidence


def test_trend_needs_a_significant_end_to_end_difference_and_flags_reversals():
    """Two SACPO points whose per-prompt differences straddle 0: no reversal, but no trend shown either."""
    sft = metrics("sft", "sft", None, 0.5, 0.5, kl=0.0)

    def row(name, param, helpful, harmless, helpful_pp):
        m = metrics(name, "sacpo", param, helpful, harmless)
        return dataclasses.replace(m, per_prompt={**m.per_prompt, "helpful_win": helpful_pp})

    noisy = [0.9, 0.9, 0.1, 0.1, 0.8, 0.8, 0.2, 0.2]  # mean 0.5, varying between clusters
    a = row("a", 0.05, 0.5, 0.7, noisy)
    b = row("b", 0.1, 0.52, 0.6, [0.52] * 8)  # Δhelpful +0.02 with per-prompt differences from −0.38 to +0.42
    found = check_findings([sft, a, b])
    trend = found[0]
    assert trend.claim.startswith("SACPO:") and not trend.holds
    assert "Δhelpful +0.020 (" not in trend.evidence and "(want > 0: not shown)" in trend.evidence
    assert "0 significant reversal" in trend.evidence


def test_rows_sharing_a_param_are_averaged(paper_results):
    extra = metrics("safe-lam1-seed1", "sacpo", 0.1, 0.66, 0.64, kl=5.0)  # a second training seed
    sacpo = check_findings([*paper_results, extra])[1]
    # β/λ 0.05→0.1: the two rows at 0.1 average to helpful 0.65 → Δ +0.05
    assert (
        "β/λ 0.05→0.1: Δhelpful +0.050" in sacpo.evidence
        and "1 row(s) sharing a param averaged" in sacpo.evidence
    )


def test_old_results_without_per_prompt_values_do_not_claim_a_trend(paper_results):
    old = [dataclasses.replace(m, per_prompt={}, clusters=None, safety_lcb=NAN) for m in paper_results]
    found = check_findings(old, b=0.0)
    sacpo = found[1]
    assert not sacpo.holds and "no per-prompt values" in sacpo.evidence and "CI NaN" in sacpo.evidence
    assert all(not f.holds and "lower bound undefined" in f.evidence for f in by_start(found, "SACPO at"))
    choose = by_start(found, "Choose")[0]
    assert not choose.holds and "no lower bounds" in choose.evidence


def test_choose_for_the_user(paper_results):
    choose = by_start(check_findings(paper_results, b=0.05), "Choose")[0]
    # lower bounds (harmless − 0.55): safe-lam1 0.07, safe-lam2 0.2, psacpo-q0.75 0.11 meet 0.05; the most
    # helpful of them by E[r] is safe-lam1 (1.28)
    assert choose.holds and choose.evidence.startswith("safe-lam1 (β/λ=0.1): E[r] 1.280")
    assert "3 of 6 meet it: safe-lam2, safe-lam1, psacpo-q0.75" in choose.evidence
    none = by_start(check_findings(paper_results, b=0.5), "Choose")[0]
    assert not none.holds and "none of the 6 models meets 0.5" in none.evidence
    assert "highest lower bound 0.200 (safe-lam2)" in none.evidence


def optimum_row(param, lam, reward, safety, kl, **kw):
    extra = {
        "lam": lam,
        "beta": 0.1,
        "bt_scale": 2.0,
        "ess": 40.0,
        "objective": reward + lam * safety - 0.05 * kl,
    }
    return metrics(f"optimum-lam{lam:g}", "optimum", param, 0.9, 0.9, kl=kl, mean_reward=reward,
                   mean_safety=safety, extra=extra, **kw)  # fmt: skip


def test_optimum_gain_by_hand_and_optimum_rows_are_not_models(paper_results):
    # safe-lam1 (β/λ 0.1, λ 1): E[r] 1.28, E[g] 0.12, KL 5; SFT: E[r] 1.0, E[g] 0.0
    # J = 1.28 + 0.12 − (0.1/2)·5 = 1.15; J(SFT) = 1.0; π*: E[r] 2.0, E[g] 0.5, KL 3 → J* = 2.5 − 0.15 = 2.35
    # fraction = 0.15 / 1.35 = 0.111; excess KL = +2
    opt = optimum_row(0.1, 1.0, 2.0, 0.5, 3.0)
    found = check_findings([*paper_results, opt])
    gains = by_start(found, "SACPO at β/λ = 0.1 reaches")
    assert len(gains) == 1 and not gains[0].holds
    ev = gains[0].evidence
    assert "J(SFT) 1.000, J 1.150, J(π*) 2.350 → fraction 0.11" in ev and "excess +2.00" in ev
    # the margin J − (0.8·J* + 0.2·J(SFT)) = 1.15 − 2.08 = −0.93, exact here (constant per-prompt offsets)
    assert "margin J − (0.8·J* + 0.2·J(SFT)) -0.930 [-0.930, -0.930]" in ev and "π* ESS 40" in ev
    # the optimum row reaches exactly 100% of its own gain; a model at 90% holds
    good = metrics("safe-lam1", "sacpo", 0.1, 0.64, 0.62, kl=3.0, mean_reward=1.9, mean_safety=0.5)
    rows = [good if m.name == "safe-lam1" else m for m in paper_results]
    g = by_start(check_findings([*rows, opt]), "SACPO at β/λ = 0.1 reaches")[0]
    assert g.holds and "fraction 0.93" in g.evidence  # (2.25 − 1) / 1.35
    # the optimum row is in no other finding, and the "meets b" finding quotes its E*[g]
    without = check_findings(paper_results)
    assert [f.claim for f in found if "reaches" not in f.claim] == [f.claim for f in without]
    assert all("optimum" not in f.evidence for f in found if "naive" in f.claim or "Choose" in f.claim)
    assert "π* at this β/λ: E*[g] 0.500" in by_start(found, "SACPO at β/λ = 0.1 meets")[0].evidence


def test_check_findings_only_for_present_families(paper_results):
    only = [m for m in paper_results if m.family in ("sft", "sacpo")]
    found = check_findings(only)
    assert [f.claim.split(" ")[0] for f in found] == ["SACPO:", "SACPO", "SACPO", "SACPO", "Choose"]
    single = [m for m in paper_results if m.name in ("sft",)]
    assert check_findings(single) == []


def test_check_findings_nan_does_not_hold(paper_results):
    r = [
        dataclasses.replace(m, helpful_win=(NAN, NAN, NAN)) if m.family == "dpo-helpful" else m
        for m in paper_results
    ]
    assert not check_findings(r)[0].holds and "undefined" in check_findings(r)[0].evidence


def test_sort_results_by_family_then_param(paper_results):
    rows = [*paper_results, optimum_row(0.1, 1.0, 2.0, 0.5, 3.0)]
    names = [m.name for m in sort_results(reversed(rows))]
    assert names[:2] == ["sft", "helpful"]
    assert names[2:6] == ["safe-lam2", "safe-lam1", "safe-lam0.5", "optimum-lam1"]  # β/λ ascending, then π*
    assert names[-1] == "safe_kto"


def test_write_report_md_and_html(paper_results, tmp_path):
    odd = metrics("<b>odd|name</b>", "custom", None, 0.5, 0.5, extra={"len": 3.0}, degenerate_share=0.125)
    results = [*paper_results, odd, optimum_row(0.1, 1.0, 2.0, 0.5, 3.0)]
    findings = [*check_findings(results), ("A claim that fails", False, "x = 0.1 < 0.2")]
    paths = write_report(results, tmp_path / "rep", title="Tiny run", notes=["seed 0"], findings=findings)
    md = paths["report.md"].read_text()
    page = paths["report.html"].read_text()
    for m in paper_results:
        assert m.name in md and m.name in page
    assert "odd\\|name" in md  # table cells escape |
    assert "&lt;b&gt;odd|name&lt;/b&gt;" in page and "<b>odd" not in page  # HTML escapes names
    for claim, holds, evidence in findings:
        assert f"{'✓' if holds else '✗'} **{claim}** — {evidence}" in md
        assert html.escape(claim) in page
    assert "✗ **A claim that fails**" in md
    assert "![win_rates.png](win_rates.png)" in md
    assert page.count("data:image/png;base64,") == 3
    assert "seed 0" in md and "Tiny run" in page
    assert "| RM | CM | len | n |" in md and "0.200" in md  # learned-model and extra columns when present
    header = md.split("| model |")[1].split("\n")[0]
    assert "E[g] LCB" in header and "degenerate" in header and "degen. KL share" in header
    assert "| safe-lam1 | sacpo | 0.1 |" in md and "| 0.070 |" in md  # the bound of safe-lam1
    assert "0.125" in md  # the odd row's degenerate share
    assert "optimum rows: π*_λ" in md and "| optimum-lam1 | optimum | 0.1 |" in md
    for name in ("win_rates.png", "helpful_vs_kl.png", "gold_vs_kl.png"):
        assert paths[name].stat().st_size > 0


def test_write_report_default_findings_and_none(paper_results, tmp_path):
    md = write_report(paper_results, tmp_path / "a")["report.md"].read_text()
    assert md.count("- ✓ **") == len(check_findings(paper_results)) and "- ✗ **" not in md
    md = write_report(paper_results[:1], tmp_path / "b", findings=[])["report.md"].read_text()
    assert "none checked" in md


def test_clusters_must_agree_to_pair(paper_results):
    other = [f"x{i}" for i in range(len(CLUSTERS))]
    r = [dataclasses.replace(m, clusters=other) if m.name == "safe-lam1" else m for m in paper_results]
    sacpo = check_findings(r)[1]
    assert not sacpo.holds and "β/λ 0.05→0.1: Δhelpful +0.040 CI NaN" in sacpo.evidence
    assert math.isfinite(r[0].mean_reward)
