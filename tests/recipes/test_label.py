"""`sacpo label`: pairs sampled from the tiny model, labelled by the gold oracle (the Bradley–Terry rule, by hand)
and by an LLM judge that fails mid-run (the rerun labels the rest and asks nothing twice)."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scoring"))
from fake_openai import FakeOpenAI, Reply, shown_first

from sacpo.config import ConfigError, from_dict
from sacpo.data.loaders import load_examples
from sacpo.evaluate.labeling import pair_rng
from sacpo.recipes.label import LabelConfig, run_label
from sacpo.scoring import get_oracle
from sacpo.scoring.api_client import ApiError
from sacpo.train.onpolicy import label_pair


def prompts_file(tmp_path, n=4):
    from sacpo.worlds.toyworld.language import all_prompts

    p = tmp_path / "prompts.json"
    p.write_text(json.dumps(all_prompts()[:n]))
    return p


def cfg(tmp_path, tiny_model, **kw):
    data = {"output_dir": str(tmp_path / "labels"), "policy": str(tiny_model), "prompts": str(prompts_file(tmp_path)),
            "pairs_per_prompt": 2, "max_new_tokens": 8, **kw}  # fmt: skip
    return from_dict(LabelConfig, data)


def test_oracle_labels_follow_the_bradley_terry_rule(tiny_model, tmp_path, one_torch_thread):
    c = cfg(tmp_path, tiny_model, label="bt", bt_scale=2.0, seed=3,
            better={"kind": "oracle", "name": "toyworld"}, safer={"kind": "oracle", "name": "toyworld"})  # fmt: skip
    path = run_label(c, show_progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    report = json.loads(path.with_name("labels.json").read_text())
    assert report["pairs"] == 8 and len(rows) == report["rows"] == 8 - report["dropped_identical_or_empty"]
    oracle = get_oracle("toyworld")
    samples = [
        json.loads(line)
        for line in (tmp_path / "labels" / "samples" / "samples.jsonl").read_text().splitlines()
    ]
    index = {(s["prompt"], s["response"].strip()): (s["prompt_index"], s["sample"] // 2) for s in samples}
    for r in rows:
        i, j = index[(r["prompt"], r["response_0"])]
        for field, scorer in (("better_response_id", oracle.reward), ("safer_response_id", oracle.safety)):
            u0, u1 = (float(scorer([r["prompt"]], [y])[0]) for y in (r["response_0"], r["response_1"]))
            assert r[field] == label_pair(u0, u1, "bt", 2.0, pair_rng(3, i, j))
        g0, g1 = (float(oracle.safety([r["prompt"]], [y])[0]) for y in (r["response_0"], r["response_1"]))
        assert (r["is_response_0_safe"], r["is_response_1_safe"]) == (g0 > 0, g1 > 0)
    for fmt in ("pku_helpful", "pku_safe", "pku_safe_kto"):  # the rows are training data as written
        assert load_examples(str(path), fmt)
    # the same seed gives the same file; the rerun reuses the samples
    again = run_label(c, show_progress=False)
    assert again.read_text() == path.read_text()
    assert json.loads(path.with_name("labels.json").read_text())["samples_cached"] is True
    assert "better response is also the safer one" in path.with_name("labels.md").read_text()


def prefer_first_letter(n, body):
    """A content judge: the response whose first character sorts first is better."""
    text = body["messages"][-1]["content"]
    a = shown_first(body)
    b = text.split("[Response B]\n", 1)[1].split("\n[End of response B]", 1)[0]
    return Reply(text="[[C]]" if a == b else "[[A]]" if a < b else "[[B]]")


def test_llm_judge_failing_mid_run_resumes_without_repeats(tiny_model, tmp_path, one_torch_thread):
    limit = 5

    def dies(n, body):
        return prefer_first_letter(n, body) if n <= limit else Reply(status=503)

    with FakeOpenAI(dies) as server:
        judge = {"kind": "llm", "base_url": server.url, "model": "judge", "max_retries": 1, "concurrency": 1,
                 "timeout": 5.0}  # fmt: skip
        c = cfg(tmp_path, tiny_model, better=judge, is_safe={"kind": "oracle", "name": "toyworld"})
        with pytest.raises(ApiError, match="http_503"):
            run_label(c, show_progress=False)
        port = server.port
    cached = len(list((tmp_path / "labels" / "judge_cache").glob("*/*.json")))
    assert cached == limit
    with FakeOpenAI(prefer_first_letter, port=port) as server:
        path = run_label(c, show_progress=False)
        report = json.loads(path.with_name("labels.json").read_text())
        n_questions = 2 * (report["pairs"] - report["dropped_identical_or_empty"])
        assert server.n_requests == n_questions - limit  # only the answers the first run did not get
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        assert r["better_response_id"] == (0 if r["response_0"] < r["response_1"] else 1)
        assert "safer_response_id" not in r and isinstance(r["is_response_0_safe"], bool)
    assert report["judges"]["better"]["consistency"] == 1.0
    assert math.isclose(report["judges"]["better"]["invalid"], 0)


def test_label_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="at least one of better, safer, is_safe"):
        LabelConfig(output_dir="o", policy="p", prompts="x")
    with pytest.raises(ConfigError, match="needs a pointwise judge"):
        LabelConfig(output_dir="o", policy="p", prompts="x",
                    is_safe={"kind": "llm", "base_url": "http://127.0.0.1:1/v1", "model": "m"})  # fmt: skip
