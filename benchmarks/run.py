"""Benchmarks of sacpo against TRL 1.x, in one run; rewrites benchmarks/RESULTS.md.

    python -m benchmarks.run --quick     # smoke run, tiny GPT-2 only (< 3 min on 2 cores: 2.5 min measured 2026-12-07)
    python -m benchmarks.run             # full: tiny GPT-2 + SmolLM2-135M (full and LoRA), ≤ 30 min on 2 cores

Every measurement runs in its own child process (one configuration per child, so its peak RSS is its own), sacpo
and TRL alternate within each repetition (the order flips every repetition), and every table reports
median [min, max] over repetitions; ratios are computed per repetition (same conditions) and then summarised.

1. DPO step: tokens/s and peak RSS of sacpo's `train()` and TRL's `DPOTrainer.train()` (benchmarks/dpo_step.py),
   the reference from sacpo's on-disk cache vs a live reference model, full fine-tuning and LoRA, plus the
   first-batch loss of both (must agree to 1e-4).
2. SACPO λ sweep of 3 values: `run_pipeline` (one shared reference pass) vs a DPOTrainer per λ (sweep.py).
3. Best-of-n: one batched `sample` (n=8, 16 prompts) vs 16 per-prompt calls; controlled decoding cost per
   generated token vs plain sampling (generation.py).
4. The hardware limit: fp32 matmul FLOP/s (hardware.py) and the MFU of the DPO steps.
5. The whole SACPO workflow (step 1, a 3-λ step-2 sweep, 3 P-SACPO merges, evaluation of every model) on
   SmolLM2-135M, full and LoRA: sacpo's pipeline + eval vs the same with TRL/peft/transformers (workflow.py).
6. Scaling: DPO-step tokens/s and peak RSS vs max_length 256/512/1024 (dpo_step.py) and λ-sweep wall time vs
   sweep size 1/3/6 (sweep.py), both tools, drawn as PNGs next to the report.

`--profile auto` (default) runs the torch profiler on the DPO step of every configuration whose target was missed
(profiling.py) and adds where the time goes to RESULTS.md; benchmarks/ANALYSIS.md (hand-written reading of a
run, proposed fixes) is appended. `--merge` reruns a noisy section into the last results; `--report-only` re-renders.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_WORK, ROOT, child_env, long_response, paired_rows, write_rows

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
ANALYSIS = ROOT / "benchmarks" / "ANALYSIS.md"  # hand-written reading of a run, appended to RESULTS.md
# trl/live+malloc: TRL's default step with sacpo's glibc malloc thresholds applied first (like for like on the
# allocator; full fine-tuning only, to keep `make bench` within its time budget)
HEADLINE = [("sacpo", "cached"), ("trl", "live")]  # the pair the step targets are stated on
FULL_VARIANTS = [*HEADLINE, ("sacpo", "live"), ("trl", "precompute"), ("trl", "live+malloc")]
LORA_VARIANTS = [*HEADLINE, ("trl", "precompute")]
# (numerator, denominator, what the row means); tokens/s ratio = num/den, RSS ratio = num/den
COMPARISONS = [
    (
        ("sacpo", "cached"),
        ("trl", "live"),
        "each tool's default: sacpo cached reference vs TRL live reference",
    ),
    (("sacpo", "live"), ("trl", "live"), "like for like: both with a live reference model"),
    (("sacpo", "cached"), ("trl", "precompute"), "like for like: both with precomputed reference log-probs"),
    (("sacpo", "cached"), ("sacpo", "live"), "sacpo: on-disk cache vs live reference (same loop)"),
    (
        ("sacpo", "cached"),
        ("trl", "live+malloc"),
        "like for like on the allocator: TRL's default with the glibc malloc thresholds the sacpo commands set",
    ),
]
TARGETS = {  # config name -> (min tokens/s ratio, max RSS ratio) on the "each tool's default" row
    "tiny-full": (1.2, None),
    "smollm2-full": (1.5, 0.8),
    "smollm2-lora": (1.5, 0.8),
}
SWEEP_TARGET = 0.6
WORKFLOW_TARGETS = {"wall": 0.4, "rss": 0.75}  # sacpo ÷ TRL, the whole workflow
BON_TARGET = 3.0
LOSS_TOL = 1e-4


@dataclass
class StepConfig:
    name: str
    model: str
    lora: bool
    batch_size: int
    warmup: int  # timed intervals dropped
    timed: int  # timed intervals kept
    max_length: int = 256
    max_prompt_length: int = 128
    lr: float = 5e-6
    beta: float = 0.1
    reps: int | None = None  # runs per variant; None: the plan's
    response_sentences: tuple[int, int] | None = None  # long rows (the max_length scaling curve)
    headline_only: bool = False  # only the arms the targets are stated on (the scaling curve)

    @property
    def steps(self) -> int:
        return 1 + self.warmup + self.timed

    @property
    def variants(self) -> list[tuple[str, str]]:
        if self.headline_only:
            return HEADLINE
        return LORA_VARIANTS if self.lora else FULL_VARIANTS


@dataclass
class WorkflowConfig:
    name: str
    model: str
    lora: bool
    n_rows: int  # pairs per stage (step 1 and step 2 each): n_rows / batch_size steps per stage
    batch_size: int
    reps: int
    n_prompts: int = 4  # evaluation: prompts × samples per model, max_new_tokens
    n_samples: int = 2
    max_new_tokens: int = 16
    eval_batch: int = 16
    n_boot: int = 200
    max_length: int = 256
    max_prompt_length: int = 128
    lr: float = 5e-6
    beta: float = 0.1
    qs: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])


@dataclass
class Plan:
    reps: int
    step_configs: list[StepConfig]
    sweep_models: list[str]
    sweep_rows: dict[str, int]
    sweep_batch: dict[str, int]
    sweep_reps: dict[str, int]
    gen_models: list[str]
    gen_reps: dict[str, int]
    max_new_tokens: int
    hw_sizes: list[int]
    hw_repeats: int
    lams: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # model -> repetitions of the informational arms (like-for-like variants, HF generate); the arms a target is
    # stated on run every repetition. Absent: every repetition.
    info_reps: dict[str, int] = field(default_factory=dict)
    workflows: list[WorkflowConfig] = field(default_factory=list)
    scale_lengths: list[StepConfig] = field(default_factory=list)  # the max_length curve (HEADLINE arms only)
    scale_sweep_model: str = "tiny"
    scale_sweep_sizes: dict[int, list[float]] = field(
        default_factory=lambda: {1: [1.0], 3: [0.5, 1.0, 2.0], 6: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]}
    )
    scale_sweep_reps: int = 1

    def informational(self, model: str, rep: int) -> bool:
        """Whether repetition `rep` (0-based) of `model` also runs the informational arms."""
        return rep < self.info_reps.get(model, rep + 1)


def scale_lengths(model: str, lengths: list[int], reps: int, batch_size: int = 8) -> list[StepConfig]:
    """DPO-step configs of the max_length curve: rows filling ~80% of each max_length (`long_response`)."""
    return [
        StepConfig(
            f"{model}-L{n}",
            model,
            False,
            batch_size=batch_size,
            warmup=1,
            timed=3,
            max_length=n,
            reps=reps,
            response_sentences=long_response(model, n),
            headline_only=True,
        )
        for n in lengths
    ]


def make_plan(quick: bool, reps: int | None) -> Plan:
    if quick:
        return Plan(
            reps=reps or 1,
            step_configs=[StepConfig("tiny-full", "tiny", False, batch_size=8, warmup=1, timed=3)],
            sweep_models=["tiny"],
            sweep_rows={"tiny": 32},
            sweep_batch={"tiny": 8},
            sweep_reps={"tiny": 1},
            gen_models=["tiny"],
            gen_reps={"tiny": 1},
            max_new_tokens=16,
            hw_sizes=[256, 512, 1024],
            hw_repeats=3,
            # the smallest workflow (1 step per stage, 2 prompts × 1 sample × 4 tokens) and curves: --quick < 3 min
            workflows=[
                WorkflowConfig(
                    "tiny-full",
                    "tiny",
                    False,
                    n_rows=8,
                    batch_size=8,
                    reps=1,
                    n_prompts=2,
                    n_samples=1,
                    max_new_tokens=4,
                )
            ],
            scale_lengths=scale_lengths("tiny1k", [256, 512], reps=1, batch_size=2),
            scale_sweep_sizes={1: [1.0], 3: [0.5, 1.0, 2.0]},
            scale_sweep_reps=1,
        )
    return Plan(
        reps=reps or 3,
        step_configs=[
            StepConfig("tiny-full", "tiny", False, batch_size=8, warmup=2, timed=8),
            # 2 runs per variant (each child ~40 s): with 3 the whole bench took 28 min on a 156 GFLOP/s CPU
            StepConfig("smollm2-full", "smollm2", False, batch_size=2, warmup=1, timed=3, reps=reps or 2),
            StepConfig("smollm2-lora", "smollm2", True, batch_size=2, warmup=1, timed=3, reps=reps or 2),
        ],
        sweep_models=["tiny", "smollm2"],
        sweep_rows={"tiny": 128, "smollm2": 8},
        sweep_batch={"tiny": 8, "smollm2": 2},
        sweep_reps={"tiny": reps or 3, "smollm2": reps or 2},
        gen_models=["tiny", "smollm2"],
        gen_reps={"tiny": reps or 3, "smollm2": reps or 2},
        max_new_tokens=32,
        hw_sizes=[256, 512, 1024, 2048],
        hw_repeats=5,
        # SmolLM2's like-for-like arms and HF generate run once (each child 30–90 s): with them in every repetition
        # the bench took 26 min on this 2-core machine, too close to its 30-minute budget
        info_reps={} if reps else {"smollm2": 1},
        workflows=[
            WorkflowConfig(
                "smollm2-full",
                "smollm2",
                False,
                n_rows=8,
                batch_size=2,
                reps=reps or WF_REPS,
                max_new_tokens=8,
            ),
            WorkflowConfig(
                "smollm2-lora",
                "smollm2",
                True,
                n_rows=8,
                batch_size=2,
                reps=reps or WF_REPS,
                max_new_tokens=8,
            ),
        ],
        # 2 repetitions of the tiny curves (children 5–25 s): a median with its [min, max], within the 30 minutes
        scale_lengths=scale_lengths("tiny1k", [256, 512, 1024], reps=reps or 2, batch_size=4),
        scale_sweep_reps=reps or 2,
    )


# One repetition per tool of each SmolLM2 workflow: its children take 70–160 s (measured 2026-12-07: sacpo 103 s /
# TRL 153 s full, 67 s / 122 s LoRA, with 16 new tokens per sample), so a second would add ~8 min and take
# `make bench` past its 30 minutes; 8 new tokens per sample (−~45 s in all) leave the rest of the bench its margin
WF_REPS = 1


# ------------------------------------------------------------------------------------------------ children
class Runner:
    def __init__(self, work: Path, threads: int, verbose: bool) -> None:
        self.work, self.threads, self.verbose = work, threads, verbose
        self.env = child_env(threads)
        self.count = 0

    def __call__(self, module: str, spec: dict[str, Any], label: str) -> dict[str, Any]:
        """Run `python -m benchmarks.<module>` on one spec; a failure is returned as {"error": ...}."""
        self.count += 1
        out = self.work / "results" / f"{self.count:03d}-{module}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        spec = {"threads": self.threads, "work": str(self.work), **spec}
        started = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {label} ...", end=" ", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{module}", "--spec", json.dumps(spec), "--out", str(out)],
            env=self.env,
            cwd=ROOT,
            capture_output=not self.verbose,
            text=True,
        )
        seconds = time.time() - started
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-15:] if not self.verbose else []
            print(f"FAILED after {seconds:.0f}s")
            if tail:
                print("    " + "\n    ".join(tail))
            return {"error": tail[-1] if tail else f"exit code {proc.returncode}", "spec": spec}
        print(f"{seconds:.0f}s")
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------- statistics
def summary(xs: list[float]) -> tuple[float, float, float] | None:
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def fmt(s: tuple[float, float, float] | None, digits: int = 2, scale: float = 1.0) -> str:
    if s is None:
        return "n/a"
    m, lo, hi = (x * scale for x in s)
    if lo == hi:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def step_throughput(result: dict[str, Any], warmup: int) -> dict[str, float] | None:
    """tokens/s and s/step of the timed steps of one child (interval i is step i+2, 1-based)."""
    if "error" in result:
        return None
    clock = result["clock"]
    intervals = [b - a for a, b in itertools.pairwise(clock)][warmup:]
    tokens = result["tokens"][1 + warmup :][: len(intervals)]
    padded = result["padded_tokens"][1 + warmup :][: len(intervals)]
    # tokens through the model: each pair's prompt once where sacpo ran shared-prompt rows (older results lack it)
    computed = result["shared_tokens"] if result.get("shared_prompt_rows") else result["tokens"]
    computed = computed[1 + warmup :][: len(intervals)]
    # median of the per-step rates: robust to a step stalled by another process on a shared machine
    return {
        "tokens_per_s": statistics.median(t / dt for t, dt in zip(tokens, intervals, strict=True)),
        "model_tokens_per_s": statistics.median(t / dt for t, dt in zip(computed, intervals, strict=True)),
        "shared_prompt_rows": bool(result.get("shared_prompt_rows")),
        "s_per_step": statistics.median(intervals),
        "tokens_per_step": statistics.mean(tokens),
        "model_tokens_per_step": statistics.mean(computed),
        "pad_fraction": 1 - sum(tokens) / sum(padded),
        "rss_mb": result["rss_steps"][-1],
    }


# ------------------------------------------------------------------------------------------------ sections
def step_base(cfg: StepConfig, policy: Path, work: Path) -> dict[str, Any]:
    """The spec every DPO-step child of `cfg` shares; writes its rows (steps × batch pairs) under work/data."""
    rows = paired_rows(cfg.steps * cfg.batch_size, cfg.model, response_sentences=cfg.response_sentences)
    data = write_rows(rows, work / "data" / f"{cfg.name}.jsonl")
    return {
        "model": cfg.model,
        "policy": str(policy),
        "data": str(data),
        "n_rows": cfg.steps * cfg.batch_size,
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "lr": cfg.lr,
        "beta": cfg.beta,
        "lora": cfg.lora,
        "cache_dir": str(work / "refcache"),
    }


def bench_steps(
    cfg: StepConfig, plan: Plan, run: Runner, model_dirs: dict[str, Path], warmed: set[str]
) -> dict[str, Any]:
    work = run.work
    base = step_base(cfg, model_dirs[cfg.model], work)
    out: dict[str, Any] = {"config": cfg.__dict__ | {"steps": cfg.steps}, "runs": {}}
    if not cfg.lora:  # parity also warms sacpo's reference cache for the timed runs
        from benchmarks.common import perturbed_reference

        ref = perturbed_reference(cfg.model, work)
        out["parity"] = run(
            "dpo_step", {**base, "mode": "parity", "reference": str(ref)}, f"{cfg.name}: parity"
        )
    elif (
        cfg.model not in warmed
    ):  # warm the cache with one untimed sacpo run (same rows as the full-FT config)
        run("dpo_step", {**base, "side": "sacpo", "ref": "cached", "tag": "warm"}, f"{cfg.name}: warm cache")
    warmed.add(cfg.model)
    reps = cfg.reps or plan.reps
    for rep in range(reps):
        variants = cfg.variants if plan.informational(cfg.model, rep) else HEADLINE
        variants = variants if rep % 2 == 0 else variants[::-1]
        for side, ref in variants:
            key = f"{side}/{ref}"
            res = run(
                "dpo_step",
                {**base, "side": side, "ref": ref, "tag": f"{cfg.name}-{rep}"},
                f"{cfg.name}: rep {rep + 1}/{reps} {key}",
            )
            out["runs"].setdefault(key, []).append(res)
    return out


def sweep_spec(model: str, plan: Plan, work: Path, model_dirs: dict[str, Path]) -> dict[str, Any]:
    """The spec every λ-sweep child of `model` shares (writes its helpful / safety rows under work/data)."""
    work = work
    n = plan.sweep_rows[model]
    spec = {
        "model": model,
        "policy": str(model_dirs[model]),
        "helpful_data": str(
            write_rows(paired_rows(n, model, seed=0), work / "data" / f"sweep-{model}-helpful.jsonl")
        ),
        "safe_data": str(
            write_rows(paired_rows(n, model, seed=1), work / "data" / f"sweep-{model}-safe.jsonl")
        ),
        "n_rows": n,
        "batch_size": plan.sweep_batch[model],
        "max_length": 256,
        "max_prompt_length": 128,
        "lr": 5e-6,
        "beta": 0.1,
        "lams": plan.lams,
    }
    return spec


def bench_sweep_spec(
    model: str, plan: Plan, run: Runner, model_dirs: dict[str, Path]
) -> dict[str, Any] | None:
    """sweep_spec with the step-1 model prepared (None when its preparation failed)."""
    spec = sweep_spec(model, plan, run.work, model_dirs)
    prep = run("sweep", {**spec, "mode": "prepare"}, f"sweep {model}: step 1 (helpful)")
    return None if "error" in prep else {**spec, "helpful_model": prep["helpful_model"]}


def bench_sweep(model: str, plan: Plan, run: Runner, model_dirs: dict[str, Path]) -> dict[str, Any]:
    spec = sweep_spec(model, plan, run.work, model_dirs)
    prep = run("sweep", {**spec, "mode": "prepare"}, f"sweep {model}: step 1 (helpful)")
    # trl+malloc: TRL with sacpo's glibc malloc thresholds (informational, like for like on the allocator)
    arms = {
        "sacpo": {"mode": "sacpo"},
        "trl": {"mode": "trl"},
        "trl+malloc": {"mode": "trl", "malloc_tuning": True},
    }
    out: dict[str, Any] = {"spec": spec, "prepare": prep, "runs": {arm: [] for arm in arms}}
    if "error" in prep:
        return out
    spec["helpful_model"] = prep["helpful_model"]
    reps = plan.sweep_reps[model]
    for rep in range(reps):
        names = list(arms) if plan.informational(model, rep) else ["sacpo", "trl"]
        for arm in names if rep % 2 == 0 else names[::-1]:
            res = run("sweep", {**spec, **arms[arm]}, f"sweep {model}: rep {rep + 1}/{reps} {arm}")
            out["runs"][arm].append(res)
    return out


def bench_generation(model: str, plan: Plan, run: Runner, model_dirs: dict[str, Path]) -> dict[str, Any]:
    spec = {
        "model": model,
        "policy": str(model_dirs[model]),
        "n_prompts": 16,
        "n": 8,
        "max_new_tokens": plan.max_new_tokens,
        "max_prompt_length": 128,
        "reps": plan.gen_reps[model],
        "min_seconds": 1.0,  # per timed sample: repeat the call until it has run this long
        "hf_reps": plan.info_reps.get(model, plan.gen_reps[model]),  # HF generate is informational
        "cd": model == "tiny",
        "cd_top_k": 8,
        "cd_K": 4,
        "cd_M": 8,
    }
    return run("generation", spec, f"generation {model}")


def bench_workflow(cfg: WorkflowConfig, run: Runner, model_dirs: dict[str, Path]) -> dict[str, Any]:
    """The whole workflow (workflow.py), sacpo and TRL alternating, after one parity child (full FT only)."""
    work = run.work
    data = work / "data"
    spec = {
        "model": cfg.model,
        "policy": str(model_dirs[cfg.model]),
        "helpful_data": str(
            write_rows(paired_rows(cfg.n_rows, cfg.model, seed=0), data / f"wf-{cfg.name}-h.jsonl")
        ),
        "safe_data": str(
            write_rows(paired_rows(cfg.n_rows, cfg.model, seed=1), data / f"wf-{cfg.name}-s.jsonl")
        ),
        "eval_data": str(
            write_rows(paired_rows(cfg.n_prompts, cfg.model, seed=2), data / f"wf-{cfg.name}-e.jsonl")
        ),
        "n_rows": cfg.n_rows,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "lr": cfg.lr,
        "beta": cfg.beta,
        "lams": [0.5, 1.0, 2.0],
        "qs": cfg.qs,
        "lora": cfg.lora,
        "eval": {
            "n_prompts": cfg.n_prompts,
            "n_samples": cfg.n_samples,
            "max_new_tokens": cfg.max_new_tokens,
            "batch": cfg.eval_batch,
            "n_boot": cfg.n_boot,
        },
        "tag": cfg.name,
    }
    out: dict[str, Any] = {"config": cfg.__dict__, "spec": spec, "runs": {"sacpo": [], "trl": []}}
    if not cfg.lora:  # LoRA starts at B = 0: its first-batch losses are the full-FT ones
        from benchmarks.common import perturbed_reference

        ref = perturbed_reference(cfg.model, work)
        out["parity"] = run(
            "workflow", {**spec, "mode": "parity", "reference": str(ref)}, f"workflow {cfg.name}: parity"
        )
    for rep in range(cfg.reps):
        for side in ("sacpo", "trl") if rep % 2 == 0 else ("trl", "sacpo"):
            res = run(
                "workflow", {**spec, "mode": side}, f"workflow {cfg.name}: rep {rep + 1}/{cfg.reps} {side}"
            )
            out["runs"][side].append(res)
    return out


def bench_scaling(
    plan: Plan, run: Runner, model_dirs: dict[str, Path], sweeps: list[dict[str, Any]]
) -> dict[str, Any]:
    """The max_length curve (DPO-step children, sacpo cached vs TRL live) and the sweep-size curve (sweep
    children; size 3 reuses section 2's runs of the same model when they were measured)."""
    out: dict[str, Any] = {"lengths": [], "sweeps": {}}
    warmed: set[str] = set()
    for cfg in plan.scale_lengths:
        if cfg.model in model_dirs:
            out["lengths"].append(bench_steps(cfg, plan, run, model_dirs, warmed))
            warmed.discard(cfg.model)  # each length has its own rows: its parity child warms its cache
    model = plan.scale_sweep_model
    if model not in model_dirs:
        return out
    done = next((r for r in sweeps if r["spec"]["model"] == model and "error" not in r["prepare"]), None)
    reps = plan.scale_sweep_reps
    base = None
    for size, lams in plan.scale_sweep_sizes.items():
        if done is not None and done["spec"]["lams"] == lams and len(done["runs"]["sacpo"]) >= reps:
            out["sweeps"][size] = {"sacpo": done["runs"]["sacpo"], "trl": done["runs"]["trl"], "reused": True}
            continue
        if base is None:
            base = bench_sweep_spec(model, plan, run, model_dirs)
            if base is None:
                return out
        runs = {"sacpo": [], "trl": []}
        for rep in range(reps):
            for arm in ("sacpo", "trl") if rep % 2 == 0 else ("trl", "sacpo"):
                res = run(
                    "sweep",
                    {**base, "lams": lams, "mode": arm},
                    f"sweep size {size} {model}: rep {rep + 1}/{reps} {arm}",
                )
                runs[arm].append(res)
        out["sweeps"][size] = runs
    return out


# -------------------------------------------------------------------------------------------------- report
def machine_info(threads: int) -> dict[str, str]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads": str(threads),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "peft": _version("peft"),
        "accelerate": _version("accelerate"),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("✓" if ok else "✗")


def report_steps(
    res: dict[str, Any], peak_flops: float | None, n_params: dict[str, int]
) -> tuple[list[str], dict]:
    cfg = res["config"]
    name, warmup = cfg["name"], cfg["warmup"]
    per = {k: [step_throughput(r, warmup) for r in rs] for k, rs in res["runs"].items()}
    errors = {k: r.get("error") for k, rs in res["runs"].items() for r in rs if "error" in r}
    lines = [f"### DPO step — {name}", ""]
    lines.append(
        f"{'LoRA r=8 (peft default targets)' if cfg['lora'] else 'full fine-tuning'}, batch {cfg['batch_size']} pairs "
        f"({2 * cfg['batch_size']} sequences), max_length {cfg['max_length']}, {cfg['timed']} timed steps after "
        f"{1 + cfg['warmup']} warm-up steps per run, fused AdamW lr {cfg['lr']:g}, β {cfg['beta']:g}, fp32."
    )
    any_ok = next((x for v in per.values() for x in v if x), None)
    if any_ok:
        lines.append(
            f"Real tokens per step {any_ok['tokens_per_step']:.0f} (padding {100 * any_ok['pad_fraction']:.0f}% of the "
            "padded batch); tokens/s counts real tokens."
        )
    shared = next((x for v in per.values() for x in v if x and x["shared_prompt_rows"]), None)
    if shared:
        lines[-1] += (
            f" sacpo ran shared-prompt rows (each pair's prompt once): T′ = {shared['model_tokens_per_step']:.0f} "
            "tokens per step through the model, which its MFU counts (P·T′)."
        )
    lines += ["", "| variant | tokens/s | s/step | peak RSS (MB) | MFU |", "|---|---|---|---|---|"]
    p = n_params.get(cfg["model"])
    mfu_rows = {}
    for key, vals in per.items():
        tps = summary([v["tokens_per_s"] for v in vals if v])
        rss = summary([v["rss_mb"] for v in vals if v])
        sps = summary([v["s_per_step"] for v in vals if v])
        mtps = summary([v["model_tokens_per_s"] for v in vals if v])
        mfu = "n/a"
        if mtps and p and peak_flops and not cfg["lora"]:
            factor = 8 if "/live" in key else 6
            mfu_val = factor * p * mtps[0] / peak_flops
            shared = any(v["shared_prompt_rows"] for v in vals if v)
            mfu = f"{100 * mfu_val:.1f}% ({factor}·P·T{'′' if shared else ''})"
            mfu_rows[key] = mfu_val
        err = f" (errors: {errors[key]})" if key in errors else ""
        lines.append(f"| {key}{err} | {fmt(tps, 0)} | {fmt(sps, 3)} | {fmt(rss, 0)} | {mfu} |")
    lines += ["", "| comparison | tokens/s ratio | peak RSS ratio | target | met |", "|---|---|---|---|---|"]
    verdicts = {}
    for num, den, what in COMPARISONS:
        a, b = "/".join(num), "/".join(den)
        if a not in per or b not in per:
            continue
        pairs = [(x, y) for x, y in zip(per[a], per[b], strict=False) if x and y]
        tr = summary([x["tokens_per_s"] / y["tokens_per_s"] for x, y in pairs])
        rr = summary([x["rss_mb"] / y["rss_mb"] for x, y in pairs])
        target, met = "", ""
        if num == ("sacpo", "cached") and den == ("trl", "live") and name in TARGETS:
            t_tps, t_rss = TARGETS[name]
            ok_tps = tr[0] >= t_tps if tr else None
            ok_rss = (rr[0] <= t_rss if rr else None) if t_rss is not None else None
            target = f"tokens/s ≥ {t_tps}×" + (f", RSS ≤ {t_rss}×" if t_rss is not None else "")
            met = mark(ok_tps) + (f" / {mark(ok_rss)}" if t_rss is not None else "")
            verdicts = {
                "tps": tr,
                "rss": rr,
                "ok_tps": ok_tps,
                "ok_rss": ok_rss,
                "t_tps": t_tps,
                "t_rss": t_rss,
            }
            verdicts["ok"] = ok_tps is not False and ok_rss is not False
        lines.append(f"| {a} ÷ {b} — {what} | {fmt(tr)} | {fmt(rr, 3)} | {target} | {met} |")
    par = res.get("parity")
    lines.append("")
    if par and "error" not in par:
        ok = par["abs_diff_live"] <= LOSS_TOL and par["abs_diff_precompute"] <= LOSS_TOL
        lines.append(
            f"**First-batch loss** (reference = perturbed copy of the policy, batch shape {par['first_batch_shape']}): "
            f"sacpo {par['sacpo_loss']:.6f}, "
            f"TRL live {par['trl_loss_live']:.6f}, TRL precompute "
            f"{par['trl_loss_precompute']:.6f}; |Δ| = {par['abs_diff_live']:.1e} / {par['abs_diff_precompute']:.1e} "
            f"(≤ {LOSS_TOL:g} {mark(ok)}); identical token ids and response masks: "
            f"{'yes' if par['identical_inputs'] else 'NO'}. With reference = policy (every timed run starts there) "
            f"sacpo's loss is {par['sacpo_loss_ref_is_policy']:.6f} (log 2 = 0.693147)."
        )
    elif par:
        lines.append(f"**First-batch loss**: parity child failed: {par['error']}")
    else:
        lines.append(
            "**First-batch loss**: LoRA starts from B = 0, so the policy equals the base model and the first-batch "
            "loss is the full-fine-tuning one (checked in the full-FT table)."
        )
    lines.append("")
    return lines, {"verdict": verdicts, "mfu": mfu_rows}


def report_sweep(res: dict[str, Any]) -> tuple[list[str], dict]:
    spec = res["spec"]
    lines = [f"### SACPO λ sweep — {spec['model']}", ""]
    lines.append(
        f"Step 2 for λ ∈ {spec['lams']} (β = {spec['beta']:g}/λ) from the same step-1 policy, {spec['n_rows']} safety "
        f"pairs, 1 epoch, batch {spec['batch_size']}, final model saved per λ; wall time from the first load to the "
        "last save (libraries already imported)."
    )
    if "error" in res["prepare"]:
        return [*lines, "", f"step-1 preparation failed: {res['prepare']['error']}", ""], {}
    s = [r.get("seconds") for r in res["runs"]["sacpo"]]
    t = [r.get("seconds") for r in res["runs"]["trl"]]
    ratio = summary([a / b for a, b in zip(s, t, strict=False) if a is not None and b is not None])
    ok = ratio[0] <= SWEEP_TARGET if ratio else None
    passes = next((r["reference_passes"] for r in res["runs"]["sacpo"] if "error" not in r), {})
    rss_s = summary([r.get("rss_peak_process_mb") for r in res["runs"]["sacpo"]])
    rss_t = summary([r.get("rss_peak_process_mb") for r in res["runs"]["trl"]])
    lines += [
        "",
        "| | wall time (s) | peak RSS (MB) | reference forward passes over the data |",
        "|---|---|---|---|",
        f"| sacpo `run_pipeline` | {fmt(summary(s), 1)} | {fmt(rss_s, 0)} | {passes.get('computed', '?')} "
        f"(cached reads: {passes.get('cached', '?')}) |",
        f"| TRL, one DPOTrainer per λ | {fmt(summary(t), 1)} | {fmt(rss_t, 0)} | a live reference forward in "
        f"every step of each of the {len(spec['lams'])} trainers |",
    ]
    tm = [r.get("seconds") for r in res["runs"].get("trl+malloc", [])]
    matched = any(x is not None for x in tm)  # the like-for-like allocator arm ran
    if matched:
        rss_m = summary([r.get("rss_peak_process_mb") for r in res["runs"]["trl+malloc"]])
        lines.append(
            f"| TRL, same, with sacpo's malloc thresholds | {fmt(summary(tm), 1)} | {fmt(rss_m, 0)} | as above |"
        )
    lines += ["", f"Ratio sacpo ÷ TRL wall time: {fmt(ratio)} (target ≤ {SWEEP_TARGET} {mark(ok)})."]
    if matched:
        like = summary([a / b for a, b in zip(s, tm, strict=False) if a is not None and b is not None])
        lines[-1] += (
            f" Like for like on the allocator, sacpo ÷ TRL with the same glibc malloc thresholds that the sacpo "
            f"commands set (`malloc_tuning`): {fmt(like)} (informational; the target compares each tool as shipped)."
        )
    per_s = [r["per_lambda_s"] for r in res["runs"]["sacpo"] if "per_lambda_s" in r]
    per_t = [r["per_lambda_s"] for r in res["runs"]["trl"] if "per_lambda_s" in r]
    if per_s and per_t:

        def col(rows: list[list[float]], i: int) -> str:
            return fmt(summary([row[i] for row in rows]), 1)

        lines.append(
            "Per λ (s): sacpo "
            + ", ".join(col(per_s, i) for i in range(len(per_s[0])))
            + " (`train()` time; the first includes the shared reference pass); TRL "
            + ", ".join(col(per_t, i) for i in range(len(per_t[0])))
            + "."
        )
    imp_s = summary([r.get("import_sacpo_s") for r in res["runs"]["sacpo"]])
    imp_t = summary([r.get("import_trl_s") for r in res["runs"]["trl"]])
    if imp_s and imp_t:
        lines.append(
            f"Not in the wall time: importing the package itself after torch/transformers/accelerate/peft: sacpo "
            f"{fmt(imp_s)} s, TRL {fmt(imp_t)} s."
        )
    errors = [r["error"] for side in res["runs"].values() for r in side if "error" in r]
    if errors:
        lines.append(f"Errors: {errors}")
    return [*lines, ""], {"ratio": ratio, "ok": ok}


def report_generation(res: dict[str, Any], model: str) -> tuple[list[str], dict]:
    lines = [f"### Best-of-n generation — {model}", ""]
    if "error" in res:
        return [*lines, f"failed: {res['error']}", ""], {}
    spec = res["spec"]
    calls = {k: summary([r.get("calls", 1) for r in v]) for k, v in res["bon"].items()}
    lines.append(
        f"{spec['n_prompts']} prompts, n = {spec['n']}, max_new_tokens {spec['max_new_tokens']}, "
        "`sacpo.models.generate.sample`; throughput = generated tokens / s. Each timed sample repeats an arm's "
        f"call until it has run ≥ {spec.get('min_seconds', 1.0):g} s (repetitions per sample: "
        + ", ".join(f"{k} {fmt(v, 0)}" for k, v in calls.items())
        + "); wall time is per call."
    )
    b, lp = res["bon"]["batched"], res["bon"]["loop"]
    tps = {k: summary([r["tokens"] / r["seconds"] for r in v]) for k, v in res["bon"].items()}
    wall = {k: summary([r["seconds"] / r.get("calls", 1) for r in v]) for k, v in res["bon"].items()}
    ratio = summary(
        [(x["tokens"] / x["seconds"]) / (y["tokens"] / y["seconds"]) for x, y in zip(b, lp, strict=True)]
    )
    ok = ratio[0] >= BON_TARGET if ratio else None
    lines += [
        "",
        "| arm | generate calls | wall per call (s) | tokens/s |",
        "|---|---|---|---|",
        f"| batched (one call, {spec['n_prompts']}×{spec['n']} sequences) | 1 | {fmt(wall['batched'])} | "
        f"{fmt(tps['batched'], 0)} |",
        f"| per-prompt loop | {spec['n_prompts']} | {fmt(wall['loop'])} | {fmt(tps['loop'], 0)} |",
    ]
    hf = res["bon"].get("hf_generate")
    hf_ratio = None
    if hf:
        hf_ratio = summary(
            [(x["tokens"] / x["seconds"]) / (y["tokens"] / y["seconds"]) for x, y in zip(b, hf, strict=False)]
        )
        lines.append(
            f"| reference: HF `generate(num_return_sequences={spec['n']})` on the same batch (prompts repeated "
            f"{spec['n']}× before the prefill; sacpo's sampler before it prefilled each prompt once) | 1 | "
            f"{fmt(wall['hf_generate'])} | {fmt(tps['hf_generate'], 0)} |"
        )
    lines += [
        "",
        f"Batched ÷ loop tokens/s: {fmt(ratio)} (target ≥ {BON_TARGET:g}× {mark(ok)})."
        + (f" Batched ÷ HF generate: {fmt(hf_ratio)}." if hf_ratio else ""),
        "",
    ]
    verdict = {"ratio": ratio, "ok": ok}
    cd = res.get("cd")
    if model == "tiny":
        lines += [f"### Controlled decoding cost — {model}", ""]
        if cd is None or "error" in cd:
            why = cd["error"] if cd else "not run"
            lines += [
                "| decoder | ms / generated token | ÷ plain sampling |",
                "|---|---|---|",
                "| token-wise CD, blockwise CD | TODO | not measured: controlled decoding module not available "
                f"({why}) |",
                "",
            ]
        else:
            st = cd["settings"]
            lines.append(
                f"One response per prompt ({spec['n_prompts']} prompts, max_new_tokens {spec['max_new_tokens']}); "
                f"token-wise top_k {st['top_k']}, β {st['beta']:g}; blockwise K {st['K']}, M {st['M']}; one untrained "
                "prefix scorer built from the same model (cost does not depend on its weights)."
            )
            lines += [
                "",
                "| decoder | ms / generated token | ÷ plain sampling (per rep) | forward tokens / generated token "
                "(base + scorer) |",
                "|---|---|---|---|",
            ]
            per_tok = {
                k: [r["seconds"] / max(r["tokens"], 1) for r in cd[k]] for k in ("plain", "token", "block")
            }
            for k, label in (
                ("plain", "plain sampling"),
                ("token", "token-wise CD"),
                ("block", "blockwise CD"),
            ):
                rel = summary([a / b for a, b in zip(per_tok[k], per_tok["plain"], strict=True)])
                fwd = "—"
                if k != "plain":
                    vals = [r["per_generated_token"].get("total_forward") for r in cd[k]]
                    fwd = fmt(summary([v for v in vals if v is not None]), 1)
                lines.append(f"| {label} | {fmt(summary(per_tok[k]), 3, scale=1e3)} | {fmt(rel)} | {fwd} |")
            lines.append("")
    return lines, verdict


def _med(rs: list[dict[str, Any]], key: str) -> tuple[float, float, float] | None:
    return summary([r.get(key) for r in rs if "error" not in r])


def report_workflow(res: dict[str, Any]) -> tuple[list[str], dict]:
    cfg, spec = res["config"], res["spec"]
    ev = spec["eval"]
    lines = [f"### Whole workflow — {cfg['name']}", ""]
    lines.append(
        f"{'LoRA r=8 (peft default targets)' if cfg['lora'] else 'full fine-tuning'}: step 1 on {cfg['n_rows']} "
        f"helpful pairs at β {cfg['beta']:g}, step 2 on {cfg['n_rows']} safety pairs for λ ∈ {spec['lams']} "
        f"(β/λ, reference = the step-1 policy), P-SACPO merges q ∈ {cfg['qs']} of step 1 and λ = "
        f"{max(spec['lams']):g}, then every model (SFT, step 1, 3 λ, 3 merges: 8) evaluated on the same "
        f"{ev['n_prompts']} prompts × {ev['n_samples']} samples (temperature 1, no top-k/top-p, ≤ "
        f"{ev['max_new_tokens']} new tokens, {ev['batch']} prompts per generation call) with the log-prob of every "
        f"sample under the model and under SFT. Batch {cfg['batch_size']}, 1 epoch per stage, max_length "
        f"{cfg['max_length']}, fused AdamW lr {cfg['lr']:g}, fp32; {cfg['reps']} repetition(s) per tool, "
        "alternating. Wall time from the start of step 1 to the last evaluation output (libraries imported before; "
        "benchmarks/workflow.py describes both sides)."
    )
    runs = res["runs"]
    errors = [r["error"] for side in runs.values() for r in side if "error" in r]
    ok_runs = {k: [r for r in v if "error" not in r] for k, v in runs.items()}
    lines += [
        "",
        "| tool | wall time (s) | peak RSS (MB) | peak RSS before the evaluation (MB) | step 1 (s) | step 2, 3 λ (s) | "
        "merges (s) | evaluation (s) | tokens generated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {
        "sacpo": "sacpo `run_pipeline` + `evaluate_models`",
        "trl": "TRL DPOTrainer per stage + peft/transformers merges + HF generate",
    }
    for side, rs in ok_runs.items():
        ph = [r["phases"] for r in rs]
        lines.append(
            f"| {labels[side]} | {fmt(_med(rs, 'seconds'), 1)} | {fmt(_med(rs, 'rss_peak_process_mb'), 0)} | "
            f"{fmt(_med(rs, 'rss_train_mb'), 0)} | {fmt(summary([p['step1'] for p in ph]), 1)} | "
            f"{fmt(summary([sum(p['step2']) for p in ph]), 1)} | "
            f"{fmt(summary([p['merge'] for p in ph]), 1)} | {fmt(summary([p['eval'] for p in ph]), 1)} | "
            f"{fmt(_med(rs, 'generated_tokens'), 0)} |"
        )
    pairs = [
        (a, b)
        for a, b in zip(runs["sacpo"], runs["trl"], strict=False)
        if "error" not in a and "error" not in b
    ]
    wall = summary([a["seconds"] / b["seconds"] for a, b in pairs])
    rss = summary([a["rss_peak_process_mb"] / b["rss_peak_process_mb"] for a, b in pairs])
    ok_wall = wall[0] <= WORKFLOW_TARGETS["wall"] if wall else None
    ok_rss = rss[0] <= WORKFLOW_TARGETS["rss"] if rss else None
    phase = {}
    for key in ("step1", "step2", "merge", "eval"):
        phase[key] = summary(
            [(sum(a["phases"][key]) if key == "step2" else a["phases"][key])
             / max(sum(b["phases"][key]) if key == "step2" else b["phases"][key], 1e-9) for a, b in pairs]
        )  # fmt: skip
    rss_train = summary([a["rss_train_mb"] / b["rss_train_mb"] for a, b in pairs])
    lines += [
        "",
        f"sacpo ÷ TRL: wall time {fmt(wall)} (target ≤ {WORKFLOW_TARGETS['wall']} {mark(ok_wall)}), peak RSS "
        f"{fmt(rss, 3)} (target ≤ {WORKFLOW_TARGETS['rss']} {mark(ok_rss)}); per phase: step 1 {fmt(phase['step1'])}, "
        f"step 2 {fmt(phase['step2'])}, merges {fmt(phase['merge'])}, evaluation {fmt(phase['eval'])}; peak RSS "
        f"before the evaluation (training and merges only) {fmt(rss_train, 3)}.",
    ]
    lines += time_split(pairs)
    s_runs = ok_runs.get("sacpo", [])
    if s_runs:
        r = s_runs[0]
        lines.append(
            f"sacpo wrote {', '.join(r['formats'])} models (LoRA: adapters, merged into an adapter on the shared "
            "base); "
            f"reference passes {r['reference_passes']['computed']} computed, {r['reference_passes']['cached']} read "
            "from its cache. TRL side: "
            + (
                "the step-1 adapter merged into its base (`merge_and_unload`) as step 2's policy and reference, a new "
                "adapter per λ; each merge = both models dense (step 2: its adapter applied and merged with peft), "
                "state dicts lerped, `save_pretrained` (a full model per q)."
                if cfg["lora"]
                else "a live reference copy in every DPOTrainer; each merge = both state dicts lerped, "
                "`save_pretrained`."
            )
        )
    par = res.get("parity")
    par_ok = None
    if par and "error" not in par:
        parts, oks = [], []
        for stage, p in par["stages"].items():
            diffs = [p[k] for k in ("abs_diff_live", "abs_diff_precompute") if k in p]
            ok = max(diffs) <= LOSS_TOL and p["identical_inputs"]
            oks.append(ok)
            trl = f"{p['trl_loss_live']:.6f} live" + (
                f" / {p['trl_loss_precompute']:.6f} precompute" if "trl_loss_precompute" in p else ""
            )
            parts.append(
                f"{stage} (β {p['beta']:g}): sacpo {p['sacpo_loss']:.6f}, TRL {trl}, |Δ| {max(diffs):.1e}, identical "
                f"inputs {'yes' if p['identical_inputs'] else 'NO'}"
            )
        par_ok = all(oks)
        lines.append(
            "**First-batch losses** (dpo_step parity on the workflow's rows, reference = perturbed copy of the "
            f"policy): {'; '.join(parts)} (≤ {LOSS_TOL:g} {mark(par_ok)})."
        )
    elif par:
        lines.append(f"**First-batch losses**: parity child failed: {par['error']}")
    else:
        lines.append(
            "**First-batch losses**: LoRA starts from B = 0, so they are the full-fine-tuning workflow's (checked "
            "there)."
        )
    if errors:
        lines.append(f"Errors: {errors}")
    return [*lines, ""], {"wall": wall, "rss": rss, "ok_wall": ok_wall, "ok_rss": ok_rss, "parity": par_ok}


def time_split(pairs: list[tuple[dict, dict]]) -> list[str]:
    """Where each tool's workflow time goes: its optimizer steps (n · median step time, workflow.step_seconds),
    sacpo's reference passes and evaluation, and the rest; and the floor those compute-bound parts set."""
    ok = [
        (a, b)
        for a, b in pairs
        if a.get("optimizer_steps", {}).get("total_s") and b.get("optimizer_steps", {}).get("total_s")
    ]
    if not ok:
        return []

    def med(f: Any) -> tuple[float, float, float] | None:
        return summary([f(a, b) for a, b in ok])

    def steps(r: dict) -> float:
        return r["optimizer_steps"]["total_s"]

    def ref(r: dict) -> float:
        return sum(r.get("ref_pass_s", []))

    a0, b0 = ok[0]
    rest = med(lambda a, b: a["seconds"] - steps(a) - ref(a) - a["phases"]["eval"])
    return [
        f"Where the time goes: sacpo's {a0['optimizer_steps']['n']} optimizer steps took "
        f"{fmt(med(lambda a, b: a['optimizer_steps']['median_s']))} s each ({fmt(med(lambda a, b: steps(a)), 1)} s), "
        f"TRL's {b0['optimizer_steps']['n']} {fmt(med(lambda a, b: b['optimizer_steps']['median_s']))} s each "
        f"({fmt(med(lambda a, b: steps(b)), 1)} s; TRL's include its live reference forward): "
        f"{fmt(med(lambda a, b: steps(a) / steps(b)))}× per step (n · median step time, a stage's first step left "
        f"out of the median). sacpo's {len(a0.get('ref_pass_s', []))} reference passes took "
        f"{fmt(med(lambda a, b: ref(a)), 1)} s, its evaluation {fmt(med(lambda a, b: a['phases']['eval']), 1)} s, "
        f"everything else {fmt(rest, 1)} s (loading, tokenizing, each stage's set-up and first step, saves with "
        f"fsync, merges). sacpo's steps, reference passes and evaluation alone are "
        f"{fmt(med(lambda a, b: (steps(a) + ref(a) + a['phases']['eval']) / b['seconds']))}× TRL's wall time, "
        f"its steps alone {fmt(med(lambda a, b: steps(a) / b['seconds']))}×: the floor of the wall-time ratio "
        "without a faster step.",
    ]


SCALING_PNGS = ("scaling_max_length.png", "scaling_sweep_size.png")


def _figure(
    panels: list[tuple[str, str, dict[str, list[tuple[float, tuple[float, float, float]]]]]],
    xlabel: str,
    path: Path,
) -> None:
    """One row of panels (title, y label, series name → [(x, (median, min, max))]) as a PNG, Figure + Agg (no
    pyplot); error bars: min and max over repetitions."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    for i, (title, ylabel, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, pts in series.items():
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = [m for _, (m, _, _) in pts]
            err = [[m - lo for _, (m, lo, _) in pts], [hi - m for _, (m, _, hi) in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        ticks = sorted({x for pts in series.values() for x, _ in pts})
        if ticks and ticks[-1] / max(ticks[0], 1) >= 4:  # max_length 256…1024: doublings evenly spaced
            ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110)


def report_scaling(res: dict[str, Any], figdir: Path) -> list[str]:
    lines = ["## 6. Scaling", ""]
    length_rows, series = [], {"tps": {"sacpo": [], "TRL": []}, "rss": {"sacpo": [], "TRL": []}}
    model = None
    for r in res.get("lengths", []):
        cfg = r["config"]
        model = cfg["model"]
        per = {k: [step_throughput(x, cfg["warmup"]) for x in rs] for k, rs in r["runs"].items()}
        s, t = per.get("sacpo/cached", []), per.get("trl/live", [])
        pairs = [(a, b) for a, b in zip(s, t, strict=False) if a and b]
        tok = next((x["tokens_per_step"] for x in s + t if x), None)
        vals = {
            "st": summary([a["tokens_per_s"] for a in s if a]),
            "tt": summary([b["tokens_per_s"] for b in t if b]),
            "sr": summary([a["rss_mb"] for a in s if a]),
            "tr": summary([b["rss_mb"] for b in t if b]),
        }
        ratio = summary([a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs])
        rss = summary([a["rss_mb"] / b["rss_mb"] for a, b in pairs])
        par = r.get("parity", {})
        pd = f"{par['abs_diff_live']:.1e}" if "abs_diff_live" in par else "n/a"
        length_rows.append(
            f"| {cfg['max_length']} | {tok:.0f} | {fmt(vals['st'], 0)} | {fmt(vals['tt'], 0)} | {fmt(ratio)} | "
            f"{fmt(vals['sr'], 0)} | {fmt(vals['tr'], 0)} | {fmt(rss, 3)} | {pd} |"
            if tok
            else f"| {cfg['max_length']} | failed | | | | | | | {pd} |"
        )
        for key, side, v in (
            ("tps", "sacpo", "st"),
            ("tps", "TRL", "tt"),
            ("rss", "sacpo", "sr"),
            ("rss", "TRL", "tr"),
        ):
            if vals[v]:
                series[key][side].append((cfg["max_length"], vals[v]))
    if length_rows:
        reps = res["lengths"][0]["config"].get("reps")
        c0 = res["lengths"][0]["config"]
        lines += [
            f"### DPO step vs max_length — {model}",
            "",
            f"sacpo/cached vs trl/live (the step section's defaults), full fine-tuning of {model} (the tiny GPT-2 with "
            f"1024 positions), batch {c0['batch_size']} pairs, {c0['timed']} timed steps after {1 + c0['warmup']} "
            f"warm-up, {reps} repetition(s); rows long enough to fill ~80% of each max_length (no truncation), so "
            "tokens per step grow with it. Figure: "
            f"[{SCALING_PNGS[0]}]({SCALING_PNGS[0]}).",
            "",
            "| max_length | real tokens / step | sacpo tokens/s | TRL tokens/s | sacpo ÷ TRL | sacpo peak RSS (MB) | "
            "TRL peak RSS (MB) | RSS ratio | first-batch |Δloss| |",
            "|---|---|---|---|---|---|---|---|---|",
            *length_rows,
            "",
            f"![DPO step vs max_length]({SCALING_PNGS[0]})",
            "",
        ]
        _figure(
            [
                (f"DPO step tokens/s — {model}", "real tokens / s", series["tps"]),
                (f"DPO step peak RSS — {model}", "MB", series["rss"]),
            ],
            "max_length",
            figdir / SCALING_PNGS[0],
        )
    sweeps = res.get("sweeps", {})
    if sweeps:
        rows, wall = [], {"sacpo": [], "TRL": []}
        for size, runs in sorted(sweeps.items(), key=lambda kv: int(kv[0])):
            s, t = runs["sacpo"], runs["trl"]
            pairs = [(a, b) for a, b in zip(s, t, strict=False) if "error" not in a and "error" not in b]
            ws, wt = _med(s, "seconds"), _med(t, "seconds")
            ratio = summary([a["seconds"] / b["seconds"] for a, b in pairs])
            label = f"{size} (section 2's runs)" if runs.get("reused") else str(size)
            rows.append(
                f"| {label} | {fmt(ws, 1)} | {fmt(wt, 1)} | {fmt(ratio)} | {fmt(_med(s, 'rss_peak_process_mb'), 0)} | "
                f"{fmt(_med(t, 'rss_peak_process_mb'), 0)} |"
            )
            if ws:
                wall["sacpo"].append((int(size), ws))
            if wt:
                wall["TRL"].append((int(size), wt))
        spec = res.get("sweep_spec", {})
        lines += [
            f"### λ sweep vs sweep size — {spec.get('model', '?')}",
            "",
            f"Step 2 as in section 2 ({spec.get('n_rows', '?')} safety pairs, batch {spec.get('batch_size', '?')}, 1 "
            "epoch per λ, a saved model per λ) for 1, 3 and 6 values of λ: sacpo `run_pipeline` (one reference pass "
            "shared by the branches) vs one DPOTrainer per λ. Figure: "
            f"[{SCALING_PNGS[1]}]({SCALING_PNGS[1]}).",
            "",
            "| λ values | sacpo wall (s) | TRL wall (s) | sacpo ÷ TRL | sacpo peak RSS (MB) | TRL peak RSS (MB) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"![λ sweep wall time vs sweep size]({SCALING_PNGS[1]})",
            "",
        ]
        _figure(
            [(f"λ sweep wall time — {spec.get('model', '?')}", "seconds", wall)],
            "λ values in the sweep",
            figdir / SCALING_PNGS[1],
        )
    return lines if len(lines) > 2 else []


def report_profiles(profiles: dict[str, Any]) -> list[str]:
    if not profiles:
        return []
    lines = ["## Where the time goes (torch profiler, missed targets)", ""]
    for name, prof in profiles.items():
        lines += [f"### {name}", ""]
        if "error" in prof:
            lines += [f"profiler child failed: {prof['error']}", ""]
            continue
        for side, data in prof["sides"].items():
            if "error" in data:
                lines += [f"{side}: failed: {data['error']}", ""]
                continue
            lines.append(
                f"**{side}** — {data['steps']} profiled steps, {data['seconds_per_step']:.3f} s/step; self CPU time "
                "by category (share of profiled op time):"
            )
            lines += ["", "| category | ms/step | share |", "|---|---|---|"]
            for cat, ms in data["categories"]:
                lines.append(f"| {cat} | {ms:.1f} | {100 * ms / max(data['total_ms'], 1e-9):.0f}% |")
            lines += ["", "| top ops (self CPU) | ms/step | calls/step |", "|---|---|---|"]
            for op, ms, calls in data["top_ops"]:
                lines.append(f"| `{op}` | {ms:.1f} | {calls:.0f} |")
            lines.append("")
    return lines


def write_report(results: dict[str, Any], path: Path) -> dict[str, Any]:
    info = results["machine"]
    hw = results.get("hardware", {})
    peak = hw.get("peak_flops")
    lines = [
        "# Benchmarks: sacpo vs TRL",
        "",
        f"Generated by `python -m benchmarks.run{' --quick' if results['quick'] else ''}` on "
        f"{results['date']} in {results['seconds'] / 60:.1f} min.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['threads']} threads in every "
        f"child), Python {info['python']}, transformers {info['transformers']}, TRL {info['trl']}, peft "
        f"{info['peft']}, accelerate {info['accelerate']}. Load average at the start: {info['load_average']}.",
        "",
        "Numbers are median [min, max] over repetitions; ratios are taken within each repetition, then summarised. "
        "Each configuration runs in its own child process (peak RSS = VmHWM, the high-water mark of that child's own "
        "memory, at the end of its last "
        "training step, before any final save; it includes the interpreter and imported libraries).",
        *(
            [
                "The informational arms (like-for-like variants, TRL with sacpo's malloc thresholds, HF "
                "`generate`) run in fewer repetitions on "
                + ", ".join(f"{m} ({n})" for m, n in results["info_reps"].items())
                + " to keep the bench within its 30-minute budget; the arms a target is stated on run in every "
                "repetition, and a ratio pairs runs of the same repetition.",
            ]
            if results.get("info_reps")
            else []
        ),
        "",
        "## Summary",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    summary_rows = []
    body: list[str] = ["## 1. DPO training step", ""]
    n_params = results.get("n_params", {})
    mfu_lines = []
    for res in results.get("steps", []):
        sec, extra = report_steps(res, peak, n_params)
        body += sec
        v = extra["verdict"]
        if v:
            name = res["config"]["name"]
            summary_rows.append(
                f"| DPO step {name}: sacpo ÷ TRL tokens/s ≥ {v['t_tps']}× | {fmt(v['tps'])} | {mark(v['ok_tps'])} |"
            )
            if v["t_rss"] is not None:
                summary_rows.append(
                    f"| DPO step {name}: sacpo ÷ TRL peak RSS ≤ {v['t_rss']}× | {fmt(v['rss'], 3)} | "
                    f"{mark(v['ok_rss'])} |"
                )
        for key, val in extra["mfu"].items():
            mfu_lines.append(f"{res['config']['name']} {key}: {100 * val:.2f}%")
    body += ["## 2. SACPO λ sweep", ""]
    for res in results.get("sweeps", []):
        sec, v = report_sweep(res)
        body += sec
        if v:
            summary_rows.append(
                f"| λ sweep of 3 ({res['spec']['model']}): sacpo ÷ TRL wall time ≤ {SWEEP_TARGET} | "
                f"{fmt(v['ratio'])} | {mark(v['ok'])} |"
            )
    body += ["## 3. Generation", ""]
    for model, res in results.get("generation", {}).items():
        sec, v = report_generation(res, model)
        body += sec
        if v:
            summary_rows.append(
                f"| best-of-n ({model}): batched ÷ loop ≥ {BON_TARGET:g}× | {fmt(v['ratio'])} | {mark(v['ok'])} |"
            )
    body += ["## 4. Hardware limit and MFU", ""]
    if hw and "error" not in hw:
        body += ["| matmul n×n (fp32) | GFLOP/s (best) |", "|---|---|"]
        body += [f"| {n} | {f / 1e9:.1f} |" for n, f in hw["matmul_flops"].items()]
        body += [
            "",
            f"Peak measured: {peak / 1e9:.1f} GFLOP/s with {hw['threads']} threads. MFU of the DPO step = "
            "FLOPs/step ÷ step time ÷ peak, FLOPs/step ≈ 6·P·T for the policy (+ 2·P·T for a live reference; the "
            "cached reference adds none), T = real tokens run through the model (T′ for shared-prompt rows: each "
            "pair's prompt once), P = parameters: "
            + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in n_params.items())
            + ".",
            "",
            "MFU: " + ("; ".join(mfu_lines) if mfu_lines else "n/a") + ".",
            "",
        ]
    else:
        body += [f"matmul benchmark failed: {hw.get('error', 'not run')}", ""]
    if results.get("workflows"):
        body += ["## 5. The whole SACPO workflow", ""]
    for res in results.get("workflows", []):
        sec, v = report_workflow(res)
        body += sec
        name = res["config"]["name"]
        summary_rows.append(
            f"| workflow {name}: sacpo ÷ TRL wall time ≤ {WORKFLOW_TARGETS['wall']} | {fmt(v['wall'])} | "
            f"{mark(v['ok_wall'])} |"
        )
        summary_rows.append(
            f"| workflow {name}: sacpo ÷ TRL peak RSS ≤ {WORKFLOW_TARGETS['rss']} | {fmt(v['rss'], 3)} | "
            f"{mark(v['ok_rss'])} |"
        )
        if v["parity"] is not None:
            summary_rows.append(
                f"| workflow {name}: equal first-batch losses (step 1 and step 2, ≤ {LOSS_TOL:g}) | "
                f"{'equal' if v['parity'] else 'differ'} | {mark(v['parity'])} |"
            )
    if results.get("scaling"):
        body += report_scaling(results["scaling"], path.parent)
    body += report_profiles(results.get("profiles", {}))
    if ANALYSIS.is_file():
        body += ["", ANALYSIS.read_text().strip(), ""]
    if results.get("notes"):
        body += ["## Notes", "", *results["notes"], ""]
    lines += [*summary_rows, "", *body]
    path.write_text("\n".join(lines).rstrip() + "\n")
    return {"summary": summary_rows}


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with every section/configuration that `new` measured replaced by the new measurement."""
    out = {**old, "machine": new["machine"], "date": new["date"]}
    out["seconds"] = old.get("seconds", 0) + new["seconds"]
    for key in ("hardware", "n_params"):
        if key in new:
            out[key] = {**old.get(key, {}), **new[key]} if key == "n_params" else new[key]
    for key, name in (("steps", lambda r: r["config"]["name"]), ("sweeps", lambda r: r["spec"]["model"])):
        if key in new:
            redone = {name(r): r for r in new[key]}
            kept = [redone.pop(name(r), r) for r in old.get(key, [])]  # in place, same order
            out[key] = kept + list(redone.values())
    for key in ("workflows",):
        if key in new:
            redone = {r["config"]["name"]: r for r in new[key]}
            kept = [redone.pop(r["config"]["name"], r) for r in old.get(key, [])]
            out[key] = kept + list(redone.values())
    for key in ("generation", "profiles", "scaling"):
        if key in new:
            out[key] = {**old.get(key, {}), **new[key]}
    out["notes"] = old.get("notes", []) + [n for n in new.get("notes", []) if n not in old.get("notes", [])]
    out["notes"].append(
        f"- merged a rerun ({new['date']}) of: {', '.join(k for k in new if k in SECTION_KEYS)}"
    )
    return out


SECTION_KEYS = ("hardware", "steps", "sweeps", "generation", "profiles", "workflows", "scaling")


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny GPT-2 only, 1 repetition (< 3 min)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default: 1 quick, 3 full)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every child")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch directory (models, data, runs)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="markdown report")
    ap.add_argument(
        "--only",
        default="hw,step,sweep,gen,wf,scale",
        help="comma-separated sections: hw, step, sweep, gen, wf (workflow), scale (default all)",
    )
    ap.add_argument(
        "--models", default=None, help="restrict to these models (comma-separated: tiny, smollm2)"
    )
    ap.add_argument(
        "--profile", choices=("auto", "always", "never"), default="auto", help="torch profiler runs"
    )
    ap.add_argument("--verbose", action="store_true", help="show the children's output")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections of <work>/results.json that this run does not redo (rerun a noisy section)",
    )
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite the report from <work>/results.json, run nothing"
    )
    args = ap.parse_args(argv)
    if args.report_only:
        results = json.loads((args.work / "results.json").read_text())
        for row in write_report(results, args.out)["summary"]:
            print(row)
        return 0

    started = time.time()
    plan = make_plan(args.quick, args.reps)
    sections = set(args.only.split(","))
    models = set(args.models.split(",")) if args.models else None
    if models:
        plan.step_configs = [c for c in plan.step_configs if c.model in models]
        plan.sweep_models = [m for m in plan.sweep_models if m in models]
        plan.gen_models = [m for m in plan.gen_models if m in models]
        plan.workflows = [c for c in plan.workflows if c.model in models]
        # tiny1k (the max_length curve) is the tiny GPT-2 with 1024 positions: --models tiny keeps it
        plan.scale_lengths = [c for c in plan.scale_lengths if c.model.removesuffix("1k") in models]
        if plan.scale_sweep_model not in models:
            plan.scale_sweep_sizes = {}
    args.work.mkdir(parents=True, exist_ok=True)
    run = Runner(args.work.resolve(), args.threads, args.verbose)
    results: dict[str, Any] = {
        "quick": args.quick,
        "info_reps": plan.info_reps,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(args.threads),
        "notes": [],
    }

    # models (SmolLM2 converted once, timed)
    from benchmarks.common import model_dir

    needed = {c.model for c in plan.step_configs} | set(plan.sweep_models) | set(plan.gen_models)
    if "wf" in sections:
        needed |= {c.model for c in plan.workflows}
    if "scale" in sections:
        needed |= {c.model for c in plan.scale_lengths} | (
            {plan.scale_sweep_model} if plan.scale_sweep_sizes else set()
        )
    model_dirs: dict[str, Path] = {}
    for m in sorted(needed):
        t0 = time.time()
        try:
            model_dirs[m] = model_dir(m, run.work)
        except Exception as e:  # SmolLM2 package missing: skip its sections, say so
            results["notes"].append(f"- {m}: skipped ({type(e).__name__}: {e})")
            print(f"skipping {m}: {e}")
            continue
        results["notes"].append(f"- {m}: model ready in {time.time() - t0:.1f} s ({model_dirs[m]})")
    plan.step_configs = [c for c in plan.step_configs if c.model in model_dirs]
    plan.sweep_models = [m for m in plan.sweep_models if m in model_dirs]
    plan.gen_models = [m for m in plan.gen_models if m in model_dirs]

    if "hw" in sections:
        results["hardware"] = run(
            "hardware", {"sizes": plan.hw_sizes, "repeats": plan.hw_repeats}, "matmul FLOP/s"
        )
    if "step" in sections:
        warmed: set[str] = set()  # models whose reference cache the parity child has filled
        results["steps"] = [bench_steps(c, plan, run, model_dirs, warmed) for c in plan.step_configs]
        results["n_params"] = {
            r["config"]["model"]: r["parity"]["n_params"]
            for r in results["steps"]
            if "n_params" in r.get("parity", {})
        }
    if "sweep" in sections:
        results["sweeps"] = [bench_sweep(m, plan, run, model_dirs) for m in plan.sweep_models]
    if "gen" in sections:
        results["generation"] = {m: bench_generation(m, plan, run, model_dirs) for m in plan.gen_models}
    if "wf" in sections:
        results["workflows"] = [
            bench_workflow(c, run, model_dirs) for c in plan.workflows if c.model in model_dirs
        ]
    if "scale" in sections:
        results["scaling"] = bench_scaling(plan, run, model_dirs, results.get("sweeps", []))
        if plan.scale_sweep_model in model_dirs:
            results["scaling"]["sweep_spec"] = sweep_spec(plan.scale_sweep_model, plan, run.work, model_dirs)

    # profile the DPO step where a target was missed
    if "step" in sections and args.profile != "never":
        results["profiles"] = {}
        peak = results.get("hardware", {}).get("peak_flops")
        for res in results["steps"]:
            _, extra = report_steps(res, peak, results.get("n_params", {}))
            missed = extra["verdict"].get("ok") is False
            if args.profile == "always" or missed:
                cfg = res["config"]
                spec = {**res["runs"]["sacpo/cached"][0].get("spec", {})}
                if not spec:
                    continue
                spec.update(steps=cfg["steps"], profile_warmup=1 + cfg["warmup"])
                results["profiles"][cfg["name"]] = run("profiling", spec, f"{cfg['name']}: torch profiler")

    results["seconds"] = time.time() - started
    if args.merge and (args.work / "results.json").is_file():
        results = merge_results(json.loads((args.work / "results.json").read_text()), results)
    (args.work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    written = write_report(results, args.out)
    print(f"\nwrote {args.out} ({results['seconds'] / 60:.1f} min)")
    for row in written["summary"]:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
