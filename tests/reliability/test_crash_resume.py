"""Crash and resume: a stage killed after a checkpoint and rerun with --resume ends where an uninterrupted run
with the same seed ends — the same weights (max |Δ| ≤ 1e-6) and the same metrics.jsonl — because the weights,
optimizer, scheduler, RNG states, data position and not-yet-logged metrics are all restored (from safetensors and
JSON files only: see test_safe_loading.py for the refusal of pickles)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import (
    looks_finished,
    make_cfg,
    max_abs_diff,
    read_metrics,
    stage_fields,
    weights,
    write_yaml,
)

from sacpo.config import ConfigError
from sacpo.train import checkpoint
from sacpo.train.loop import is_done, train

SLOW_CLI = Path(__file__).with_name("slow_cli.py")

# 38 training pairs, 4 per micro-batch, 2 micro-batches per step: 4 steps per epoch, so 12 steps cross two epoch
# boundaries (data order); warmup + linear decay (scheduler); AdamW moments (optimizer).
RESUME = {
    "max_steps": 12,
    "batch_size": 4,
    "grad_accum": 2,
    "warmup_ratio": 0.25,
    "scheduler": "linear",
    "save_every": 3,
    "log_every": 2,
    "kl_prompts": 2,
    "kl_samples": 2,
    "kl_max_new_tokens": 8,
}


def _env() -> dict:
    return {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "SACPO_TEST_STEP_DELAY": "0.25",
    }


def _complete_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*/step.json"))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model, pku_tiny, tmp_path):
    cli = [sys.executable, "-m", "sacpo.cli", "-q", "train"]
    full, crash = tmp_path / "full", tmp_path / "crash"
    full_cfg = write_yaml(tmp_path / "full.yaml", stage_fields(tiny_model, pku_tiny, full, **RESUME))
    crash_cfg = write_yaml(tmp_path / "crash.yaml", stage_fields(tiny_model, pku_tiny, crash, **RESUME))
    subprocess.run([*cli, str(full_cfg)], check=True, env=_env(), capture_output=True, timeout=300)

    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(SLOW_CLI), "-q", "train", str(crash_cfg)], env=_env(), stdout=log, stderr=log
    )
    deadline = time.time() + 240
    while not _complete_checkpoints(crash) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    killed_at = _complete_checkpoints(crash)
    assert killed_at and killed_at[-1] < 12, killed_at
    assert not is_done(crash) and not looks_finished(crash), sorted(p.name for p in crash.iterdir())

    resumed = subprocess.run(
        [*cli, str(crash_cfg), "--resume"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert is_done(crash)
    assert max_abs_diff(weights(full / "model"), weights(crash / "model")) <= 1e-6
    assert (crash / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    assert json.loads((crash / "summary.json").read_text())["steps"] == 12


# ------------------------------------------------------------------------------------ in-process crashes
class Crash(Exception):
    pass


def _crash_after(monkeypatch, calls: int) -> None:
    """The process dies (an exception nobody catches) at the `calls`+1-th micro-batch."""
    import sacpo.train.step as step

    real, n = step.BatchLoss.__call__, {"calls": 0}

    def crashing(self, *a, **k):
        n["calls"] += 1
        if n["calls"] > calls:
            raise Crash(f"simulated crash at micro-batch {n['calls']}")
        return real(self, *a, **k)

    monkeypatch.setattr(step.BatchLoss, "__call__", crashing)


@pytest.fixture(scope="module")
def runs(tiny_model, pku_tiny, tmp_path_factory):
    """An uninterrupted LoRA run (LoRA dropout 0.1: the only RNG consumer, so the RNG restore matters) and a
    crashed copy of it (killed in step 5; newest checkpoint step 3, whose step was not logged yet: its metric
    values are pending; metrics.jsonl already has the step-4 record), shared by the tests below."""
    root = tmp_path_factory.mktemp("resume")
    kw = {**RESUME, "kl_prompts": 0, "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1}}
    full, crashed = root / "full", root / "crashed"
    train(make_cfg(tiny_model, pku_tiny, full, **kw), show_progress=False)
    mp = pytest.MonkeyPatch()
    _crash_after(mp, calls=9)  # 4 full steps of 2 micro-batches, then one more micro-batch
    with pytest.raises(Crash):
        train(make_cfg(tiny_model, pku_tiny, crashed, **kw), show_progress=False)
    mp.undo()
    assert _complete_checkpoints(crashed) == [3] and not looks_finished(crashed)
    files = [p.name for p in (crashed / "checkpoints").rglob("*") if p.is_file()]
    assert all(name.endswith((".safetensors", ".json")) for name in files), files  # no pickle to load
    assert [r["step"] for r in read_metrics(crashed)] == [2, 4]
    return {"full": full, "crashed": crashed, "kw": kw, "root": root}


def _copy(runs, name: str) -> Path:
    dst = runs["root"] / name
    shutil.copytree(runs["crashed"], dst)
    return dst


def test_resume_restores_weights_optimizer_scheduler_rng_data_order_and_metrics(tiny_model, pku_tiny, runs):
    out = _copy(runs, "resumed")
    train(make_cfg(tiny_model, pku_tiny, out, **runs["kw"]), resume=True, show_progress=False)
    assert is_done(out)
    assert max_abs_diff(weights(runs["full"] / "model"), weights(out / "model")) <= 1e-6
    # lr (scheduler), loss (data order, weights), grad_norm (optimizer); the step-4 record written before the
    # crash is dropped and rewritten from the restored step-3 values plus step 4: identical records
    assert (out / "metrics.jsonl").read_text() == (runs["full"] / "metrics.jsonl").read_text()


def test_resume_ignores_a_torn_checkpoint_and_a_torn_metrics_line(tiny_model, pku_tiny, runs):
    """SIGKILL during a checkpoint save leaves step-N without step.json; during a metrics write, half a line."""
    out = _copy(runs, "torn")
    partial = out / "checkpoints" / "step-6"
    shutil.copytree(out / "checkpoints" / "step-3", partial)
    (partial / "step.json").unlink()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.6')
    assert checkpoint.latest_checkpoint(out).name == "step-3"
    train(make_cfg(tiny_model, pku_tiny, out, **runs["kw"]), resume=True, show_progress=False)
    assert max_abs_diff(weights(runs["full"] / "model"), weights(out / "model")) <= 1e-6
    assert (out / "metrics.jsonl").read_text() == (runs["full"] / "metrics.jsonl").read_text()
    assert _complete_checkpoints(out) == [6, 9]  # the torn step-6 was overwritten by a complete one


@pytest.mark.parametrize(
    "change, field",
    [({"lr": 1e-3}, "lr"), ({"seed": 1}, "seed"), ({"max_steps": 14}, "max_steps"), ({"beta": 0.2}, "beta")],
)
def test_resume_with_different_settings_is_refused(tiny_model, pku_tiny, runs, change, field):
    out = _copy(runs, f"changed-{field}")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cfg = make_cfg(tiny_model, pku_tiny, out, **{**runs["kw"], **change})
    with pytest.raises(ConfigError, match=rf"cannot resume .*{field}"):
        train(cfg, resume=True, show_progress=False)
    assert _complete_checkpoints(out) == [3]  # nothing was lost or changed
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_with_different_data_is_refused(tiny_model, pku_tiny, runs):
    out = _copy(runs, "changed-data")
    rows = pku_tiny.read_text().splitlines()
    other = runs["root"] / "other.jsonl"
    other.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # same rows, another order
    with pytest.raises(ConfigError, match="reference_cache"):
        train(make_cfg(tiny_model, other, out, **runs["kw"]), resume=True, show_progress=False)


def test_resume_may_change_logging_and_checkpoint_frequency(tiny_model, pku_tiny, runs):
    out = _copy(runs, "relogged")
    kw = {**runs["kw"], "save_every": 4, "log_every": 3}
    train(make_cfg(tiny_model, pku_tiny, out, **kw), resume=True, show_progress=False)
    assert max_abs_diff(weights(runs["full"] / "model"), weights(out / "model")) <= 1e-6
    assert [r["step"] for r in read_metrics(out)] == [2, 6, 9, 12]


def test_resume_without_a_checkpoint_starts_over_cleanly(tiny_model, pku_tiny, tmp_path, monkeypatch):
    """A crash before the first checkpoint: --resume starts from step 0 and drops the old metrics records."""
    kw = {**RESUME, "max_steps": 4, "kl_prompts": 0, "save_every": 0, "log_every": 1}
    out = tmp_path / "early"
    _crash_after(monkeypatch, calls=5)
    with pytest.raises(Crash):
        train(make_cfg(tiny_model, pku_tiny, out, **kw), show_progress=False)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    monkeypatch.undo()
    train(make_cfg(tiny_model, pku_tiny, out, **kw), resume=True, show_progress=False)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
