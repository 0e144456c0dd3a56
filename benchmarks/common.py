"""Shared pieces of the benchmarks: threads, models, the synthetic preference data, the child-process protocol.

Every measurement runs in a child process (`python -m benchmarks.<script> --spec JSON`) that writes one JSON
result; the driver (`benchmarks.run`) alternates sacpo and TRL children, aggregates and writes RESULTS.md.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK = ROOT / "runs" / "bench"

# TRL DPOConfig settings both TRL benchmarks share: sacpo's optimizer and schedule (fused AdamW, constant lr, no
# warmup or weight decay, clip 1.0), sigmoid DPO loss, fp32 on the CPU, no checkpoints, eval or progress bars
TRL_ARGS: dict[str, Any] = {
    "weight_decay": 0.0,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "max_grad_norm": 1.0,
    "optim": "adamw_torch_fused",
    "loss_type": ["sigmoid"],
    "use_cpu": True,
    "bf16": False,
    "fp16": False,
    "gradient_checkpointing": False,
    "dataloader_num_workers": 0,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 0,
}

# ------------------------------------------------------------------------------------------------- threads


def set_threads(n: int) -> None:
    """Same intra-op threads in every child (the env vars are also set by the driver before the child starts)."""
    import torch

    torch.set_num_threads(n)


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["TQDM_DISABLE"] = "1"
    env["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def match_sacpo_allocator() -> None:
    """Apply in this (TRL) process the glibc malloc thresholds sacpo's commands set on CPU (`malloc_tuning`)
    (`sacpo.train.allocator.tune_malloc`): the like-for-like allocator arms of the step and sweep benchmarks."""
    from sacpo.train.allocator import tune_malloc

    if not tune_malloc():
        raise RuntimeError("the like-for-like allocator arm needs glibc (mallopt)")


def max_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own address space. Not ru_maxrss:
    Linux carries that across fork and exec, so a child of a parent that once held 1.5 GB (the runner converting
    SmolLM2 on a fresh machine) would report at least 1.5 GB whatever it did itself. Elsewhere ru_maxrss.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


# -------------------------------------------------------------------------------------------------- models


def tiny_model(work: Path, seed: int = 0, n_positions: int = 256) -> Path:
    """The tiny GPT-2 + byte tokenizer (`sacpo.models.tiny.build_tiny_gpt2`), built once per seed (and context
    length: `tiny1k`, the same model with 1024 positions, runs the max_length scaling curve)."""
    from sacpo.models.tiny import build_tiny_gpt2

    suffix = "" if n_positions == 256 else f"-p{n_positions}"
    target = work / "models" / f"tiny-gpt2-s{seed}{suffix}"
    if not (target / "model.safetensors").is_file():
        build_tiny_gpt2(target, seed=seed, n_positions=n_positions)
    return target


def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct as HF safetensors, converted once into sacpo's cache ($SACPO_CACHE or
    ~/.cache/sacpo) by `sacpo.worlds.smollm2.prepare_smollm2`."""
    from sacpo.worlds.smollm2 import prepare_smollm2

    return prepare_smollm2()


def model_dir(name: str, work: Path) -> Path:
    if name == "tiny":
        return tiny_model(work)
    if name == "tiny1k":
        return tiny_model(work, n_positions=1024)
    if name == "smollm2":
        return smollm2_model()
    raise ValueError(f"unknown benchmark model {name!r}; valid: tiny, tiny1k, smollm2")


def perturbed_reference(name: str, work: Path, scale: float = 0.02) -> Path:
    """A reference model that differs from the policy (so the first-batch DPO loss is not exactly log 2):
    tiny — another seed; smollm2 — every weight plus N(0, (scale·std)²) noise (seeded), saved once."""
    if name in ("tiny", "tiny1k"):
        return tiny_model(work, seed=1, n_positions=256 if name == "tiny" else 1024)
    target = work / "models" / f"{name}-perturbed"
    if (target / "model.safetensors").is_file():
        return target
    import shutil

    import torch

    from sacpo.models.load import load_model, load_tokenizer

    src = model_dir(name, work)
    model = load_model(src)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * (scale * float(p.float().std())))
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(src).save_pretrained(tmp)
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------------- data

TOPICS = [
    "bread",
    "bicycles",
    "tomatoes",
    "poetry",
    "python",
    "tea",
    "gardens",
    "budgets",
    "maps",
    "chess",
    "running",
    "painting",
]
VERBS = ["check", "measure", "clean", "prepare", "plan", "test", "repeat", "adjust", "compare", "record"]
NOUNS = [
    "the tools",
    "each step",
    "the result",
    "a sample",
    "the notes",
    "the schedule",
    "your work",
    "the parts",
]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(VERBS).capitalize()} {rng.choice(NOUNS)} and then {rng.choice(VERBS)} {rng.choice(NOUNS)}."


def _text(rng: random.Random, n_sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(n_sentences))


# sentences per prompt / response for each model: keeps sequences well under max_length (no truncation, so sacpo
# and TRL tokenize to identical ids) at roughly the lengths the tables report
LENGTHS = {"tiny": ((1, 1), (1, 2)), "tiny1k": ((1, 1), (1, 2)), "smollm2": ((1, 2), (4, 6))}
# tokens per sentence of `_sentence` (≈ 45 bytes; SmolLM2's BPE ≈ 10): sizes long rows for a max_length
TOKENS_PER_SENTENCE = {"tiny": 45, "tiny1k": 45, "smollm2": 10}


def long_response(model: str, max_length: int, fill: float = 0.8) -> tuple[int, int]:
    """Response sentences (lo, hi) such that prompt + the longer response fill about `fill` of max_length (no
    truncation on either side, so both tools still see identical ids): the rows of the max_length scaling curve."""
    hi = max(2, int(fill * max_length / TOKENS_PER_SENTENCE[model]) - 1)
    return max(1, hi - 2), hi


def paired_rows(
    n: int, model: str, seed: int = 0, response_sentences: tuple[int, int] | list[int] | None = None
) -> list[dict[str, str]]:
    """Deterministic TRL-style paired rows {prompt, chosen, rejected} (plain strings); response_sentences
    overrides the model's response length range (LENGTHS)."""
    rng = random.Random(seed)
    (p_lo, p_hi), (r_lo, r_hi) = LENGTHS[model]
    if response_sentences is not None:
        r_lo, r_hi = response_sentences
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt = f"Q{i}: how do I start with {topic}? " + _text(rng, rng.randint(p_lo, p_hi))
        chosen = f"A plan for {topic}: " + _text(rng, rng.randint(r_lo, r_hi))
        rejected = "Not sure. " + _text(rng, rng.randint(r_lo, r_hi))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows `write_rows` wrote (what the sacpo side of a child reads as its data)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trl_dataset(rows: list[dict[str, str]], tokenizer: Any):
    """The same rows for TRL, with the prompt rendered exactly as sacpo renders it (chat template with a
    generation prompt when the tokenizer has one, else prompt + newline), as plain strings: TRL then tokenizes
    prompt and prompt+response+EOS to the same ids sacpo builds (checked by the parity child)."""
    from datasets import Dataset

    from sacpo.data.tokenize import render_prompt

    return Dataset.from_list(
        [
            {
                "prompt": render_prompt(tokenizer, r["prompt"]),
                "chosen": r["chosen"],
                "rejected": r["rejected"],
            }
            for r in rows
        ]
    )


# ------------------------------------------------------------------------------------------ child protocol


def child_main(run: Any) -> None:
    """Entry of a child script: `--spec JSON --out PATH`; run(spec) returns a JSON-able dict, written to PATH."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="JSON object with the configuration")
    ap.add_argument("--out", required=True, help="result JSON path")
    args = ap.parse_args()
    spec = json.loads(args.spec)
    set_threads(int(spec.get("threads", os.cpu_count() or 1)))
    started = time.time()
    result = run(spec)
    result.setdefault("spec", spec)
    result["child_seconds"] = round(time.time() - started, 3)
    result["rss_peak_process_mb"] = round(max_rss_mb(), 1)
    Path(args.out).write_text(json.dumps(result, indent=1))


class StepClock:
    """Timestamps every optimizer step of any torch optimizer (a global post-step hook, so the same measurement
    applies to sacpo's loop and to TRL's Trainer) and the peak RSS reached by the end of each step. Where CUDA is
    in use the hook first waits for the device (`torch.cuda.synchronize`): kernels run asynchronously, and the
    step ends when its kernels have."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.rss: list[float] = []
        self.handle = None

    def __enter__(self) -> StepClock:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.rss.append(max_rss_mb())

        self.handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
