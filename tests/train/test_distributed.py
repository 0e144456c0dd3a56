"""A stage under `accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine (accelerate picks
MULTI_CPU with gloo) matches the single-process run. (`--cpu --num_processes 2` starts ONE process in accelerate
1.15, so the test also checks that two processes really ran.) The FSDP2 tests below launch the shipped
configs/accelerate/fsdp2_cpu.yaml (sacpo forces FSDP2 on CPU: docs/distributed.md), the DeepSpeed tests
configs/accelerate/deepspeed_zero{2,3}_cpu.yaml (sacpo forces DeepSpeed on CPU the same way)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sacpo.train.state import load_tree

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


# ------------------------------------------------------------------------------ FSDP2 over gloo (CPU)
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
FSDP2_CPU = REPO / "configs" / "accelerate" / "fsdp2_cpu.yaml"
STAGE = {  # 4 steps of 2 micro-batches; a checkpoint at step 2; the KL estimate (2 prompts) at the last step
    "max_steps": 4,
    "save_every": 2,
    "batch_size": 8,
    "grad_accum": 2,
    "lr": 2e-3,
    "max_length": 80,
    "max_prompt_length": 40,
    "log_every": 2,
    "kl_prompts": 2,
    "kl_max_new_tokens": 8,
    "eval_fraction": 0.2,
}
LORA = {"lr": 1e-2, "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn", "c_proj"]}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp2(script: list[str]) -> list[str]:
    """`accelerate launch` of the shipped FSDP2 CPU config (2 processes) on a free port."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CPU)]
    return [*launch, "--main_process_port", str(_free_port()), *script]


def _stage(tmp, name, tiny_model, pku_tiny, **kw) -> Path:
    fields = {
        "policy": str(tiny_model),
        "data": {"source": str(pku_tiny), "format": "pku_helpful"},
        **STAGE,
        **kw,
        "cache_dir": str(tmp / "cache"),
        "output_dir": str(tmp / name),
    }
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(fields))
    return cfg


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_close_runs(a: Path, b: Path, subdir: str = "model", skip: frozenset = frozenset()) -> None:
    """The tolerances of the DDP test: weights atol 1e-4 / rtol 1e-3, metrics 1e-4 (KL 1e-3); `skip`: (metric,
    step) pairs not compared."""
    m1, m2 = _metrics(a), _metrics(b)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [2, 4]
    for r1, r2 in zip(m1, m2, strict=True):
        for key in r1:
            if (key, r1["step"]) in skip:
                continue
            tol = 1e-3 if key.startswith("eval/kl") else 1e-4
            assert r2[key] == pytest.approx(r1[key], abs=tol), key
    w1, w2 = (load_file(next((o / subdir).glob("*.safetensors"))) for o in (a, b))
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_model, pku_tiny, tmp_path_factory):
    """Full fine-tuning: one process; FSDP2 over 2 processes (stderr kept); FSDP2 killed (SIGKILL in every
    process) right after its step-2 checkpoint, a copy of that crashed directory, then the crashed run resumed."""
    tmp = tmp_path_factory.mktemp("fsdp")
    cfgs = {n: _stage(tmp, n, tiny_model, pku_tiny) for n in ("one", "fsdp", "crash")}
    run([*ONE, "-q", "train", str(cfgs["one"])], cwd=tmp)
    proc = run(fsdp2(["-m", "sacpo.cli", "-q", "train", str(cfgs["fsdp"])]), cwd=tmp)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "SACPO_TEST_KILL_AFTER_SAVE": "2",
    }
    killed = subprocess.run(
        fsdp2([str(HERE / "kill_after_save.py"), "-q", "train", str(cfgs["crash"])]),
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode != 0 and not (tmp / "crash" / "DONE").exists(), killed.stderr[-3000:]
    shutil.copytree(tmp / "crash", tmp / "crash_copy")
    run([*fsdp2(["-m", "sacpo.cli", "-q", "train", str(cfgs["crash"]), "--resume"])], cwd=tmp)
    return {"root": tmp, "log": proc.stderr, **{n: tmp / n for n in ("one", "fsdp", "crash", "crash_copy")}}


def test_fsdp2_two_processes_match_one_process(fsdp_runs):
    """The forced FSDP2 run trains what one process trains (measured: weights 3.8e-6, metrics 3.1e-5), saves a
    full model/, writes per-process shards in its checkpoint and says in its log what it did and why."""
    _assert_close_runs(fsdp_runs["one"], fsdp_runs["fsdp"])
    summary = json.loads((fsdp_runs["fsdp"] / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["model_format"] == "dense"
    assert summary["fused_head"] is False and "FSDPModule" in summary["fused_head_reason"]
    assert "sacpo switched the 2-process gloo group to FSDP2" in fsdp_runs["log"]
    assert "state.py:947" in fsdp_runs["log"]
    assert "log-probs: full logits (model inside FSDPModule" in fsdp_runs["log"]
    step2 = fsdp_runs["crash_copy"] / "checkpoints" / "step-2"
    names = {p.name for p in step2.iterdir()}
    for r in (0, 1):
        assert {f"model-rank{r}.safetensors", f"optimizer-rank{r}.safetensors", f"rng-{r}.json"} <= names
    assert "model.safetensors" not in names and "sharding.json" in names
    shard = load_tree(step2, "model-rank0")["transformer.h.0.attn.c_attn.weight"]
    assert shard.shape == (32, 192)  # (64, 192) split over 2 processes: really a shard
    assert json.loads((step2 / "sharding.json").read_text()) == {"kind": "fsdp2", "num_processes": 2}


def test_fsdp2_resume_after_sigkill_is_bit_identical(fsdp_runs):
    w1, w2 = (load_file(fsdp_runs[n] / "model" / "model.safetensors") for n in ("fsdp", "crash"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and set(w1) == set(w2)
    assert (fsdp_runs["crash"] / "metrics.jsonl").read_text() == (
        fsdp_runs["fsdp"] / "metrics.jsonl"
    ).read_text()


def test_fsdp2_checkpoint_refuses_another_process_count(fsdp_runs, tiny_model, pku_tiny):
    """An FSDP2 checkpoint of 2 processes is not resumed by 1 (the shards are not resharded)."""
    from sacpo.config import ConfigError, from_dict
    from sacpo.train.config import TrainConfig
    from sacpo.train.loop import train

    cfg = yaml.safe_load((fsdp_runs["root"] / "crash.yaml").read_text())
    cfg["output_dir"] = str(fsdp_runs["crash_copy"])
    with pytest.raises(ConfigError, match="FSDP2 shards of 2 processes"):
        train(from_dict(TrainConfig, cfg), resume=True, show_progress=False)


def test_fsdp2_lora_save_both_and_kl(tiny_model, pku_tiny, tmp_path):
    """LoRA under FSDP2 (frozen and trainable parameters in the same FSDP groups; the KL reference is the sharded
    policy with its adapter off, on every process): merged model/ and adapter/ match one process."""
    lora = {**LORA, "lora": {**LORA["lora"], "save": "both"}, "save_every": 0}
    one = _stage(tmp_path, "one", tiny_model, pku_tiny, **lora)
    two = _stage(tmp_path, "two", tiny_model, pku_tiny, **lora)
    run([*ONE, "-q", "train", str(one)], cwd=tmp_path)
    run(fsdp2(["-m", "sacpo.cli", "-q", "train", str(two)]), cwd=tmp_path)
    _assert_close_runs(tmp_path / "one", tmp_path / "two", "model")
    _assert_close_runs(tmp_path / "one", tmp_path / "two", "adapter")
    assert "eval/kl" in _metrics(tmp_path / "two")[-1]


def test_logps_and_gradients_under_fsdp2_and_ddp_match_plain(tiny_model, tmp_path):
    """sequence_logps (auto, fused=True) under FSDP2 and DDP, and packed_pair_logps under FSDP2: log-probs and
    gathered gradients equal the plain model's (measured ≤ 4.8e-7 and ≤ 9.5e-7)."""
    tr = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    proc = run([*tr, str(HERE / "dist_logps_check.py"), str(tiny_model)], cwd=tmp_path)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, wrapper, n in (("fsdp2", "FSDPModule", 4), ("ddp", "DistributedDataParallel", 2)):
        assert wrapper in out[kind].pop("reason")
        assert len(out[kind]) == n
        for key, (dlogp, dgrad) in out[kind].items():
            assert dlogp <= 1e-5 and dgrad <= 1e-5, (kind, key, dlogp, dgrad)


def deepspeed_launch(tmp: Path, stage: int) -> list[str]:
    """`accelerate launch` of the shipped ZeRO-`stage` CPU config (2 processes) on a free port; the config's JSON
    path is relative to the repository root, so a copy with it made absolute is written to `tmp`."""
    shipped = REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}_cpu.yaml"
    cfg = yaml.safe_load(shipped.read_text())
    cfg["deepspeed_config"]["deepspeed_config_file"] = str(
        REPO / cfg["deepspeed_config"]["deepspeed_config_file"]
    )
    path = tmp / f"accelerate-zero{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    return [*launch, "--main_process_port", str(_free_port()), "-m", "sacpo.cli", "-q", "train"]


DEEPSPEED_STAGE = {"grad_accum": 1, "save_every": 0}  # what sacpo's loop supports under DeepSpeed


@pytest.fixture(scope="module")
def deepspeed_runs(tiny_model, pku_tiny, tmp_path_factory):
    """Full fine-tuning and LoRA (`save: both`): one process, then ZeRO-2 and ZeRO-3 over 2 CPU processes
    (stderr kept)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (`make test` installs it)")
    tmp = tmp_path_factory.mktemp("deepspeed")
    kinds = {
        "full": DEEPSPEED_STAGE,
        "lora": {**DEEPSPEED_STAGE, **LORA, "lora": {**LORA["lora"], "save": "both"}},
    }
    logs = {}
    for kind, extra in kinds.items():
        cfgs = {
            n: _stage(tmp, f"{kind}-{n}", tiny_model, pku_tiny, **extra) for n in ("one", "zero2", "zero3")
        }
        run([*ONE, "-q", "train", str(cfgs["one"])], cwd=tmp)
        for z in ("zero2", "zero3"):
            logs[kind, z] = run([*deepspeed_launch(tmp, z[-1]), str(cfgs[z])], cwd=tmp).stderr
    return {"root": tmp, "logs": logs}


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_on_cpu_matches_one_process(deepspeed_runs, zero, kind):
    """accelerate 1.16 would run a DeepSpeed config on CPU as plain DDP (state.py:935); sacpo switches the gloo
    group to DeepSpeed (its CPU accelerator) and the run trains what one process trains: the same metrics
    (held-out KL included, computed on both processes) and final weights within the DDP test's tolerances
    (measured: full 4.4e-5, LoRA merged 2.2e-7 and adapter 8.2e-7, ZeRO-2 and ZeRO-3 alike)."""
    root = deepspeed_runs["root"]
    # step 1 starts at policy = reference: every margin is a tie, exactly 0 in one process (accuracy 0) and
    # ±1.5e-6 over 2 processes (accuracy 0.625; measured): the accuracy logged at step 2 (the mean of steps 1-2)
    # differs by construction, everything else (losses, margins, gradient norms, weights) is compared
    skip = frozenset({("rewards/accuracy", 2)})
    for subdir in ("model", "adapter") if kind == "lora" else ("model",):
        _assert_close_runs(root / f"{kind}-one", root / f"{kind}-{zero}", subdir, skip=skip)
    summary = json.loads((root / f"{kind}-{zero}" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["model_format"] == "dense"
    assert "DeepSpeedEngine" in summary["fused_head_reason"]
    log = deepspeed_runs["logs"][kind, zero]
    assert f"sacpo switched the 2-process gloo group to DeepSpeed ZeRO-{zero[-1]}" in log, log[-3000:]
    assert "state.py:935" in log


def test_deepspeed_refuses_what_its_engine_cannot_do(deepspeed_runs, tiny_model, pku_tiny):
    """grad_accum > 1 under DeepSpeed stops before the first step with sacpo's ConfigError (the engine steps after
    every micro-batch and scales the loss by its own accumulation count)."""
    tmp = deepspeed_runs["root"]
    cfg = _stage(tmp, "accum", tiny_model, pku_tiny, grad_accum=2, save_every=0, batch_size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*deepspeed_launch(tmp, 2), str(cfg)], cwd=tmp, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0 and "under DeepSpeed set grad_accum: 1 (got 2)" in proc.stderr, proc.stderr[
        -3000:
    ]
