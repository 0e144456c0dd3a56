"""sacpo.evaluate.plots: figures are written (valid, non-empty PNG) for full, single-point and NaN results."""

import dataclasses

import pytest
from eval_helpers import NAN, metrics

from sacpo.evaluate import plots
from sacpo.evaluate.plots import OPTIMUM_LABEL, PLOTS, family_style, make_plots, plot_win_rates

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000


def test_make_plots_writes_every_figure(paper_results, tmp_path):
    paths = make_plots(paper_results, tmp_path / "figs")
    assert set(paths) == set(PLOTS)
    for p in paths.values():
        assert_png(p)


@pytest.mark.parametrize(
    "results",
    [
        [metrics("sft", "sft", None, 0.5, 0.5, kl=0.0, kl_se=NAN)],  # a single point
        [
            metrics("a", "sacpo", 0.1, 0.6, 0.4, helpful_win=(0.6, NAN, NAN), kl_se=NAN, reward_se=NAN),
            metrics("b", "sacpo", 0.2, 0.7, 0.3, harmless_win=(0.3, 0.35, 0.2)),  # CI not around the estimate
            metrics("art", "bon", 4.0, 0.7, 0.6, kl=NAN, kl_se=NAN),  # undefined KL: left out of KL plots
        ],
        [
            metrics("x", "my-family", None, NAN, NAN, kl=NAN, kl_se=NAN, mean_reward=NAN, p_safe=NAN)
        ],  # nothing
        [],
    ],
    ids=["single", "nan-ci", "all-nan", "empty"],
)
def test_plots_handle_degenerate_results(results, tmp_path):
    for p in make_plots(results, tmp_path).values():
        assert_png(p)


def test_unknown_family_has_stable_style(tmp_path):
    # here's the maths: a known family has its own style; an unknown one takes spare style Σ ord(c) mod 5.
    # "my-family": 109 + 121 + 45 + 102 + 97 + 109 + 105 + 108 + 121 = 917 ≡ 2 → the third spare style
    assert family_style("sacpo") == ("tab:blue", "o")
    assert family_style("my-family") == ("tab:cyan", "<")
    assert family_style("ab") == ("tab:pink", "P")  # 97 + 98 = 195 ≡ 0
    r = [dataclasses.replace(metrics("m", "my-family", 1.0, 0.6, 0.6), name="m")]
    assert_png(plot_win_rates(r, tmp_path / "nested" / "w.png", title="custom"))


def test_optimum_rows_are_one_frontier_line_without_error_bars(paper_results, tmp_path):
    from matplotlib.figure import Figure

    opt = [
        metrics(f"optimum-{p}", "optimum", p, h, s, kl=kl)
        for p, h, s, kl in (
            (0.4, 0.8, 0.4, 1.0),
            (0.05, 0.6, 0.8, 3.0),
            (0.1, 0.7, 0.6, 2.0),
            (0.2, 0.7, 0.6, 2.0),
        )
    ]
    results = [*paper_results, *opt]
    ax = Figure().subplots()
    plots._scatter(ax, results, plots._kl, plots._reward, kl_axis=True)
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == OPTIMUM_LABEL]
    assert list(line.get_xdata()) == [1.0, 2.0, 2.0, 3.0]  # sorted by KL
    assert list(line.get_ydata()) == [1.6, 1.4, 1.4, 1.2]  # E[r] = 2·helpful
    # no error bars for π*: every errorbar container belongs to another family
    assert all(c.get_label() != OPTIMUM_LABEL for c in ax.containers)
    assert "optimum" not in [c.get_label() for c in ax.containers]
    texts = [t.get_text() for t in ax.texts]
    assert "β/λ=0.1, 0.2" in texts and "β/λ=0.4" in texts  # coinciding points share one label
    # on the win-rate plane the frontier follows β/λ
    ax = Figure().subplots()
    plots._scatter(ax, results, plots._helpful, plots._harmless)
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == OPTIMUM_LABEL]
    assert list(line.get_xdata()) == [0.6, 0.7, 0.7, 0.8]
    for p in make_plots(results, tmp_path).values():
        assert_png(p)
