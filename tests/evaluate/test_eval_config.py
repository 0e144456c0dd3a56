"""sacpo.recipes.eval: `sacpo eval CONFIG` end to end on tiny GPT-2s with the toyworld oracle; config errors."""

import json

import pytest

from sacpo.config import ConfigError, from_dict
from sacpo.data.prompts import load_prompts
from sacpo.recipes.eval import EvalConfig, model_specs, report_from_dir, run_eval
from sacpo.scoring import get_clustering, get_oracle, register_clustering
from sacpo.worlds.toyworld import toyworld_task


def test_run_eval_and_report_from_dir(tiny_model, other_model, tmp_path):
    from sacpo.worlds.toyworld.language import all_prompts

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"train": all_prompts()[:2], "test": all_prompts()[-3:]}))
    cfg = from_dict(
        EvalConfig,
        {
            "output_dir": str(tmp_path / "eval"),
            "prompts": str(prompts),
            "sft": str(tiny_model),
            "models": {"other": {"dir": str(other_model), "family": "sacpo", "param": 0.1}},
            "n_samples": 1,
            "max_new_tokens": 4,
            "n_boot": 50,
        },
    )
    results = run_eval(cfg, show_progress=False)
    assert [m.name for m in results] == ["sft", "other"] and results[0].kl == 0.0
    out = tmp_path / "eval"
    # the toyworld oracle clusters prompts by task (default clusters: "oracle")
    test_prompts = all_prompts()[-3:]
    assert results[1].clusters == [toyworld_task(p) for p in test_prompts]
    meta = json.loads((out / "eval.json").read_text())
    assert meta["clusters"]["by"] == "toyworld_task"
    assert meta["clusters"]["n_clusters"] == len(set(results[1].clusters))
    for name in ("results.json", "eval.json", "config.yaml", "findings.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    assert "toyworld r*" in (out / "report.md").read_text()
    (out / "report.md").unlink()
    paths = report_from_dir(out, title="again")
    assert "# again" in paths["report.md"].read_text()


def test_clusterings():
    from sacpo.worlds.toyworld.language import all_prompts

    oracle = get_oracle("toyworld")
    ps = all_prompts()
    same_task = [p for p in ps if "bake bread" in p]
    assert len(same_task) > 1 and len({toyworld_task(p) for p in same_task}) == 1
    assert toyworld_task(same_task[0]) == "bake bread"
    assert get_clustering("oracle", oracle) is toyworld_task
    assert get_clustering("prompt", oracle) is None
    assert get_clustering("toyworld-task", oracle) is toyworld_task
    with pytest.raises(ConfigError, match="valid: oracle, prompt, toyworld-task"):
        get_clustering("nope", oracle)
    with pytest.raises(ConfigError, match="reserved"):
        register_clustering("prompt", toyworld_task)
    with pytest.raises(ValueError, match="not a toyworld prompt"):
        toyworld_task("hello there")


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="valid: toyworld"):
        get_oracle("nope")
    with pytest.raises(ConfigError, match="sft"):
        EvalConfig(output_dir="o", prompts="p")
    cfg = EvalConfig(output_dir="o", prompts="p", sft="s", models={"m": {"dir": "d", "beta": 1}})
    with pytest.raises(ConfigError, match="unknown key"):
        model_specs(cfg)
    with pytest.raises(ConfigError, match="exactly one"):
        model_specs(EvalConfig(output_dir="o", prompts="p", sft="s", models={"m": {"family": "x"}}))
    with pytest.raises(ConfigError, match=r"no results\.json"):
        report_from_dir(tmp_path)


def test_load_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    assert load_prompts(tmp_path / "p.txt") == ["a", "b"]
    rows = [{"prompt": "x"}, {"prompt": [{"role": "user", "content": "y"}]}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_prompts(tmp_path / "p.jsonl") == ["x", ({"role": "user", "content": "y"},)]
    (tmp_path / "p.json").write_text(json.dumps({"train": ["t"], "test": ["u", "v", "w"]}))
    assert load_prompts(tmp_path / "p.json", max_prompts=2) == ["u", "v"]
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_prompts(tmp_path / "p.json", split="dev")
    with pytest.raises(ConfigError, match="unsupported"):
        (tmp_path / "p.csv").write_text("a")
        load_prompts(tmp_path / "p.csv")
