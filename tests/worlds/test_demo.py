"""`sacpo demo --quick` end to end through the CLI (the same code path as `make demo`, a smaller preset)."""

import json

import pytest

from sacpo.cli import main


@pytest.mark.slow
def test_quick_demo_end_to_end_and_cached(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--quick", "--out", str(out)]) == 0
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
    ):
        assert name in report, name
    assert "✓" in report or "✗" in report  # findings are checked, whatever they say
    for png in ("win_rates.png", "helpful_vs_kl.png", "gold_vs_kl.png"):
        assert (out / "eval" / png).stat().st_size > 1000
    results = {r["name"]: r for r in json.loads((out / "eval" / "results.json").read_text())}
    assert results["sft"]["kl"] == pytest.approx(0.0, abs=1e-6)  # SFT against itself
    assert results["sft"]["mean_rm"] is not None and results["sft"]["mean_cm"] is not None
    summary = json.loads((out / "demo.json").read_text())
    assert summary["times"]["world"] > 0

    # a second run reuses the world, the reward models, the stages and the samples
    assert main(["-q", "demo", "--quick", "--out", str(out)]) == 0
    again = json.loads((out / "demo.json").read_text())
    assert again["times"]["world"] < 5 and again["times"]["pipeline"] < summary["times"]["pipeline"] + 5
    assert again["times"]["evaluation"] < summary["times"]["evaluation"]


@pytest.mark.parametrize(
    ("override", "message"),
    [("beta=-1", "beta must be > 0"), ("lams=[0.5, -1]", "lams must be"), ("qs=[1.5]", "qs must lie in"),
     ("nope=1", "unknown key")],
)  # fmt: skip
def test_demo_rejects_bad_settings_before_doing_anything(tmp_path, capsys, override, message):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
