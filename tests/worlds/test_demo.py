"""`sacpo demo --quick` end to end through the CLI (the same code path as `make demo`, a smaller preset)."""

import json

import pytest

from sacpo.cli import main


@pytest.mark.slow
def test_quick_demo_end_to_end_and_cached(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["-q", "demo", "--quick", "--out", str(out), "ablations=true"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed
    report = (out / "eval" / "report.md").read_text()
    for name in (
        "sft",
        "helpful",
        "safe-lam0.5",
        "safe-lam2",
        "safe_kto",
        "safe_from_sft",
        "psacpo-q0.5",
        "naive",
        "optimum-lam0.5",
        "optimum-lam2",
    ):
        assert name in report, name
    assert "π*'s objective gain" in report and "Choose for the user" in report
    # the ablation arms: every arm at every λ, next to the default recipe and the target π*
    ablations = (out / "eval" / "ablations.md").read_text()
    table = [
        line for line in ablations.splitlines() if line.startswith("| ") and not line.startswith("| arm")
    ]
    from sacpo.recipes.demo_config import ARMS

    assert {line.split("|")[1].strip() for line in table} == {"default", "π* (target)", *ARMS}
    assert len(table) == 2 * (len(ARMS) + 2)  # λ ∈ {0.5, 2}
    assert "✓" in report or "✗" in report  # findings are checked, whatever they say
    for png in ("win_rates.png", "helpful_vs_kl.png", "gold_vs_kl.png"):
        assert (out / "eval" / png).stat().st_size > 1000
    results = {r["name"]: r for r in json.loads((out / "eval" / "results.json").read_text())}
    assert results["sft"]["kl"] == pytest.approx(0.0, abs=1e-6)  # SFT against itself
    assert results["sft"]["mean_rm"] is not None and results["sft"]["mean_cm"] is not None
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["times"]) == {"world", "reward_models", "pipeline", "evaluation", "optimum"}

    # a second run reuses the world, the reward models, the stages, the merges and the samples: none of their
    # files is rewritten (checked on the files, not on timings)
    def artifacts():
        keep = ("world/sft", "world/preferences.jsonl", "reward_models", "pipeline/stages", "pipeline/merges",
                "pipeline/.ref_cache", "eval/samples")  # fmt: skip
        files = [f for k in keep for f in ([out / k] if (out / k).is_file() else (out / k).rglob("*"))]
        # scored.jsonl is rewritten on purpose: scoring is cheap and the judges may have changed
        return {
            str(f.relative_to(out)): f.stat().st_mtime_ns
            for f in files
            if f.is_file() and f.name != "scored.jsonl"
        }

    before = artifacts()
    assert any("model.safetensors" in k for k in before) and any(k.startswith("eval/samples") for k in before)
    assert main(args) == 0
    assert artifacts() == before
    again = {r["name"]: r for r in json.loads((out / "eval" / "results.json").read_text())}
    assert again == results  # the same numbers from the reused samples


@pytest.mark.parametrize(
    ("override", "message"),
    [("beta=-1", "beta must be > 0"), ("lams=[0.5, -1]", "lams must be"), ("qs=[1.5]", "qs must lie in"),
     ("nope=1", "unknown key")],
)  # fmt: skip
def test_demo_rejects_bad_settings_before_doing_anything(tmp_path, capsys, override, message):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
