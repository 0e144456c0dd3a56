"""Two gloo processes on CPU (torchrun): a KTO step where one process has desirable examples and the other does
not must not mix up metrics (every process makes the same gathers, in the same order), and a resumed run (per-
process pending metrics, RNG) ends where the uninterrupted one ended."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from reliability_helpers import max_abs_diff, stage_fields, weights, write_yaml

pytestmark = pytest.mark.slow
# torchrun, not `accelerate launch --cpu`: accelerate 1.15 starts a single process for --cpu
TWO = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node",
    "2",
    "-m",
    "sacpo.cli",
]


def _run(argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_kto_metrics_of_two_processes_match_one_process(tiny_model, pku_tiny, tmp_path):
    # one example per process per step: each process's rewards/desirable is that example's reward, or absent
    kw = {"loss": "kto", "fmt": "pku_safe_kto", "batch_size": 2, "max_steps": 8, "log_every": 1}
    launchers = {"one": [sys.executable, "-m", "sacpo.cli"], "two": TWO}
    records = {}
    for name, launcher in launchers.items():
        cfg = write_yaml(tmp_path / f"{name}.yaml", stage_fields(tiny_model, pku_tiny, tmp_path / name, **kw))
        _run([*launcher, "-q", "train", str(cfg)], tmp_path)
        records[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        processes = json.loads((tmp_path / name / "summary.json").read_text())["num_processes"]
        assert (
            processes == {"one": 1, "two": 2}[name]
        )  # two processes really ran: the comparison is not vacuous
    mixed = 0
    for r1, r2 in zip(records["one"], records["two"], strict=True):
        assert set(r1) == set(r2), (r1["step"], set(r1) ^ set(r2))
        for key in ("rewards/desirable", "rewards/undesirable", "loss", "kto/z_ref"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], abs=1e-4), (r1["step"], key)
        mixed += "rewards/desirable" in r1 and "rewards/undesirable" in r1
    assert mixed >= 2  # steps where the two processes had different kinds of examples


def test_two_process_resume_matches_the_uninterrupted_run(tiny_model, pku_tiny, tmp_path):
    """Resume a copy of a finished run from its newest checkpoint (step 4, taken between two metrics records):
    it must redo steps 5-6 exactly."""
    kw = {"batch_size": 4, "max_steps": 6, "save_every": 2, "log_every": 3, "kl_prompts": 0}
    full = tmp_path / "full"
    cfg = write_yaml(tmp_path / "full.yaml", stage_fields(tiny_model, pku_tiny, full, **kw))
    _run([*TWO, "-q", "train", str(cfg)], tmp_path)
    again = tmp_path / "again"
    shutil.copytree(full, again)
    cfg = write_yaml(tmp_path / "again.yaml", stage_fields(tiny_model, pku_tiny, again, **kw))
    _run([*TWO, "-q", "train", str(cfg), "--resume"], tmp_path)
    assert sorted(p.name for p in (again / "checkpoints" / "step-4").glob("metrics-pending-*")) == [
        "metrics-pending-0.json",
        "metrics-pending-1.json",
    ]
    assert max_abs_diff(weights(full / "model"), weights(again / "model")) <= 1e-6
    assert (again / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
