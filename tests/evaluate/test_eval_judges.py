"""`sacpo eval` with judges: an LLM judge behind a (fault-injecting) local server, the gold oracle as a judge,
agreement between them, the report's tables, the cache (a rerun sends no request), and real-model settings
(no oracle, greedy decoding)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scoring"))
from fake_openai import FakeOpenAI, Reply

from sacpo.config import ConfigError, from_dict
from sacpo.evaluate.judge_config import GeneratorConfig, JudgeConfig
from sacpo.evaluate.judging import build_judges
from sacpo.math.judges import judged_win_rate, pair_outcome
from sacpo.recipes.eval import EvalConfig, run_eval


def _responses(body):
    text = body["messages"][-1]["content"]
    a = text.split("[Response A]\n", 1)[1].split("\n[End of response A]", 1)[0]
    b = text.split("[Response B]\n", 1)[1].split("\n[End of response B]", 1)[0]
    return a, b


def longer_wins(n, body):
    """A content judge: the response with more words wins, equal counts tie; every 7th answer is malformed."""
    if n % 7 == 0 and body.get("temperature") == 0.0:
        return Reply(text="no verdict here")
    a, b = _responses(body)
    la, lb = len(a.split()), len(b.split())
    return Reply(text="[[C]]" if la == lb else "[[A]]" if la > lb else "[[B]]")


def expected_verdict(first, second):
    la, lb = len(first.split()), len(second.split())
    return "tie" if la == lb else "A" if la > lb else "B"


def eval_cfg(tmp_path, tiny_model, other_model, server, **kw):
    from sacpo.worlds.toyworld.language import all_prompts

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(all_prompts()[:6]))
    data = {
        "output_dir": str(tmp_path / "eval"),
        "prompts": str(prompts),
        "sft": str(tiny_model),
        "models": {"other": {"dir": str(other_model), "family": "sacpo", "param": 0.1}},
        "n_samples": 2,
        "max_new_tokens": 6,
        "n_boot": 50,
        "judges": [
            {"kind": "llm", "name": "longer", "base_url": server.url, "model": "judge", "criterion": "helpfulness",
             "timeout": 5.0},
            {"kind": "oracle", "name": "toyworld"},
        ],
        **kw,
    }  # fmt: skip
    return from_dict(EvalConfig, data)


def test_eval_with_llm_and_oracle_judges(tiny_model, other_model, tmp_path, one_torch_thread):
    with FakeOpenAI(longer_wins) as server:
        cfg = eval_cfg(tmp_path, tiny_model, other_model, server)
        run_eval(cfg, show_progress=False)
        first = server.n_requests
        port = server.port
    out = tmp_path / "eval"
    record = json.loads((out / "judges.json").read_text())
    assert [j["label"] for j in record["judges"]] == ["longer", "toyworld.reward", "toyworld.safety"]
    pairs = [
        json.loads(line) for line in (out / "samples" / "other" / "judgments.jsonl").read_text().splitlines()
    ]
    assert len(pairs) == 12  # 6 prompts × 2 samples, sample s against SFT's sample s
    # the judge's verdicts are the content rule's in both orders (malformed answers were re-asked)
    outcomes = []
    for p in pairs:
        ab, ba = p["longer/verdicts"]
        assert ab == expected_verdict(p["response"], p["sft_response"])
        assert ba == expected_verdict(p["sft_response"], p["response"])
        outcomes.append(pair_outcome(ab, ba).outcome)
        assert p["longer/outcome"] == outcomes[-1]
    r = record["models"]["other"]["longer"]
    rate = judged_win_rate(np.array(outcomes).reshape(6, 2), n_boot=50, seed=0, clusters=_clusters(cfg))
    assert r["win"][0] == pytest.approx(rate[0]) and r["n_valid"] == 12 and r["invalid"] == 0
    assert r["consistency"] == 1.0  # a content rule is position consistent
    usage = record["judges"][0]["usage"]
    assert usage["malformed_answers"] >= 1 and usage["requests_sent"] == first
    # agreement of the LLM judge with the gold reward, recomputed from the pairs
    gold = [p["toyworld.reward/outcome"] for p in pairs]
    ag = next(a for a in record["agreement"] if a["a"] == "longer")
    assert ag["b"] == "toyworld.reward" and ag["rate"] == pytest.approx(np.mean(np.equal(outcomes, gold)))
    report = (out / "report.md").read_text()
    assert "## Judges: win rate vs SFT" in report and "## Judge agreement" in report
    assert "position consistency" in report
    # a rerun (same server address: the cache names it) sends no request
    with FakeOpenAI(longer_wins, port=port) as server:
        run_eval(cfg, show_progress=False)
        assert server.n_requests == 0
    again = json.loads((out / "judges.json").read_text())
    assert again["models"] == record["models"]


def _clusters(cfg):
    from sacpo.data.prompts import load_prompts
    from sacpo.worlds.toyworld import toyworld_task

    return [toyworld_task(p) for p in load_prompts(cfg.prompts)]


def test_invalid_verdicts_are_counted_not_guessed(tiny_model, other_model, tmp_path, one_torch_thread):
    with FakeOpenAI(lambda n, body: Reply(text="I refuse to choose")) as server:
        cfg = eval_cfg(tmp_path, tiny_model, other_model, server, oracle=None)
        results = run_eval(cfg, show_progress=False)
        assert server.n_requests == 12 * 2 * 3  # pairs × orders × (1 + 2 re-asks)
    record = json.loads((tmp_path / "eval" / "judges.json").read_text())
    r = record["models"]["other"]["longer"]
    assert r["invalid"] == 12 and r["n_valid"] == 0 and r["win"] == [None, None, None]
    # no oracle and no reward/cost model judge: the gold columns are undefined, the KL is not
    assert math.isnan(results[1].helpful_win[0]) and math.isnan(results[1].mean_reward)
    assert math.isfinite(results[1].kl)
    assert "12 invalid" in (tmp_path / "eval" / "report.md").read_text()


def test_greedy_and_top_p_settings(tiny_model, other_model, tmp_path, one_torch_thread):
    with pytest.raises(ConfigError, match="greedy"):
        EvalConfig(output_dir="o", prompts="p", sft="s", temperature=0.0)
    with FakeOpenAI(longer_wins) as server:
        cfg = eval_cfg(tmp_path, tiny_model, other_model, server, temperature=0.0, n_samples=1, judges=[])
    run_eval(cfg, show_progress=False)
    meta = json.loads((tmp_path / "eval" / "samples" / "sft" / "samples.meta.json").read_text())
    assert meta["temperature"] == 0.0
    assert "greedy decoding" in (tmp_path / "eval" / "report.md").read_text()


def test_judge_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs base_url and model"):
        JudgeConfig(kind="llm", model="m")
    with pytest.raises(ConfigError, match="needs dir"):
        JudgeConfig(kind="cost_model")
    with pytest.raises(ConfigError, match="no model directory"):  # checked when the judge is built
        build_judges([JudgeConfig(kind="reward_model", dir=str(tmp_path / "none"))], tmp_path)
    with pytest.raises(ConfigError, match="dir is a field of kind reward_model"):
        JudgeConfig(kind="llm", base_url="http://127.0.0.1:1/v1", model="m", dir="x")
    with pytest.raises(ConfigError, match="registered name"):
        JudgeConfig(kind="oracle")
    j = JudgeConfig(kind="llm", base_url="http://127.0.0.1:1/v1", model="gpt-4o", criterion="harmlessness")
    assert j.label == "llm:gpt-4o/harmlessness" and j.criterion_name == "harmlessness"
    assert JudgeConfig(kind="cost_model", dir=str(tmp_path)).criterion_name == "harmlessness"
    with pytest.raises(ConfigError, match="needs base_url"):
        GeneratorConfig(kind="openai")


def test_foreign_hf_reward_model_fills_the_reward_columns(
    tiny_model, other_model, tmp_path, one_torch_thread
):
    """Any decoder HF sequence-classification directory (no reward_model.json) is a reward / cost model judge;
    with oracle: null the first of each fills the report's reward / safety columns."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.save_pretrained(tmp_path / "hf_rm")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "hf_rm")
    with FakeOpenAI(longer_wins) as server:
        cfg = eval_cfg(
            tmp_path, tiny_model, other_model, server, oracle=None,
            judges=[{"kind": "reward_model", "name": "rm", "dir": str(tmp_path / "hf_rm")},
                    {"kind": "cost_model", "name": "cm", "dir": str(tmp_path / "hf_rm"), "max_length": 128}],
        )  # fmt: skip
    results = run_eval(cfg, show_progress=False)
    record = json.loads((tmp_path / "eval" / "judges.json").read_text())
    rm_win, cm_win = (record["models"]["other"][k]["win"][0] for k in ("rm", "cm"))
    assert rm_win == pytest.approx(1 - cm_win)  # the same scores read as a cost: every outcome flips
    assert math.isfinite(results[1].helpful_win[0]) and math.isfinite(results[1].mean_safety)
    meta = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert meta["reward"].startswith("reward:hf_rm") and meta["safety"].startswith("-cost:hf_rm")


def test_cli_reports_a_dead_server_in_one_line(tiny_model, other_model, tmp_path, capsys, one_torch_thread):
    import yaml

    from sacpo.cli import main
    from sacpo.config import to_dict

    with FakeOpenAI(lambda n, body: Reply(status=401, error="invalid key")) as server:
        cfg = eval_cfg(tmp_path, tiny_model, other_model, server, n_samples=1)
        path = tmp_path / "eval.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg)))
        assert main(["eval", str(path)]) == 2
        assert server.n_requests <= 8  # the requests already in flight (concurrency 8); none starts after
    err = capsys.readouterr().err
    assert "sacpo eval: error:" in err and "authentication failed (401): invalid key" in err
