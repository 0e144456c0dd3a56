"""On-policy preference data: labels by a named judge, PKU rows, and the pipeline stage option."""

import json
import random

import pytest

from sacpo.config import ConfigError, from_dict
from sacpo.recipes.pipeline import PipelineConfig, plan, run_pipeline
from sacpo.scoring import FunctionScorer, register_scorer, resolve_scorer
from sacpo.train.onpolicy import OnPolicyConfig, label_pair, make_rows


def length_judge(prompt, response):  # a transparent judge: longer = better
    return float(len(response))


register_scorer("test.length", lambda: FunctionScorer("length", length_judge))


def test_label_rules():
    rng = random.Random(0)
    assert label_pair(1.0, 2.0, "argmax", 1.0, rng) == 1
    assert label_pair(2.0, 1.0, "argmax", 1.0, rng) == 0
    assert label_pair(1.0, 1.0, "argmax", 1.0, rng) is None
    # bt: the frequency of label 1 is σ(s·(u1 − u0)) = σ(2·0.5) = 0.731
    draws = [label_pair(0.0, 0.5, "bt", 2.0, rng) for _ in range(20_000)]
    assert sum(draws) / len(draws) == pytest.approx(1 / (1 + 2.718281828**-1.0), abs=0.01)


def test_make_rows_schema_and_counts():
    cfg = OnPolicyConfig(judge="test.length", label="argmax", safe_threshold=2.5)
    rows, counts = make_rows(
        ["a", "b", "c", "d"],
        [("xx", "xxx"), ("same", "same"), ("", "y"), ("pq", "rs")],
        [(2.0, 3.0), (4.0, 4.0), (0.0, 1.0), (2.0, 2.0)],
        "pku_safe",
        cfg,
    )
    assert rows == [
        {
            "prompt": "a",
            "response_0": "xx",
            "response_1": "xxx",
            "safer_response_id": 1,
            "is_response_0_safe": False,
            "is_response_1_safe": True,
        }
    ]
    assert counts == {"pairs": 4, "dropped_identical_or_empty": 2, "dropped_ties": 1, "rows": 1}
    helpful, _ = make_rows(["a"], [("xx", "xxx")], [(2.0, 3.0)], "pku_helpful", cfg)
    assert helpful[0]["better_response_id"] == 1 and "is_response_0_safe" not in helpful[0]
    with pytest.raises(ConfigError):
        make_rows(["a"], [("x", "y")], [(0.0, 1.0)], "trl_paired", cfg)


def test_unknown_judge_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"test\.length"):
        resolve_scorer("no.such.judge")
    with pytest.raises(ConfigError, match=r"^unknown label 'vote'; valid labels: bt, argmax$"):
        from_dict(OnPolicyConfig, {"judge": "test.length", "label": "vote"})


def _cfg(model, data, out, **on_policy):
    return from_dict(
        PipelineConfig,
        {
            "policy": str(model),
            "output_dir": str(out),
            "defaults": {
                "max_steps": 2,
                "batch_size": 4,
                "lr": 1e-3,
                "max_length": 64,
                "max_prompt_length": 32,
                "kl_prompts": 0,
            },
            "stages": [
                {"name": "helpful", "data": {"source": str(data), "format": "pku_helpful"}, "beta": 0.1},
                {
                    "name": "safe",
                    "data": {"source": str(data), "format": "pku_safe"},
                    "lam": [1.0, 2.0],
                    "on_policy": {
                        "judge": "test.length",
                        "label": "argmax",
                        "pairs_per_prompt": 2,
                        "max_new_tokens": 6,
                        **on_policy,
                    },
                },
            ],
        },
    )


def test_pipeline_stage_regenerates_its_pairs_from_its_parent(tiny_model, pku_tiny, tmp_path):
    cfg = _cfg(tiny_model, pku_tiny, tmp_path / "p")
    branches = plan(cfg, tiny_model)
    data = tmp_path / "p" / "onpolicy" / "safe" / "helpful" / "preferences.jsonl"
    assert all(b.train.data.source == str(data) for b in branches["safe"])  # one file for the whole sweep
    result = run_pipeline(cfg, show_progress=False)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    meta = json.loads((data.parent / "onpolicy.json").read_text())
    prompts = {json.loads(line)["prompt"] for line in pku_tiny.read_text().splitlines()}
    assert rows and {r["prompt"] for r in rows} <= prompts
    assert meta["policy"].endswith("stages/helpful/model") and meta["rows"] == len(rows)
    for r in rows:  # the labels are the judge's: argmax of the response length, ties dropped
        assert len(r[f"response_{r['safer_response_id']}"]) > len(r[f"response_{1 - r['safer_response_id']}"])
    # one reference pass for the sweep: both branches train on the same generated data
    assert result["reference_passes"]["cached"] == 1
    stamp = data.stat().st_mtime_ns
    run_pipeline(cfg, show_progress=False, force=True)  # same parent weights: the data is reused
    assert data.stat().st_mtime_ns == stamp
    # a finished branch is stale once its on-policy settings change (the data path alone does not say so)
    changed = run_pipeline(
        _cfg(tiny_model, pku_tiny, tmp_path / "p", pairs_per_prompt=1), show_progress=False
    )
    assert changed["reference_passes"]["skipped_stages"] == 1  # helpful only: both safe branches retrained
    assert json.loads((data.parent / "onpolicy.json").read_text())["settings"]["pairs_per_prompt"] == 1


def test_on_policy_needs_a_pku_format(tiny_model, pku_tiny, tmp_path):
    cfg = _cfg(tiny_model, pku_tiny, tmp_path / "p")
    bad = from_dict(
        PipelineConfig,
        {
            **{k: v for k, v in cfg.__dict__.items() if k != "stages"},
            "stages": [
                {
                    "name": "s",
                    "data": {"source": str(pku_tiny), "format": "trl_paired"},
                    "beta": 0.1,
                    "on_policy": {"judge": "test.length"},
                }
            ],
        },
    )
    with pytest.raises(ConfigError, match="on_policy"):
        plan(bad, tiny_model)
