"""sacpo.evaluate.run end to end on tiny GPT-2s with code oracles: SFT baseline, a model, an artifact, the cache."""

import json
import math

import numpy as np
import pytest

from sacpo.evaluate.clusters import resolve_clusters
from sacpo.evaluate.generate import stream_seed
from sacpo.evaluate.report import write_report
from sacpo.evaluate.run import ModelSpec, evaluate_models, load_results, specs_from_pipeline
from sacpo.scoring.base import FunctionScorer, Scorer, run_scorer

PROMPTS = ["Hello", "How are you?", "Tell me a joke", "What is 2+2?"]
LENGTH = FunctionScorer("length", lambda p, y: float(len(y)))  # "helpfulness": longer is better
SHORT = FunctionScorer("shortness", lambda p, y: 6.0 - len(y))  # "safety": g ≥ 0 iff at most 6 characters
VOWELS = FunctionScorer("vowels", lambda p, y: float(sum(c in "aeiou" for c in y)))


def test_function_scorer_protocol():
    assert isinstance(LENGTH, Scorer)
    assert LENGTH(["a", "b"], ["xy", ""]).tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts but 1"):
        LENGTH(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="non-finite"):
        run_scorer(FunctionScorer("bad", lambda p, y: float("nan")), ["a"], ["b"])


def test_evaluate_models_end_to_end(tiny_model, other_model, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    kw = dict(n_samples=2, max_new_tokens=6, seed=0, show_progress=False, n_boot=200)
    models = {"policy": ModelSpec(dir=other_model, family="sacpo", param=0.1)}
    labels = ["short", "long", "long", "short"]
    results = evaluate_models(
        models,
        tiny_model,
        PROMPTS,
        LENGTH,
        SHORT,
        0.0,
        out,
        **kw,
        extra_scorers={"rm": VOWELS},
        clusters=labels,
    )
    sft, pol = results
    # the SFT policy is added as the baseline: win rates exactly ½, KL (estimated) exactly 0
    assert (sft.name, sft.family) == ("sft", "sft")
    assert sft.helpful_win == (0.5, 0.5, 0.5) and sft.harmless_win == (0.5, 0.5, 0.5)
    assert sft.kl == 0.0 and sft.kl_se == 0.0 and math.isnan(sft.degenerate_kl_share)
    assert (sft.n, sft.n_prompts) == (8, 4)
    # the other model: win rate = mean over prompts of the mean outcome over all (own sample, SFT sample) pairs
    rows = [json.loads(x) for x in (out / "samples" / "policy" / "scored.jsonl").read_text().splitlines()]
    base = [json.loads(x) for x in (out / "samples" / "sft" / "scored.jsonl").read_text().splitlines()]

    def outcome(a, b):
        return 1.0 if a > b else 0.5 if a == b else 0.0

    per = [
        np.mean(
            [
                outcome(r["reward"], q["reward"])
                for r in rows[2 * p : 2 * p + 2]
                for q in base[2 * p : 2 * p + 2]
            ]
        )
        for p in range(4)
    ]
    assert pol.helpful_win[0] == pytest.approx(np.mean(per))
    assert pol.per_prompt["helpful_win"] == pytest.approx(per)
    assert pol.mean_reward == pytest.approx(np.mean([len(r["response"]) for r in rows]))
    assert pol.per_prompt["reward"] == pytest.approx(
        [np.mean([len(r["response"]) for r in rows[2 * p : 2 * p + 2]]) for p in range(4)]
    )
    assert set(pol.per_prompt) == {"reward", "safety", "safe", "helpful_win", "harmless_win", "kl"}
    assert pol.p_safe == pytest.approx(np.mean([len(r["response"]) <= 6 for r in rows]))
    # the constraint is judged by the one-sided lower bound of E[g], resampling the 2 clusters
    assert pol.clusters == labels and pol.safety_lcb <= pol.mean_safety
    g = np.array(pol.per_prompt["safety"])
    cluster_means = [g[[0, 3]].mean(), g[[1, 2]].mean()]
    assert min(cluster_means) - 1e-12 <= pol.safety_lcb <= max(cluster_means) + 1e-12
    assert pol.constraint_ok == (pol.safety_lcb >= 0.0)
    assert math.isfinite(pol.kl) and pol.kl != 0.0 and math.isfinite(pol.kl_se)
    assert pol.kl == pytest.approx(np.mean([r["logp_policy"] - r["logp_ref"] for r in rows]))
    assert pol.degenerate_share == pytest.approx(np.mean([r["degenerate"] for r in rows]))
    assert pol.mean_rm == pytest.approx(np.mean([r["score/rm"] for r in rows])) and pol.mean_cm is None
    # results.json round-trips; eval.json records the clustering and each model's own sampling stream
    assert load_results(out) == results
    meta = json.loads((out / "eval.json").read_text())
    assert meta["baseline"] == "sft" and meta["clusters"] == {
        "by": "labels",
        "n_clusters": 2,
        "sizes": {"short": 2, "long": 2},
    }
    seeds = {k: v["sampling_seed"] for k, v in meta["models"].items()}
    assert seeds == {"sft": stream_seed(0, "sft"), "policy": stream_seed(0, "policy")}
    side = json.loads((out / "samples" / "policy" / "samples.meta.json").read_text())
    assert (side["seed"], side["stream"], side["sampling_seed"]) == (0, "policy", seeds["policy"])

    # an artifact: the policy's rows, shuffled, without log-probs → same win rates, undefined KL
    art = tmp_path / "artifact.jsonl"
    lines = (out / "samples" / "policy" / "samples.jsonl").read_text().splitlines()[::-1]
    art.write_text(
        "\n".join(
            json.dumps({k: v for k, v in json.loads(x).items() if k in ("prompt", "response", "sample")})
            for x in lines
        )
        + "\n"
    )

    import sacpo.evaluate.generate as g
    import sacpo.evaluate.reference as reference
    import sacpo.models.load as load

    def no_load(*args, **kwargs):
        raise AssertionError("a cache hit must not load a model")

    monkeypatch.setattr(g, "load_model", no_load)
    monkeypatch.setattr(load, "load_model", no_load)
    monkeypatch.setattr(reference, "load_model", no_load)
    models = {
        "base": ModelSpec(
            dir=tiny_model, family="sft"
        ),  # named differently: still recognised as the baseline
        "policy": ModelSpec(dir=other_model, family="sacpo", param=0.1),
        "bon": ModelSpec(samples=art, family="bon", param=2),
    }
    with pytest.raises(AssertionError, match="must not load"):  # sft samples were cached under samples/sft
        evaluate_models(models, tiny_model, PROMPTS, LENGTH, SHORT, 0.0, out, **kw)
    models = {"sft": models["base"], **{k: v for k, v in models.items() if k != "base"}}
    again = evaluate_models(
        models,
        tiny_model,
        PROMPTS,
        LENGTH,
        SHORT,
        0.0,
        out,
        **kw,
        is_safe=lambda p, y: "a" not in y,
        clusters=labels,
    )
    assert [m.name for m in again] == ["sft", "policy", "bon"]
    assert again[1].helpful_win == pol.helpful_win and again[1].kl == pol.kl  # from the cache
    bon = again[2]
    assert bon.helpful_win == pol.helpful_win and bon.harmless_win == pol.harmless_win
    assert math.isnan(bon.kl) and math.isnan(bon.kl_se) and "kl" not in bon.per_prompt
    assert math.isnan(bon.degenerate_kl_share) and bon.degenerate_share == pol.degenerate_share
    assert bon.p_safe == pytest.approx(np.mean(["a" not in r["response"] for r in rows]))

    paths = write_report(again, tmp_path / "report", title="tiny")
    md = paths["report.md"].read_text()
    assert all(name in md for name in ("sft", "policy", "bon")) and "KL is undefined" in md


def test_models_sample_independent_streams(other_model, tiny_model, tmp_path):
    """The same weights under two names draw different samples (their own streams), so a comparison of two
    models is not one of common random numbers; the same name draws the same samples again."""
    kw = dict(n_samples=3, max_new_tokens=6, seed=0, show_progress=False, n_boot=20)
    models = {
        "a": ModelSpec(dir=other_model, family="x"),
        "b": ModelSpec(dir=other_model, family="x"),
    }
    evaluate_models(models, tiny_model, PROMPTS, LENGTH, SHORT, 0.0, tmp_path / "e", **kw)
    text = {k: (tmp_path / "e" / "samples" / k / "samples.jsonl").read_text() for k in ("a", "b")}
    responses = {k: [json.loads(x)["response"] for x in v.splitlines()] for k, v in text.items()}
    assert responses["a"] != responses["b"]
    evaluate_models({"a": models["a"]}, tiny_model, PROMPTS, LENGTH, SHORT, 0.0, tmp_path / "f", **kw)
    assert (tmp_path / "f" / "samples" / "a" / "samples.jsonl").read_text() == text["a"]
    assert stream_seed(0, "a") != stream_seed(0, "b") != stream_seed(1, "b")


def test_resolve_clusters():
    assert resolve_clusters(None, PROMPTS) is None
    assert resolve_clusters(lambda p: len(p) > 6, PROMPTS) == ["False", "True", "True", "True"]
    assert resolve_clusters(["a", "a", "b", "b"], PROMPTS) == ["a", "a", "b", "b"]
    with pytest.raises(ValueError, match="3 labels for 4"):
        resolve_clusters(["a", "a", "b"], PROMPTS)

    def task(p):
        raise KeyError("no task")

    with pytest.raises(ValueError, match="task failed on prompt 'Hello'"):
        resolve_clusters(task, PROMPTS)


def test_artifact_must_cover_the_evaluation_set(tiny_model, tmp_path):
    art = tmp_path / "a.jsonl"
    art.write_text(json.dumps({"prompt": "Hello", "response": "x", "sample": 0}) + "\n")
    with pytest.raises(ValueError, match="no row for"):
        evaluate_models(
            {"bon": ModelSpec(samples=art, family="bon")},
            tiny_model,
            ["Hello"],
            LENGTH,
            SHORT,
            0.0,
            tmp_path / "e",
            n_samples=2,
            max_new_tokens=2,
            show_progress=False,
        )
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(family="x")


def test_specs_from_pipeline(tmp_path):
    (tmp_path / "pipeline.json").write_text(
        json.dumps(
            {
                "policy": "runs/p/sft",
                "stages": [
                    {
                        "name": "helpful",
                        "stage": "helpful",
                        "beta": 0.1,
                        "model": "runs/p/stages/helpful/model",
                    },
                    {
                        "name": "safe-lam2",
                        "stage": "safe",
                        "beta": 0.05,
                        "model": "runs/p/stages/safe-lam2/model",
                    },
                    {"name": "kto", "stage": "kto", "beta": 0.05, "model": "runs/p/stages/kto/model"},
                ],
                "merges": [
                    {"name": "psacpo-q0.5", "a": "helpful", "b": "safe-lam2", "q": 0.5, "model": "m1"},
                    {"name": "naive-q0.5", "a": "helpful", "b": "x", "q": 0.5, "model": "m2"},
                ],
            }
        )
    )
    fam = {"helpful": "dpo-helpful", "safe": "sacpo", "psacpo": "p-sacpo"}
    sft, specs = specs_from_pipeline(tmp_path, fam)
    assert str(sft) == "runs/p/sft"
    assert specs["safe-lam2"] == ModelSpec(dir="runs/p/stages/safe-lam2/model", family="sacpo", param=0.05)
    assert specs["psacpo-q0.5"].family == "p-sacpo" and specs["psacpo-q0.5"].param == 0.5
    assert specs["naive-q0.5"].family == "merge" and specs["kto"].family == "kto"
