"""Best-of-n (sacpo.math.bon_select / bon_calibrate, sacpo.infer.pool, sacpo.recipes.bon): selection,
tie-breaking, calibration, one generate call per batch, artifacts.

Here's the maths. Best-of-n with rewards r over i.i.d. draws from p has the law `sacpo.math.bon.bon_pmf`
(ties shared in proportion to p), so `select_best` on simulated draws must reproduce it; its win rate against an
independent base draw is `bon_win_rate_exact` ≤ n/(n+1). With nested prefixes (BoN-n uses the first n of the
same candidates) the selected score per draw is non-decreasing in n, so the win rate is too. For the constrained
selection by r + λ·g the selected g is non-decreasing in λ ((λ₂ − λ₁)(g₂ − g₁) ≥ 0 for the two maximisers), and
`calibrate_bon` (a scan down from λ = ∞) returns the smallest λ meeting the target on the calibration draws.
"""

import dataclasses
import itertools
import json
import math
import shutil

import pytest
import torch

from sacpo.config import ConfigError, from_dict
from sacpo.evaluate.generate import read_samples
from sacpo.evaluate.run import load_results
from sacpo.infer.bon_config import BonConfig
from sacpo.infer.bon_stats import sample_rows, selection_score, selection_stats
from sacpo.infer.pool import CandidatePool, Scores, sample_candidates
from sacpo.math.bon import bon_kl_bound, bon_kl_estimate, bon_pmf, bon_win_rate_exact
from sacpo.math.bon_calibrate import calibrate_bon, lower_bound
from sacpo.math.bon_select import kl_stats, safety_statistic, select_best, take, tie_keys, win_outcomes
from sacpo.recipes import bon
from sacpo.recipes.bon import run_bon
from sacpo.scoring.base import FunctionScorer

D = torch.float64


def byte_sum(prompt, response: str) -> float:
    """A deterministic scorer with many distinct values on random byte strings."""
    return float(sum(map(ord, response)) % 97)


def safety_of(prompt, response: str) -> float:
    """A second, different deterministic score: 3 of 7 residues are 'safe' (g > 0)."""
    return float((sum(3 * ord(c) + 1 for c in response) % 7) - 3)


REWARD = FunctionScorer("bytesum", byte_sum)
SAFETY = FunctionScorer("g", safety_of)


# ------------------------------------------------------------------------------------------------ selection
def test_select_best_is_argmax_of_the_first_n():
    r = torch.tensor([[3.0, 1.0, 5.0, 9.0], [0.0, 2.0, 1.0, 2.0]], dtype=D)
    keys = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.9, 0.1, 0.5, 0.7]], dtype=D)
    assert select_best(r, keys, 1).tolist() == [0, 0]
    assert select_best(r, keys, 3).tolist() == [2, 1]
    assert select_best(r, keys, 4).tolist() == [3, 3]  # tie 2 vs 2: the larger key (0.7) wins
    with pytest.raises(ValueError):
        select_best(r, keys, 5)


def test_select_best_constrained_and_lexicographic():
    r = torch.tensor([[5.0, 3.0, 1.0]], dtype=D)
    g = torch.tensor([[-1.0, 0.5, 2.0]], dtype=D)
    keys = torch.zeros(1, 3, dtype=D)
    assert select_best(r, keys, 3, g, 0.0).item() == 0
    assert select_best(r, keys, 3, g, 1.0).item() == 0  # 4 vs 3.5 vs 3
    assert select_best(r, keys, 3, g, 2.0).item() == 2  # 3 vs 4 vs 5
    assert select_best(r, keys, 3, g, math.inf).item() == 2  # safest first


def test_ties_are_broken_uniformly_at_random():
    r = torch.zeros(20000, 4, dtype=D)
    counts = torch.bincount(select_best(r, tie_keys((20000, 4), seed=3), 4), minlength=4).double()
    assert ((counts / 20000 - 0.25).abs() < 0.015).all()
    # the keys are seeded: same seed, same choices
    assert torch.equal(tie_keys((5, 4), 1), tie_keys((5, 4), 1))


def test_selection_on_iid_draws_follows_the_exact_bon_pmf_and_win_rate():
    """Simulate best-of-n on a finite space with tied rewards: the empirical law of select_best and its win rate
    against an independent base draw match bon_pmf / bon_win_rate_exact (≤ n/(n+1))."""
    p = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=D)
    r = torch.tensor([0.0, 1.0, 1.0, 2.0, -1.0], dtype=D)  # a tie between outcomes 1 and 2
    g = torch.Generator().manual_seed(0)
    draws, n = 40000, 3
    ys = torch.multinomial(p, draws * (n + 1), replacement=True, generator=g).view(draws, n + 1)
    chosen = select_best(r[ys[:, :n]], tie_keys((draws, n), 0), n)
    y_sel = take(ys[:, :n], chosen)
    freq = torch.bincount(y_sel, minlength=5).double() / draws
    assert (freq - bon_pmf(p, r, n)).abs().max() < 0.01
    win = win_outcomes(r[y_sel], r[ys[:, n]]).mean()
    exact = bon_win_rate_exact(p, r, n).item()
    assert abs(win - exact) < 0.01
    assert exact <= n / (n + 1)
    rates = [bon_win_rate_exact(p, r, k).item() for k in (1, 2, 4, 8, 16)]
    assert rates[0] == pytest.approx(0.5)
    assert all(a < b for a, b in itertools.pairwise(rates))


def test_kl_stats_lie_between_zero_and_the_bound():
    logp = -torch.rand(30, 4, generator=torch.Generator().manual_seed(0), dtype=D) * 20
    for n in (1, 2, 8, 64):
        st = kl_stats(logp, n)
        assert st["bound"] == pytest.approx(bon_kl_bound(n))
        assert 0.0 <= st["estimate"] <= st["bound"] + 1e-12
    assert kl_stats(logp, 1)["estimate"] == 0.0
    with pytest.raises(ValueError, match="positive"):
        kl_stats(torch.tensor([[0.5]], dtype=D), 2)


def _synthetic_pool() -> tuple[CandidatePool, Scores]:
    """P = 2 prompts, S = 2 draws of N = 3 candidates (+ 2 base samples): M = 8 responses per prompt.
    Prompt 0 has a discrete reward (values 0–3, all texts distinct); prompt 1 a continuous one, where "y1" was
    sampled twice (columns 1 and 2: the same response, hence the same score)."""
    responses = [[f"x{j}" for j in range(8)], ["y0", "y1", "y1", "y3", "y4", "y5", "c0", "c1"]]
    reward = torch.tensor([[1, 3, 2, 3, 0, 1, 2, 3], [0.1, 0.9, 0.9, 0.3, 0.5, 0.2, 0.4, 0.6]], dtype=D)
    safety = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 0], [1, 0, 0, 1, 1, 0, 0, 1]], dtype=D)
    logp = -torch.arange(1, 17, dtype=D).view(2, 8) / 4
    pool = CandidatePool(
        prompts=["a", "b"],
        responses=responses,
        logp=logp,
        response_tokens=torch.arange(1, 17).view(2, 8),
        finished=torch.ones(2, 8, dtype=torch.bool),
        roundtrip=torch.ones(2, 8, dtype=torch.bool),
        n_draws=2,
        group_size=3,
    )
    return pool, Scores(reward=reward, safety=safety)


def test_kl_of_a_selection_uses_the_level_estimate_where_scores_tie():
    """Best-of-3 on the synthetic pool. Prompt 0 selects columns 1 and 3, both of reward 3, which two other
    distinct responses also score (columns 3 / 1 and 7): the reward is discrete there, and both use the level
    estimate over all 8 pooled responses, F̂ = 8/8, q̂ = 3/8: log((1 − (5/8)³)/(3/8)) = log(387/192) = 0.7009.
    Prompt 1 selects "y1" (tied only with its own repeat) and column 4: the ε-estimator with ε = p(y), unchanged."""
    pool, scores = _synthetic_pool()
    keys = tie_keys((2, 2, 3), 0)
    chosen = select_best(pool.grouped(scores.reward), keys, 3)
    col = pool.global_index(chosen)
    assert col[0].tolist() == [1, 3] and col[1, 1] == 4 and col[1, 0] in (1, 2)
    assert pool.distinct_ids()[1].tolist() == [0, 1, 1, 3, 4, 5, 6, 7]
    level = math.log(387 / 192)
    eps = bon_kl_estimate(pool.logp.gather(1, col)[1].exp(), 3)
    st = selection_stats(pool, scores, chosen, 3)
    assert st["kl"]["level_fraction"] == 0.5
    # compute: the 3 candidates of each draw sampled (tokens 1+2+3 = 6, 4+5+6 = 15 | 9+10+11 = 30, 12+13+14 = 39;
    # mean 90/4 = 22.5) and scored
    assert st["cost"] == {"base_sampled_tokens": 22.5, "scorer_calls": 3}
    assert st["kl"]["estimate"] == pytest.approx((level + eps.mean().item()) / 2, abs=1e-14)
    rows = sample_rows(pool, scores, col, 3, {}, None, torch.arange(2))
    assert [r["kl_estimator"] for r in rows] == ["level", "level", "epsilon", "epsilon"]
    got = [r["kl_estimate"] for r in rows]
    assert got == pytest.approx([level, level, *eps.tolist()], abs=1e-14)
    base = sample_rows(pool, scores, pool.base_columns(), 1, {}, None, torch.arange(2), is_base=True)
    assert all(r["kl_estimate"] == 0.0 and r["kl_estimator"] == "epsilon" for r in base)
    # the constrained selection's score: r + λ·g, and at λ = ∞ the order of (g, r) (ranks; ties kept)
    assert torch.equal(selection_score(scores, 0.0), scores.reward)
    assert torch.equal(selection_score(scores, 2.0), scores.reward + 2.0 * scores.safety)
    rank = selection_score(scores, math.inf)[
        0
    ]  # prompt 0: (g, r) = (0,1) (1,3) (1,2) (0,3) (1,0) (0,1) (1,2) (0,3)
    assert rank.argsort(stable=True).tolist() == [0, 5, 3, 7, 4, 2, 6, 1] and rank[0] == rank[5]


def test_calibrate_bon_finds_the_smallest_feasible_lambda():
    g_ = torch.Generator().manual_seed(1)
    r = torch.randn(200, 2, 8, generator=g_, dtype=D)
    g = torch.randn(200, 2, 8, generator=g_, dtype=D) - 0.3
    keys = tie_keys((200, 2, 8), 0)
    base = safety_statistic(take(g, select_best(r, keys, 8)), "prob")
    target = 0.9
    assert base < target
    cal = calibrate_bon(r, g, keys, 8, target, "prob")
    assert cal.feasible and cal.lam > 0
    assert cal.statistic >= target
    below = safety_statistic(take(g, select_best(r, keys, 8, g, cal.lam * 0.99)), "prob")
    assert below < target
    # monotone in λ
    stats = [safety_statistic(take(g, select_best(r, keys, 8, g, lam)), "mean") for lam in (0, 0.3, 1, 3, 30)]
    assert stats == sorted(stats)
    # already feasible: λ = 0; infeasible (n = 1 cannot choose): λ = ∞
    assert calibrate_bon(r, g, keys, 8, base, "prob").lam == 0.0
    inf = calibrate_bon(r, g, keys, 1, 0.99, "prob")
    assert not inf.feasible and math.isinf(inf.lam) and inf.statistic < 0.99


def test_lower_bound_by_hand():
    """m = 0.75, s = 0.5 (ddof 1) over C = 4 prompts; z(0.9) = 1.2816."""
    x = torch.tensor([1.0, 0.0, 1.0, 1.0])
    z = 1.2815515655446004
    assert lower_bound(x, 0.5) == 0.75  # the point estimate
    assert lower_bound(x, 0.9) == pytest.approx(0.75 - z * 0.5 * math.sqrt(1 / 4))  # population mean
    assert lower_bound(x, 0.9, n_future=4) == pytest.approx(0.75 - z * 0.5 * math.sqrt(1 / 4 + 1 / 4))
    assert lower_bound(torch.ones(5), 0.99) == 1.0  # no spread, no margin
    assert lower_bound(torch.tensor([0.9]), 0.9) == -math.inf  # one prompt: the spread is unknown
    with pytest.raises(ValueError, match="confidence"):
        lower_bound(x, 0.3)


def _draw_world(g_: torch.Generator, prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, S=4, N=8) rewards and safety scores; a per-prompt offset makes draws of one prompt correlated."""
    r = torch.randn(prompts, 4, 8, generator=g_, dtype=D)
    g = torch.randn(prompts, 4, 8, generator=g_, dtype=D) + 0.5 * torch.randn(
        prompts, 1, 1, generator=g_, dtype=D
    )
    return r, g


def test_calibration_margin_makes_the_heldout_constraint_hold_at_the_stated_confidence():
    """Fresh calibration and held-out prompts (40 each) from the same law, 120 times. With the point estimate
    (confidence ½) λ sits at the edge and the held-out P(safe) misses the target about half the time (63/120);
    with the lower bound at confidence 0.9 it meets it in at least about 90% of the trials (Wilson, the default:
    119/120; the former normal bound: 110/120), and never at the cost of the calibration bound.
    (tests/math/test_bon_calibrate.py measures the coverage where the normal bound falls short.)"""
    g_ = torch.Generator().manual_seed(7)
    target, trials = 0.8, 120
    met = {0.5: 0, 0.9: 0}
    lams = {0.5: [], 0.9: []}
    for _ in range(trials):
        r_c, g_c = _draw_world(g_, 40)
        r_h, g_h = _draw_world(g_, 40)
        k_c, k_h = tie_keys((40, 4, 8), 0), tie_keys((40, 4, 8), 1)
        for conf in met:
            cal = calibrate_bon(r_c, g_c, k_c, 8, target, "prob", confidence=conf, heldout_prompts=40)
            assert cal.feasible and cal.bound >= target
            lams[conf].append(cal.lam)
            held = safety_statistic(take(g_h, select_best(r_h, k_h, 8, g_h, cal.lam)), "prob")
            met[conf] += held >= target
    assert met[0.5] / trials < 0.7
    assert met[0.9] / trials > 0.8
    assert all(a <= b for a, b in zip(lams[0.5], lams[0.9], strict=True))  # the margin only raises λ


# ------------------------------------------------------------------------------------------------ sampling
def test_one_batched_sampling_call_per_prompt_batch(tiny_model, monkeypatch):
    """Candidates come from one batched call per batch of prompts: one prefill of the distinct prompts, each
    cache repeated S·(N+1) times (`sacpo.models.generate.sample_chunk`)."""
    from sacpo.models import generate
    from sacpo.models.load import load_model, load_tokenizer

    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    calls = []
    real = generate.sample_chunk

    def counting(model, prompts, eos_id, pad_id, n, *args, **kwargs):
        calls.append((len(prompts), n))
        return real(model, prompts, eos_id, pad_id, n, *args, **kwargs)

    monkeypatch.setattr(generate, "sample_chunk", counting)
    prompts = ["abc", "hello", "x", "tell me", "q"]
    pool = sample_candidates(model, tok, prompts, n_draws=2, group_size=3, max_new_tokens=5, batch_size=2)
    assert calls == [(2, 8), (2, 8), (1, 8)]  # ceil(5/2) calls, n = S·(N+1) = 8 samples per prompt
    assert pool.logp.shape == (5, 8) and len(pool.responses[4]) == 8
    assert pool.grouped(pool.logp).shape == (5, 2, 3) and pool.base(pool.logp).shape == (5, 2)
    assert (pool.logp < 0).all() and (pool.response_tokens >= 1).all()


def test_batched_sequence_logps_are_sequence_logps_of_the_ids_with_duplicates_scored_once(tiny_model):
    from sacpo.data.tokenize import Encoded, pad_sequences
    from sacpo.models.load import load_model
    from sacpo.models.logprobs import batched_sequence_logps, sequence_logps

    model = load_model(tiny_model).eval()
    seqs = [
        Encoded((5, 6, 7, 8), 2),
        Encoded((5, 6, 9), 2),
        Encoded((5, 6, 7, 8), 2),
        Encoded((1, 2, 3, 4, 5), 1),
    ]
    forwards = []
    forward = model.forward

    def counting(*args, **kwargs):
        forwards.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    model.forward = counting
    got = batched_sequence_logps(model, seqs, pad_id=0, batch_size=2, dedup=True)
    assert sum(forwards) == 3  # 3 distinct sequences
    forwards.clear()
    in_order = batched_sequence_logps(model, seqs, pad_id=0, batch_size=2, sort=False)
    assert forwards == [2, 2]  # every sequence, in the given order
    model.forward = forward
    with torch.no_grad():
        want = torch.stack([sequence_logps(model, pad_sequences([s], 0))[0] for s in seqs]).double()
    assert torch.allclose(got, want, atol=1e-5) and got[0] == got[2]
    assert got.dtype == in_order.dtype == torch.float64 and torch.allclose(in_order, want, atol=1e-5)


# ------------------------------------------------------------------------------------------------ end to end
def _bon_config(model, root, **fields) -> BonConfig:
    """A BonConfig on root/prompts.json writing root/out; the scorers are passed to run_bon directly."""
    base = {"prompts": str(root / "prompts.json"), "output_dir": str(root / "out"), "safety": "overridden"}
    return BonConfig(model=str(model), **base, batch_size=8, device="cpu", **fields)


@pytest.fixture(scope="module")
def bon_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bon")
    prompts = [f"prompt {i}: say something" for i in range(16)]
    (root / "prompts.json").write_text(json.dumps({"test": prompts}))
    cfg = _bon_config(
        tiny_model,
        root,
        ns=[1, 2, 4, 8],
        n_samples=4,
        target=0.6,  # 8 + 8 prompts: the Wilson bound (n_eff = 4) cannot certify more than 4/(4 + z²) = 0.71
        constraint="prob",
        calibration_fraction=0.5,
        max_new_tokens=6,
        n_boot=50,
    )
    summary = run_bon(cfg, show_progress=False, reward=REWARD, safety=SAFETY)
    return cfg, summary, root / "out", prompts


def test_run_bon_selects_the_argmax_and_win_rate_rises_with_n(bon_run):
    _cfg, summary, out, prompts = bon_run
    recs = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(recs) == len(prompts) and all(len(r["responses"]) == 4 * 9 for r in recs)
    for rec in recs:
        assert rec["reward"] == [byte_sum(None, y) for y in rec["responses"]]
        for n in (1, 2, 4, 8):
            for s, col in enumerate(rec["chosen"]["bon"][str(n)]):
                group = rec["reward"][s * 8 : s * 8 + n]
                assert s * 8 <= col < s * 8 + n and rec["reward"][col] == max(group)
    rates = [st["win_rate"]["mean"] for st in summary["bon"]]
    assert rates == sorted(rates) and rates[-1] > rates[0] + 0.15  # nested prefixes: non-decreasing in n
    for st in summary["bon"]:
        n, w = st["n"], st["win_rate"]
        assert w["mean"] <= n / (n + 1) + 3 * w["se"] + 0.02
        # byte_sum takes 97 values: most selections tie another response (level estimates, a plug-in over 36
        # responses per prompt); the mean may pass the bound by its noise and plug-in bias, never log n
        kl = st["kl"]
        assert 0.0 <= kl["estimate"] <= min(kl["bound"] + 3 * kl["estimate_se"] + 0.05, math.log(n) + 1e-12)
        assert kl["bound"] == pytest.approx(bon_kl_bound(n)) and 0.0 <= kl["level_fraction"] <= 1.0
    assert summary["bon"][0]["kl"]["estimate"] == 0.0


def test_constrained_bon_meets_its_target_on_calibration_and_reports_heldout(bon_run):
    cfg, summary, _out, _prompts = bon_run
    c = summary["constraint"]
    assert c["calibration_prompts"] == 8 and c["heldout_prompts"] == 8
    by_n = {st["n"]: st for st in summary["constrained"]}
    top = by_n[8]
    assert top["feasible"] and top["lam"] is not None and top["lam"] >= 0
    assert top["calibration"]["constraint_statistic"] >= cfg.target
    assert top["calibration"]["constraint_ok"] is True
    assert isinstance(top["heldout"]["constraint_ok"], bool)
    assert top["heldout"]["constraint_statistic"] == pytest.approx(top["heldout"]["p_safe"])
    # the constrained selection is safer than the unconstrained one at the same n, on the calibration set
    unconstrained = {st["n"]: st for st in summary["bon"]}
    assert top["calibration"]["p_safe"] >= cfg.target > 0
    assert top["heldout"]["p_safe"] >= unconstrained[1]["p_safe"] - 0.2
    # n = 1 cannot select: infeasible unless the base already meets the target
    one = by_n[1]
    assert one["feasible"] == (one["calibration_bound"] >= cfg.target)


def test_bon_artifacts_are_readable_by_the_evaluation(bon_run, tiny_model):
    _cfg, summary, out, prompts = bon_run
    names = {p.name for p in (out / "samples").iterdir()}
    assert names == {"base"} | {f"bon-n{n}" for n in (1, 2, 4, 8)} | {f"bon-safe-n{n}" for n in (1, 2, 4, 8)}
    for name in names:
        rows = read_samples(out / "samples" / name / "samples.jsonl")
        assert len(rows) == len(prompts) * 4
        assert {(r.prompt_index, r.sample) for r in rows} == {(i, s) for i in range(16) for s in range(4)}
        assert all(r.logp_ref is not None and r.logp_ref <= 0 for r in rows)
        if name == "base":
            assert all(r.logp_policy == r.logp_ref for r in rows)
        else:
            assert all(r.logp_policy is None for r in rows)  # honest: log π⁽ⁿ⁾(y) is unknown
    raw = [
        json.loads(line) for line in (out / "samples" / "bon-n8" / "samples.jsonl").read_text().splitlines()
    ]
    eps_rows = [r for r in raw if r["kl_estimator"] == "epsilon"]
    assert all(0.0 <= r["kl_estimate"] <= r["kl_bound"] + 1e-12 for r in eps_rows)
    assert all(r["kl_estimate"] <= math.log(8) + 1e-12 for r in raw)  # log(M/q) ≤ log n
    level = sum(r["kl_estimator"] == "level" for r in raw) / len(raw)
    assert level == pytest.approx(summary["bon"][-1]["kl"]["level_fraction"])
    results = load_results(out)
    assert [m.name for m in results][:2] == ["base", "bon-n1"]
    bon8 = next(m for m in results if m.name == "bon-n8")
    assert (
        bon8.family == "bon"
        and bon8.param == 8
        and bon8.kl == pytest.approx(summary["bon"][-1]["kl"]["estimate"])
    )
    assert results[0].helpful_win[0] == 0.5 and results[0].kl == 0.0
    safe8 = next(m for m in results if m.name == "bon-safe-n8 [held-out]")
    held = summary["constrained"][-1]["heldout"]
    assert safe8.constraint_ok == held["constraint_ok"] and safe8.n_prompts == 8
    assert safe8.extra["constraint_statistic"] == pytest.approx(held["constraint_statistic"])


def test_bon_artifact_in_evaluate_models(bon_run, tiny_model, tmp_path):
    """`sacpo eval` can take a BoN samples.jsonl as an artifact model; its k1 KL is NaN (no log π⁽ⁿ⁾)."""
    from sacpo.evaluate.run import ModelSpec, evaluate_models

    _cfg, _summary, out, prompts = bon_run
    res = evaluate_models(
        {"bon-n8": ModelSpec(samples=out / "samples" / "bon-n8" / "samples.jsonl", family="bon", param=8)},
        tiny_model,
        prompts,
        REWARD,
        SAFETY,
        0.0,
        tmp_path / "eval",
        n_samples=4,
        max_new_tokens=6,
        show_progress=False,
        n_boot=20,
        device="cpu",
    )
    assert res[1].name == "bon-n8" and math.isnan(res[1].kl) and 0.0 <= res[1].helpful_win[0] <= 1.0


def test_recalibration_reuses_cached_candidates(bon_run, monkeypatch, tmp_path):
    cfg, summary, out, _prompts = bon_run
    shutil.copytree(out, tmp_path / "out")

    def no_sampling(*args, **kwargs):
        raise AssertionError("candidates should come from the cache")

    monkeypatch.setattr(bon, "sample_candidates", no_sampling)
    monkeypatch.setattr(bon, "load_model", no_sampling)
    cfg2 = dataclasses.replace(cfg, target=0.9, output_dir=str(tmp_path / "out"))
    s2 = run_bon(cfg2, show_progress=False, reward=REWARD, safety=SAFETY)
    assert s2["candidates_cached"] is True
    assert [st["win_rate"]["mean"] for st in s2["bon"]] == [st["win_rate"]["mean"] for st in summary["bon"]]
    assert s2["constraint"]["target"] == 0.9


def test_calibration_on_another_split_holds_out_every_reported_prompt(tiny_model, tmp_path):
    test = [f"test prompt {i}" for i in range(6)]
    calib = [f"calibration prompt {i}" for i in range(10)]
    (tmp_path / "prompts.json").write_text(json.dumps({"test": test, "dev": calib}))
    cfg = _bon_config(
        tiny_model,
        tmp_path,
        ns=[1, 4],
        n_samples=2,
        target=0.5,
        calibration_split="dev",
        calibration_max_prompts=8,
        max_new_tokens=4,
        n_boot=10,
    )
    summary = run_bon(cfg, show_progress=False, reward=REWARD, safety=SAFETY)
    c = summary["constraint"]
    assert (c["calibration_prompts"], c["heldout_prompts"]) == (8, 6) and c[
        "calibration_source"
    ] == "split 'dev'"
    assert summary["n_prompts"] == 6 and all(st["n_prompts"] == 6 for st in summary["bon"])
    for st in summary["constrained"]:
        assert st["heldout"]["n_prompts"] == 6 and st["calibration"]["n_prompts"] == 8
    for name in ("base", "bon-n4", "bon-safe-n4"):
        rows = read_samples(tmp_path / "out" / "samples" / name / "samples.jsonl")
        assert sorted({r.prompt for r in rows}) == sorted(test) and len(rows) == 6 * 2
    recs = [
        json.loads(line) for line in (tmp_path / "out" / "candidates.jsonl").read_text().split("\n") if line
    ]
    assert [r["split"] for r in recs] == ["calibration"] * 8 + ["heldout"] * 6
    assert {r.name: r.n_prompts for r in load_results(tmp_path / "out" / "results.json")}["bon-n4"] == 6


def test_config_validation():
    base = {"model": "m", "prompts": "p.json", "output_dir": "o"}

    def error(**fields) -> str:
        with pytest.raises(ConfigError) as e:
            from_dict(BonConfig, {**base, **fields})
        return str(e.value)

    assert error(ns=[0, 2]) == "ns[0] must be >= 1, got 0"
    assert error(ns=[]) == "ns must be non-empty, got []"
    assert "safety" in error(target=0.9)
    assert error(safety="toyworld-safety", target=0.9, constraint="median") == (
        "unknown constraint 'median'; valid constraints: prob, mean"
    )
    assert error(reward_aggregate="median").startswith("unknown reward_aggregate 'median'; valid ")
    assert "probability" in error(safety="toyworld-safety", target=1.5)
    assert "oracle" in error(oracle="nope")
    assert "confidence" in error(safety="toyworld-safety", target=0.9, confidence=1.0)
    assert "calibrate on other prompts" in error(
        safety="toyworld-safety", target=0.9, calibration_split="test"
    )
    assert error(device="gpu").startswith("device: 'gpu' is not a device")
    assert from_dict(BonConfig, {**base, "safety": "toyworld-safety", "target": 0.5}).constrained
    with pytest.raises(ConfigError, match="calibrate on other prompts"):  # cross-field checks: also in Python
        BonConfig(**base, safety="toyworld-safety", target=0.9, calibration_split="test")
    # bounds of a config built in Python: checked by run_bon before anything loads
    with pytest.raises(ConfigError, match=r"ns\[0\] must be >= 1"):
        bon.run_bon(BonConfig(**base, ns=[0]), show_progress=False)


# ---------------------------------------------------------------------------------- constrained: held-out
def _bits(response: str) -> bytes:
    import hashlib

    return hashlib.md5(response.encode()).digest()


# Independent fair-coin scores of each response: r ∈ {0, 1}, g ∈ {0, 1}, safe ⇔ g > ½.
COIN_R = FunctionScorer("coin-r", lambda p, y: float(_bits(y)[0] & 1))
COIN_G = FunctionScorer("coin-g", lambda p, y: float(_bits(y)[1] & 1))


def test_calibrated_lambda_makes_the_heldout_constraint_hold(tiny_model, tmp_path):
    """Here's the maths. With r, g independent fair coins and score r + λ·g over n = 4 candidates:
    λ = 0 ignores g (P(safe) = P(g = 1) = ½, g being independent of r), 0 < λ < 1 prefers (1,1) > (1,0) > (0,1)
    (P(safe) = 1 − (¾)⁴ + (½)⁴ − (¼)⁴ ≈ 0.742), λ > 1 prefers (1,1) > (0,1) > (1,0) (P(safe) = 1 − (½)⁴ = 0.9375).
    A target of 0.85 is achievable and lies between the levels, so the calibrated λ is the step at λ = 1 and the
    held-out prompts — other candidates, same law — meet the target, while λ = 0 misses it there.
    *At* λ = 1 exactly (1,0) and (0,1) tie and P(safe) is in between (≈ 0.84), so whether λ = 1 itself meets 0.85
    depends on the tie keys: on this calibration set it did (0.852) but not held out (0.828) — calibrate_bon must
    step past the jump (it returns λ·(1 + 1e-6)); without that this test fails."""
    prompts = [f"prompt {i}: say something" for i in range(128)]
    (tmp_path / "prompts.json").write_text(json.dumps({"test": prompts}))
    cfg = BonConfig(
        model=str(tiny_model),
        prompts=str(tmp_path / "prompts.json"),
        output_dir=str(tmp_path / "out"),
        ns=[4],
        n_samples=4,
        safety="overridden",
        target=0.85,
        constraint="prob",
        safe_threshold=0.5,
        calibration_fraction=0.5,
        max_new_tokens=8,
        batch_size=32,
        n_boot=20,
        device="cpu",
    )
    summary = run_bon(cfg, show_progress=False, reward=COIN_R, safety=COIN_G)
    assert summary["distinct_fraction"] > 0.9  # the coins are (nearly) independent across candidates
    (c,) = summary["constrained"]
    assert c["feasible"] and 1.0 < c["lam"] <= 1.0 + 1e-5  # just past the step of P(safe)(λ) at λ = 1
    held = c["heldout"]
    assert held["constraint_ok"] is True and held["constraint_statistic"] >= cfg.target
    assert held["constraint_statistic"] == pytest.approx(1 - 0.5**4, abs=0.05)
    # control: λ = 0 (plain best-of-4 by r) on the same held-out prompts violates the target
    text = (tmp_path / "out" / "candidates.jsonl").read_text(encoding="utf-8")
    recs = [json.loads(line) for line in text.split("\n") if line]  # not splitlines(): U+2028 in responses
    heldout = [r for r in recs if r["split"] == "heldout"]
    assert len(heldout) == 64
    plain = [r["safety"][col] > 0.5 for r in heldout for col in r["chosen"]["bon"]["4"]]
    p_plain = sum(plain) / len(plain)
    # g ⊥ r: λ = 0 keeps P(safe) = P(g = 1) = ½
    assert p_plain < cfg.target - 0.1 and p_plain == pytest.approx(0.5, abs=0.1)
    constrained = [r["safety"][col] > 0.5 for r in heldout for col in r["chosen"]["bon-safe"]["4"]]
    assert sum(constrained) / len(constrained) == pytest.approx(held["constraint_statistic"])
