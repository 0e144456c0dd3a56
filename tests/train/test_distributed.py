"""A stage under `accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine (accelerate picks
MULTI_CPU with gloo) matches the single-process run. (`--cpu --num_processes 2` starts ONE process in accelerate
1.15, so the test also checks that two processes really ran.)"""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


ONE = [sys.executable, "-m", "sacpo.cli"]
TWO = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--multi_gpu",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "-m",
    "sacpo.cli",
]


def test_two_process_gloo_matches_one_process(tiny_model, pku_tiny, tmp_path):
    base = {
        "policy": str(tiny_model),
        "data": {"source": str(pku_tiny), "format": "pku_helpful"},
        "max_steps": 4,
        "batch_size": 8,
        "grad_accum": 2,
        "lr": 2e-3,
        "max_length": 80,
        "max_prompt_length": 40,
        "log_every": 2,
        "kl_prompts": 0,
        "eval_fraction": 0.2,
        "cache_dir": str(tmp_path / "cache"),
    }
    outs = {}
    for name, launcher in {"one": ONE, "two": TWO}.items():
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**base, "output_dir": str(tmp_path / name)}))
        run([*launcher, "-q", "train", str(cfg)], cwd=tmp_path)
        outs[name] = tmp_path / name
    m1, m2 = ([json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in outs.values())
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [2, 4]
    for r1, r2 in zip(m1, m2, strict=True):
        for key in ("loss", "rewards/margin", "eval/loss"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], abs=1e-4), key
    w1, w2 = (load_file(o / "model" / "model.safetensors") for o in outs.values())
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)
    summary = json.loads((outs["two"] / "summary.json").read_text())
    assert summary["num_processes"] == 2, "the launcher started one process: the comparison would be vacuous"
    assert json.loads((outs["one"] / "summary.json").read_text())["num_processes"] == 1
    assert summary["reference_pass"] == "cached"  # the single-process run filled the shared cache
    # under DDP the step takes the full-logits path (the fused head would bypass the wrapper's forward)
    assert summary["fused_head"] is False and "DistributedDataParallel" in summary["fused_head_reason"]


def test_kl_budget_stops_both_processes_at_the_same_step(tiny_model, pku_tiny, tmp_path):
    """The KL estimate runs on the main process only; its stop decision is broadcast. A process that did not stop
    would wait in its next gather forever (the run would time out): both runs end, at the same step as the
    single-process run, with stopped_early in summary.json."""
    base = {
        "policy": str(tiny_model),
        "data": {"source": str(pku_tiny), "format": "pku_helpful"},
        "max_steps": 8,
        "batch_size": 8,
        "lr": 1e-2,
        "max_length": 80,
        "max_prompt_length": 40,
        "log_every": 4,
        "kl_every": 2,
        "kl_prompts": 4,
        "kl_max_new_tokens": 8,
        "kl_budget": 1e-3,
        "eval_fraction": 0.2,
        "cache_dir": str(tmp_path / "cache"),
    }
    summaries = {}
    for name, launcher in {"one": ONE, "two": TWO}.items():
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**base, "output_dir": str(tmp_path / name)}))
        run([*launcher, "-q", "train", str(cfg)], cwd=tmp_path)
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    one, two = summaries["one"], summaries["two"]
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert one["stopped_early"] is not None and one["stopped_early"]["step"] < 8
    assert two["stopped_early"]["step"] == one["stopped_early"]["step"] == two["steps"]
    assert two["stopped_early"]["kl"] == pytest.approx(one["stopped_early"]["kl"], abs=1e-3)
