"""CLI smoke tests of the inference-time tools: `sacpo theory`, `sacpo cd-scorer`, `sacpo cd`, `sacpo bon` and
`sacpo report --include` on the tiny GPT-2 with toyworld prompts and oracle (tiny settings, seconds each)."""

import json

import pytest
import yaml

from sacpo.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A toyworld-shaped directory without training anything: the tiny GPT-2 as 'SFT', real toyworld prompts."""
    from sacpo.worlds.toyworld.language import all_prompts

    root = tmp_path_factory.mktemp("cli-infer")
    prompts = all_prompts()
    (root / "prompts.json").write_text(json.dumps({"train": prompts[:6], "test": prompts[-4:]}))
    return root, tiny_model


def _write(path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run(argv, capsys) -> str:
    capsys.readouterr()
    assert main(["-q", *argv]) == 0
    return capsys.readouterr().out


def test_theory(tmp_path, capsys):
    out = _run(["theory", "--out", str(tmp_path / "theory")], capsys)
    assert "max total variation" in out and "✓" in out
    for name in ("theory.md", "bon_kl.png", "win_vs_kl.png"):
        assert (tmp_path / "theory" / name).stat().st_size > 100, name


@pytest.mark.parametrize("command", ["bon", "cd", "cd-scorer"])
def test_help_config(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help-config"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "fields:" in text and "output_dir" in text


def test_bad_override_is_a_user_error(world, capsys):
    root, model = world
    cfg = _write(
        root / "bad.yaml", {"model": str(model), "prompts": str(root / "prompts.json"), "output_dir": "x"}
    )
    assert main(["bon", cfg, "ns=[0]"]) == 2
    assert "sacpo bon: error: ns[0] must be >= 1, got 0" in capsys.readouterr().err


def test_cd_scorer_cd_bon_and_combined_report(world, tmp_path, capsys):
    root, model = world
    prompts = str(root / "prompts.json")

    scorer_cfg = _write(
        tmp_path / "scorer.yaml",
        {
            "model": str(model), "prompts": prompts, "output_dir": str(tmp_path / "scorer"), "n_rollouts": 8,
            "max_new_tokens": 5, "steps": 2, "batch_size": 4, "device": "cpu",
        },
    )  # fmt: skip
    out = _run(["cd-scorer", scorer_cfg, "log_every=1"], capsys)
    assert "prefix scorer (fudge" in out and "held-out MSE" in out
    assert (tmp_path / "scorer" / "prefix_scorer.json").is_file()

    cd_cfg = _write(
        tmp_path / "cd.yaml",
        {
            "model": str(model), "scorer": str(tmp_path / "scorer"), "prompts": prompts,
            "output_dir": str(tmp_path / "cd-token"), "n_samples": 2, "max_new_tokens": 5, "top_k": 4,
            "oracle": "toyworld", "device": "cpu",
        },
    )  # fmt: skip
    out = _run(["cd", cd_cfg, "beta=0.5"], capsys)
    assert "token-wise CD (β=0.5" in out and "win rate vs base" in out
    rows = json.loads((tmp_path / "cd-token" / "results.json").read_text())
    assert [r["family"] for r in rows] == ["sft", "cd-token"] and rows[1]["param"] == 0.5
    assert rows[0]["helpful_win"][0] == 0.5 and rows[1]["n"] == 4 * 2
    summary = json.loads((tmp_path / "cd-token" / "summary.json").read_text())
    assert rows[1]["kl"] == pytest.approx(summary["kl"]["mean"])  # the exact per-token sum
    out = _run(["cd", cd_cfg, "mode=block", "K=2", "M=2", f"output_dir={tmp_path / 'cd-block'}"], capsys)
    assert "blockwise CD (K=2, M=2)" in out
    block = json.loads((tmp_path / "cd-block" / "results.json").read_text())[1]
    assert block["family"] == "cd-block" and 0.0 <= block["kl"] <= block["extra"]["kl_bound"] + 1e-9

    bon_cfg = _write(
        tmp_path / "bon.yaml",
        {
            "model": str(model), "prompts": prompts, "output_dir": str(tmp_path / "bon"), "ns": [1, 2, 4],
            "n_samples": 2, "reward": "toyworld-gold", "safety": "toyworld-safety", "target": 0.5,
            "oracle": "toyworld", "max_new_tokens": 5, "n_boot": 20, "device": "cpu",
        },
    )  # fmt: skip
    out = _run(["bon", bon_cfg, "ns=[1,2]"], capsys)
    assert "best-of-n: 4 prompts × 2 draws" in out and "constrained best-of-n" in out
    assert json.loads((tmp_path / "bon" / "summary.json").read_text())["ns"] == [1, 2]

    out = _run(
        ["report", str(tmp_path / "bon"), "--include", str(tmp_path / "cd-token"), str(tmp_path / "cd-block"),
         "--out", str(tmp_path / "report"), "--title", "all"],
        capsys,
    )  # fmt: skip
    md = (tmp_path / "report" / "report.md").read_text()
    assert "# all" in md and "bon-n2" in md and "cd-token β=0.5" in md and "cd-block K=2 M=2" in md
    assert "ε / level estimate" in md and "per-block ε-estimate" in md and "exact per-token sum" in md
    assert md.count("| sft |") == 1  # the included runs' own base rows are dropped
    for png in ("win_rates.png", "helpful_vs_kl.png", "gold_vs_kl.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    assert not (tmp_path / "bon" / "report.md").exists()  # --out: the source directory is left alone
