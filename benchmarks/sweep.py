"""SACPO step 2 over a λ sweep: sacpo's `run_pipeline` (one shared reference pass) vs one TRL DPOTrainer per λ.

Both start from the same step-1 (helpful) policy, built once by `mode: prepare` with sacpo's pipeline, and train
β/λ for each λ on the same safety pairs, same epochs, batch size, max_length, AdamW settings and fp32; each saves
its final model (sacpo always does; the TRL side calls `save_model`, as the SACPO authors' scripts do). Wall time
runs from the start of the sweep (libraries already imported) to the last saved model and includes everything
each tool does on the way: loading, tokenization, reference log-probs, training, saving.

sacpo: `run_pipeline` with stages [helpful β, safe λ=[...]]; the finished helpful stage is skipped, the three safe
branches share one reference pass through the cache and one built policy (`reuse_policy`, the default: the first
branch builds it and runs the reference pass with it, the next ones restore the parent's weights in place).
TRL: for each λ, a fresh `DPOTrainer` with the helpful model as policy and (its default) a live reference copy
loaded from the same directory. With `malloc_tuning: true` the TRL child first applies sacpo's glibc malloc
thresholds (`sacpo.train.allocator.tune_malloc`, what sacpo's `train()` does on CPU): a like-for-like allocator
arm, so the report can show how much of the gap is that process setting.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import TRL_ARGS, child_main, match_sacpo_allocator, paired_rows, trl_dataset


def preload(side: str) -> dict[str, float]:
    """Import the libraries both sides use before any clock starts (TRL imports them at `import trl`, sacpo
    lazily inside `train()`), then the side's own package; returns the seconds of each step."""
    started = time.perf_counter()
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from accelerate import Accelerator  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    shared = time.perf_counter() - started
    started = time.perf_counter()
    if side == "trl":
        import trl  # noqa: F401
    else:
        import sacpo.recipes.pipeline  # noqa: F401
    return {"import_shared_s": shared, f"import_{side}_s": time.perf_counter() - started}


def _pipeline_config(spec: dict[str, Any], stages: int, output_dir: str | Path | None = None, merges=()):
    """sacpo's pipeline of the benchmark: stage `helpful` (β) then `safe` (the λ sweep), the first `stages` of
    them; spec `lora` trains LoRA adapters (dpo_step.LORA); `merges` (MergeSpec) run after training
    (benchmarks/workflow.py)."""
    from sacpo.recipes.pipeline import PipelineConfig, StageConfig
    from sacpo.train.config import DataConfig

    defaults = {
        "batch_size": spec["batch_size"],
        "epochs": 1.0,
        "lr": spec["lr"],
        "weight_decay": 0.0,
        "warmup_ratio": 0.0,
        "scheduler": "constant",
        "max_grad_norm": 1.0,
        "max_length": spec["max_length"],
        "max_prompt_length": spec["max_prompt_length"],
        "mixed_precision": "no",
        "kl_prompts": 0,
        "eval_fraction": 0.0,
        "log_every": 10,
    }
    if spec.get("lora"):
        from benchmarks.dpo_step import LORA

        defaults["lora"] = {
            "enabled": True,
            "r": LORA["r"],
            "alpha": LORA["alpha"],
            "dropout": LORA["dropout"],
        }
    all_stages = [
        StageConfig(
            name="helpful",
            data=DataConfig(source=spec["helpful_data"], format="trl_paired"),
            beta=spec["beta"],
        ),
        StageConfig(
            name="safe", data=DataConfig(source=spec["safe_data"], format="trl_paired"), lam=spec["lams"]
        ),
    ]
    return PipelineConfig(
        policy=spec["policy"],
        output_dir=str(output_dir or Path(spec["work"]) / "sweep" / spec["model"] / "sacpo"),
        stages=all_stages[:stages],
        defaults=defaults,
        merges=list(merges),
    )


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Train step 1 (helpful) once; both sides start step 2 from its model."""
    from sacpo.recipes.pipeline import run_pipeline

    started = time.perf_counter()
    result = run_pipeline(_pipeline_config(spec, stages=1), show_progress=False)
    return {"helpful_model": result["stages"][0]["model"], "seconds": time.perf_counter() - started}


def run_sacpo(spec: dict[str, Any]) -> dict[str, Any]:
    from sacpo.recipes.pipeline import run_pipeline

    cfg = _pipeline_config(spec, stages=2)
    out = Path(cfg.output_dir)
    for d in (out / "stages").glob("safe*"):  # a previous repetition's step-2 branches
        shutil.rmtree(d)
    shutil.rmtree(
        out / ".ref_cache", ignore_errors=True
    )  # step 1 is skipped as finished; its cache is not needed
    started = time.perf_counter()
    result = run_pipeline(cfg, show_progress=False)
    seconds = time.perf_counter() - started
    trained = [s for s in result["stages"] if s["stage"] == "safe"]
    return {
        "seconds": seconds,
        "branches": [s["name"] for s in trained],
        "reference_passes": result["reference_passes"],
        "steps": [s["summary"]["steps"] for s in trained],
        "per_lambda_s": [s["summary"]["seconds"] for s in trained],  # train() wall time, the first one
        # includes the shared reference pass
    }


def trl_stage(
    spec: dict[str, Any],
    policy: str | Path,
    rows: list[dict[str, str]],
    beta: float,
    out: Path,
    peft_config=None,
):
    """One SACPO stage with TRL: a fresh `DPOTrainer` on `policy` (its default reference: a live copy loaded from
    the same directory, or with `peft_config` the adapter-disabled policy), 1 epoch, then `save_model` to
    out/model; returns the trainer (its model still in memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32, use_safetensors=True)
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=spec["batch_size"],
        num_train_epochs=1,
        learning_rate=spec["lr"],
        beta=beta,
        max_length=spec["max_length"],
        logging_steps=10,
        **TRL_ARGS,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=trl_dataset(rows, tokenizer),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(str(out / "model"))
    return trainer


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("malloc_tuning"):
        match_sacpo_allocator()
    policy = spec["helpful_model"]
    out = Path(spec["work"]) / "sweep" / spec["model"] / "trl"
    shutil.rmtree(out, ignore_errors=True)
    rows = paired_rows(spec["n_rows"], spec["model"], seed=1)
    started = time.perf_counter()
    steps, per_lambda = [], []
    for lam in spec["lams"]:
        lam_started = time.perf_counter()
        trainer = trl_stage(spec, policy, rows, spec["beta"] / lam, out / f"lam{lam:g}")
        steps.append(trainer.state.global_step)
        del trainer
        per_lambda.append(time.perf_counter() - lam_started)
    return {
        "seconds": time.perf_counter() - started,
        "steps": steps,
        "per_lambda_s": per_lambda,
        "reference_passes": {"live": len(spec["lams"])},
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    mode = spec["mode"]
    if mode == "prepare":
        return prepare(spec)
    imports = preload(mode)
    result = run_sacpo(spec) if mode == "sacpo" else run_trl(spec)
    return {**result, **imports}


if __name__ == "__main__":
    child_main(run)
