"""sacpo.evaluate.report: the SACPO paper's claims checked on results, and the md/html report."""

import dataclasses
import html

from eval_helpers import metrics

from sacpo.evaluate.report import Finding, check_findings, sort_results, write_report


def by_claim(findings):
    return {f.claim.split(":")[0].split(" ")[0]: f for f in findings}


def test_check_findings_all_hold_on_paper_shaped_results(paper_results):
    found = check_findings(paper_results)
    assert len(found) == 4
    assert all(isinstance(f, Finding) and f.holds for f in found), found
    step1, sacpo, psacpo, naive = found
    assert "0.700" in step1.evidence and "0.350" in step1.evidence
    assert "ρ(β/λ, harmless) = -1.00" in sacpo.evidence and "ρ(β/λ, helpful) = +1.00" in sacpo.evidence
    assert "ρ(q, harmless) = +1.00" in psacpo.evidence
    # closest helpfulness to the naive merge (0.657) among SACPO / P-SACPO is psacpo-q0.5 (0.66)
    assert "closest psacpo-q0.5" in naive.evidence and "harmless 0.550" in naive.evidence


def test_check_findings_reports_failures_honestly(paper_results):
    r = {m.name: m for m in paper_results}
    r["helpful"] = dataclasses.replace(r["helpful"], harmless_win=(0.55, 0.5, 0.6))  # step 1 made it safer
    r["safe-lam2"] = dataclasses.replace(
        r["safe-lam2"], harmless_win=(0.40, 0.35, 0.45)
    )  # breaks monotonicity
    r["psacpo-q0.75"] = dataclasses.replace(r["psacpo-q0.75"], harmless_win=(0.30, 0.25, 0.35))
    r["naive-q0.5"] = dataclasses.replace(r["naive-q0.5"], harmless_win=(0.90, 0.85, 0.95))
    found = check_findings(list(r.values()))
    assert [f.holds for f in found] == [False, False, False, False]
    assert "harmless 0.550" in found[0].evidence


def test_check_findings_only_for_present_families(paper_results):
    only = [m for m in paper_results if m.family in ("sft", "sacpo")]
    found = check_findings(only)
    assert len(found) == 1 and found[0].claim.startswith("SACPO")
    single = [m for m in paper_results if m.name in ("sft", "safe-lam1")]
    assert check_findings(single) == []  # one β/λ is no trend


def test_check_findings_nan_does_not_hold(paper_results):
    nan = float("nan")
    r = [
        dataclasses.replace(m, helpful_win=(nan, nan, nan)) if m.family == "dpo-helpful" else m
        for m in paper_results
    ]
    assert not check_findings(r)[0].holds and "undefined" in check_findings(r)[0].evidence


def test_sort_results_by_family_then_param(paper_results):
    names = [m.name for m in sort_results(reversed(paper_results))]
    assert names[:2] == ["sft", "helpful"]
    assert names[2:5] == ["safe-lam2", "safe-lam1", "safe-lam0.5"]  # β/λ ascending
    assert names[-1] == "safe_kto"


def test_write_report_md_and_html(paper_results, tmp_path):
    results = [*paper_results, metrics("<b>odd|name</b>", "custom", None, 0.5, 0.5, extra={"len": 3.0})]
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
    for name in ("win_rates.png", "helpful_vs_kl.png", "gold_vs_kl.png"):
        assert paths[name].stat().st_size > 0


def test_write_report_default_findings_and_none(paper_results, tmp_path):
    md = write_report(paper_results, tmp_path / "a")["report.md"].read_text()
    assert md.count("- ✓ **") == 4
    md = write_report(paper_results[:1], tmp_path / "b", findings=[])["report.md"].read_text()
    assert "none checked" in md
