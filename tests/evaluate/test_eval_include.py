"""Inference results (best-of-n, controlled decoding) on the report's axes next to trained models:
`report_from_dir(..., include=...)`, the KL-kind column and legends, the best-of-n KL bound points."""

import json

import pytest
import yaml
from eval_helpers import metrics

from sacpo.config import ConfigError
from sacpo.evaluate.plots import KL_KINDS, _scatter, kl_kind
from sacpo.evaluate.run import load_results, save_results
from sacpo.recipes.eval import include_results, report_from_dir


def _bon_rows():
    return [
        metrics("base", "sft", None, 0.5, 0.5, kl=0.0, kl_se=0.0),
        *(
            metrics(
                f"bon-n{n}", "bon", float(n), 0.5 + 0.1 * i, 0.5 - 0.05 * i, kl=0.9 * b, extra={"kl_bound": b}
            )
            for i, (n, b) in enumerate([(2, 0.193), (4, 0.636), (8, 1.204)], start=1)
        ),
    ]


def _cd_rows():
    return [
        metrics("base", "sft", None, 0.5, 0.5, kl=0.0, kl_se=0.0),
        metrics("cd-block K=4 M=4", "cd-block", 4.0, 0.8, 0.4, kl=3.1, kl_se=0.1, extra={"kl_bound": 6.4}),
    ]


@pytest.fixture
def dirs(paper_results, tmp_path):
    ev, bon, cd = tmp_path / "eval", tmp_path / "bon", tmp_path / "cd"
    save_results(paper_results, ev / "results.json")
    save_results(_bon_rows(), bon / "results.json")
    save_results(_cd_rows(), cd / "results.json")
    for d, n in ((ev, 4), (bon, 4), (cd, 2)):
        (d / "config.yaml").write_text(
            yaml.safe_dump({"prompts": "p.json", "prompts_split": "test", "n_samples": n})
        )
    return ev, bon, cd


def test_include_merges_rows_drops_their_base_and_notes_differences(paper_results, dirs):
    ev, bon, cd = dirs
    merged, notes = include_results(load_results(ev), ev, [bon, cd])
    names = [m.name for m in merged]
    assert names[: len(paper_results)] == [m.name for m in paper_results]
    assert names[len(paper_results) :] == ["bon-n2", "bon-n4", "bon-n8", "cd-block K=4 M=4"]
    assert [m.family for m in merged].count("sft") == 1  # the included runs' own base rows are dropped
    assert "that run's own base samples" in notes[0] and "differs" not in notes[0]
    assert "differs from this report's run in n_samples (2 vs 4)" in notes[1]
    # a name collision keeps both rows
    again, _ = include_results(merged, ev, [bon])
    assert "bon-n2 (bon)" in [m.name for m in again]
    with pytest.raises(ConfigError, match=r"no results\.json"):
        include_results(merged, ev, [ev / "nope"])


def test_report_with_includes_says_what_each_kl_is(dirs, tmp_path):
    ev, bon, cd = dirs
    paths = report_from_dir(ev, "combined", include=[bon, cd], dest=tmp_path / "combined")
    md = paths["report.md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    kind = cols.index("KL kind")
    rows = {
        r[0]: r
        for r in ([c.strip() for c in line.strip("|").split("|")] for line in md.splitlines())
        if len(r) == len(cols)
    }
    assert (
        rows["bon-n4"][kind] == "ε / level estimate"
        and rows["cd-block K=4 M=4"][kind] == "per-block ε-estimate"
    )
    assert rows["safe-lam1"][kind] == "k1 sample mean"
    assert rows["bon-n4"][cols.index("kl_bound")] == "0.636"
    assert "per-block ε-estimate = blockwise CD" in md and "included" in md
    assert json.loads((tmp_path / "combined" / "findings.json").read_text())  # the SACPO findings still run
    assert not (ev / "report.md").exists()  # dest: the eval directory is left alone
    for png in ("win_rates.png", "helpful_vs_kl.png", "gold_vs_kl.png"):
        assert (tmp_path / "combined" / png).stat().st_size > 1000


def test_eval_config_include_is_used_when_rebuilding(dirs):
    ev, bon, _cd = dirs
    (ev / "config.yaml").write_text(yaml.safe_dump({"prompts": "p.json", "include": [str(bon)]}))
    md = report_from_dir(ev)["report.md"].read_text()
    assert "bon-n8" in md
    md = report_from_dir(ev, include=[])["report.md"].read_text()  # explicit: none
    assert "bon-n8" not in md


def test_kl_axis_legend_and_bound_points():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    rows = [metrics("sft", "sft", None, 0.5, 0.5, kl=0.0), *_bon_rows()[1:], *_cd_rows()[1:]]
    _scatter(ax, rows, lambda m: (m.kl, 0.0, 0.0), lambda m: (m.helpful_win[0], 0.0, 0.0), kl_axis=True)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert (
        "bon (KL: ε / level estimate)" in labels
        and "cd-block (KL: per-block ε-estimate)" in labels
        and "sft" in labels
    )
    bound = [line for line in ax.get_lines() if line.get_label().startswith("bon at its KL bound")]
    assert len(bound) == 1 and list(bound[0].get_xdata()) == [0.193, 0.636, 1.204]
    block = [line for line in ax.get_lines() if line.get_label().startswith("cd-block at its KL bound")]
    assert len(block) == 1 and list(block[0].get_xdata()) == [6.4]  # the block row's bound, hollow
    assert kl_kind("sacpo") == "k1 sample mean"
    assert set(KL_KINDS) >= {"bon", "bon-safe", "cd-token", "cd-block"}
