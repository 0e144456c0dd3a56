"""`sacpo theory` (sacpo.recipes.theory, sacpo.evaluate.theory): writes the report and figures; its exact checks hold.

Here's the maths. Tabular SACPO (two population-DPO steps) equals π_ref·exp((r + λg)/β)/Z, so its TV distance to
the closed form is round-off (≤ 1e-3 is the requirement; Newton reaches ~1e-11). On finite spaces the exact
best-of-n KL never exceeds log n − (n−1)/n and equals it in the limit of many equally likely distinct outcomes;
the best-of-n win rate is at most n/(n+1); and the KL-regularised optimum of the win probability r̃ is the exact
win-rate/KL frontier, which best-of-n cannot beat.
"""

import math

import pytest
import torch

from sacpo.evaluate.theory import _interp, win_rate_against_base, win_reward
from sacpo.recipes.theory import THEORY_FILE, run_theory


@pytest.fixture(scope="module")
def theory(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    return out, run_theory(out)


def test_writes_markdown_and_figures(theory):
    out, res = theory
    for name in (THEORY_FILE, "bon_kl.png", "win_vs_kl.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0
    assert (out / "bon_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / THEORY_FILE).read_text()
    assert "## (a) SACPO" in text and "![best-of-n KL](bon_kl.png)" in text and res["markdown"] == text


def test_sacpo_tv_distances_are_tiny(theory):
    _, res = theory
    rows = res["sacpo"]
    assert {r["order"] for r in rows if r["check"] == "SACPO"} == {"reward_first", "safety_first"}
    assert len({(r["beta"], r["lam"]) for r in rows if r["check"] == "SACPO"}) >= 2
    assert all(r["tv"] <= 1e-3 for r in rows) and res["max_tv"] <= 1e-3
    constrained = [r for r in rows if "b" in r]
    assert len(constrained) == 2 and all(
        r["lam"] > 0 and r["E_g"] == pytest.approx(r["b"], abs=1e-6) for r in constrained
    )


def test_bon_kl_exact_below_bound_and_estimator_in_range(theory):
    _, res = theory
    c = res["bon_kl"]
    for name, case in c["cases"].items():
        for n, bound, exact, est in zip(c["n"], c["bound"], case["exact"], case["estimator"], strict=True):
            assert exact <= bound + 1e-9, (name, n)
            assert -1e-12 <= est <= bound + 1e-9
    big = c["cases"]["uniform, K=1000"]
    assert big["exact"][c["n"].index(64)] == pytest.approx(c["bound"][c["n"].index(64)], rel=1e-3)
    small = c["cases"]["uniform, K=10"]
    assert small["exact"][-1] == pytest.approx(math.log(10), rel=1e-6)  # saturates at log K
    # 5 tied levels: the ε-estimator with ε = p(y) overestimates (2.80 vs 1.19 at n = 64); log(M_ℓ/q_ℓ) is exact
    tied = c["cases"]["random p, K=50, 5 tied levels"]
    assert tied["tied"] and not c["cases"]["random p, K=50"]["tied"]
    assert tied["level"] == pytest.approx(tied["exact"], abs=1e-12)
    i64 = c["n"].index(64)
    assert (
        tied["exact"][i64] == pytest.approx(1.1929, abs=1e-4)
        and tied["estimator"][i64] > 2 * tied["exact"][i64]
    )
    assert all(q >= e - 1e-9 for q, e in zip(tied["estimator_q"], tied["exact"], strict=True))
    assert "E[log M_ℓ/q_ℓ] (random p, K=50, 5 tied levels)" in res["markdown"]


def test_bon_win_rate_vs_kl_respects_bounds_and_frontier(theory):
    _, res = theory
    w = res["win_vs_kl"]
    bon = w["bon"]
    assert bon["win"] == sorted(bon["win"]) and bon["kl"] == sorted(bon["kl"])
    for n, wr in zip(bon["n"], bon["win"], strict=True):
        assert wr <= n / (n + 1) + 1e-12
    frontier = w["kl_reg_win"]
    for k, wr in zip(bon["kl"], bon["win"], strict=True):
        f = _interp(frontier["kl"], frontier["win"], k)
        if not math.isnan(f):
            assert wr <= f + 2e-3  # linear interpolation of a concave curve under-reads slightly


def test_win_reward_is_the_probability_of_beating_a_base_sample():
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert win_reward(p, r).tolist() == pytest.approx([0.5 + 0.25, 0.25, 0.75])
    assert win_rate_against_base(p, p, r) == pytest.approx(0.5)
