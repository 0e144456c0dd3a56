"""The one training loop: a preference loss (DPO / IPO / KTO) over `accelerate`.

`train(cfg)` runs one stage as a short sequence of named parts: seed (without touching the caller's RNG state),
start the run directory, encode the data (batches.py), compute or read the reference log-probs (ref_cache.py: no
reference model is held in memory while training), build the policy (policy.py), run the optimizer steps
(epochs.py: the loss of a micro-batch is step.py, held-out metrics heldout.py) and save the model and summary
(checkpoint.py). Whatever it changes on the policy it built (the fused SwiGLU forward) it undoes before returning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sacpo.config import ConfigError, to_dict, to_yaml
from sacpo.fsutil import atomic_write_text
from sacpo.models.dtypes import dtype_name, resolve_dtype
from sacpo.models.load import check_model_dir, load_tokenizer
from sacpo.models.logprobs import HeadPath, head_path
from sacpo.models.swiglu import fuse_swiglu
from sacpo.rng import seeded
from sacpo.train import checkpoint
from sacpo.train.allocator import tune_malloc
from sacpo.train.batches import Split, prepare_data, split_indices, subset
from sacpo.train.config import RUNTIME_ONLY_FIELDS, STORAGE_ONLY_FIELDS, TrainConfig, comparable
from sacpo.train.epochs import LoopEnd, StepLoop, run_steps
from sacpo.train.policy import build_policy, make_accelerator, make_optimizer, make_scheduler
from sacpo.train.ref_cache import RefLogps, reference_logps
from sacpo.train.sharding import check_deepspeed
from sacpo.train.step import BatchLoss, PackedPairsProbe
from sacpo.train.workspace import SweepWorkspace

log = logging.getLogger("sacpo.train")


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    model_dir: Path
    steps: int
    reference_pass: str  # "computed" or "cached"
    final_metrics: dict[str, float]
    shared_prompt_rows: bool = False  # paired batches ran as prompt + chosen + rejected rows (share_prompt)
    stopped_early: dict[str, float] | None = None  # {"step", "kl", "budget"} when kl_budget stopped the stage
    fused_head: bool = False  # the training step's log-probs used the fused LM head (models.logprobs)
    fused_head_reason: str = ""  # why it did or did not (e.g. the model is inside a DDP wrapper)


@dataclass(frozen=True)
class Inputs:
    """A stage's data and reference log-probs, split; the policy when the reference pass already built it."""

    train: Split
    held_out: Split
    kl_prompts: list[list[int]]
    ref: RefLogps
    model: Any | None


# Settings that do not change the training trajectory: they may differ when a run is resumed.
RESUME_FREE = frozenset(
    {"output_dir", "cache_dir", "save_every", "log_every", "kl_every", "kl_prompts", "kl_samples"}
    | {"kl_max_new_tokens", "logprob_chunk"}
    | RUNTIME_ONLY_FIELDS  # malloc_tuning: on for `sacpo train`, off from Python; either may resume the other
    | STORAGE_ONLY_FIELDS  # dtype: applied when model/ is saved, after the last step
)


def _run_identity(cfg: TrainConfig, ref_cache: Path) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the trajectory's settings and the reference cache (which is
    keyed on the reference weights, tokenizer, encoded data and max_length)."""
    fields = comparable({k: v for k, v in to_dict(cfg).items() if k not in RESUME_FREE})
    fields["lora"].pop("save", None)  # the output format, written after the last step
    return json.loads(json.dumps({**fields, "reference_cache": ref_cache.name}))


def train(
    cfg: TrainConfig,
    resume: bool = False,
    show_progress: bool = True,
    workspace: SweepWorkspace | None = None,
) -> TrainResult:
    """Run one alignment stage; write config.yaml, metrics.jsonl, model/ (HF safetensors), summary.json and DONE.

    workspace: keep the policy, its optimizer buffers and tokenizer for the next call on the same parent (the
    branches of a sweep; see workspace.py). Single process only, and not with resume; otherwise ignored.
    The global RNGs (python, numpy, torch) are seeded with cfg.seed inside and restored on return; glibc's malloc
    thresholds are set only with cfg.malloc_tuning (process-wide, see allocator.py).
    """
    check_model_dir(cfg.policy)  # before anything is written or loaded: a clear error for a bad path
    if cfg.reference:
        check_model_dir(cfg.reference)
    save_dtype = resolve_dtype(cfg.dtype, cfg.policy)  # auto: the policy checkpoint's own dtype
    acc = make_accelerator(cfg)
    check_deepspeed(acc, cfg.grad_accum, cfg.save_every)
    if cfg.batch_size % acc.num_processes:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by {acc.num_processes} processes")
    if workspace is not None and (resume or acc.num_processes > 1):
        workspace.clear()
        workspace = None
    with seeded(cfg.seed), contextlib.ExitStack() as undo:
        if cfg.malloc_tuning and acc.device.type == "cpu":
            tune_malloc()
        if not resume:  # a resumed run is checked against its checkpoint first
            _start_run(cfg, acc, keep_checkpoints=False)
        started = time.time()
        probe = workspace.probe if workspace is not None else PackedPairsProbe()
        tokenizer = (  # the workspace first releases another parent's policy, before this stage's reference pass
            workspace.tokenizer(cfg, load_tokenizer)
            if workspace is not None
            else load_tokenizer(cfg.policy, cfg.trust_remote_code)
        )
        inputs = _inputs(cfg, acc, tokenizer, workspace, probe, undo, show_progress)
        model = inputs.model if inputs.model is not None else _policy(cfg, workspace, undo)
        loop, raw_optimizer = _step_loop(cfg, acc, model, inputs, tokenizer, probe, workspace)
        restored = (
            checkpoint.restore(acc, loop.out, loop.run_identity) if resume else checkpoint.Restored(0, {})
        )
        if resume:
            _start_run(cfg, acc, keep_checkpoints=True)
        path = head_path(loop.model)
        _log_start(cfg, inputs, loop, path)
        end = run_steps(loop, restored, show_progress)
        undo.close()  # the fused SwiGLU forward comes off before the model is saved (and kept by a workspace)
        result = _finish(loop, inputs.ref, end, path, save_dtype, time.time() - started)
        if workspace is not None:
            workspace.keep(acc.unwrap_model(loop.model, keep_fp32_wrapper=False), raw_optimizer)
        return result


def _start_run(cfg: TrainConfig, acc: Any, keep_checkpoints: bool) -> None:
    """Clear a previous attempt's outputs (`checkpoint.begin_run`) and write the resolved config.yaml."""
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        checkpoint.begin_run(out, keep_checkpoints=keep_checkpoints)
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
    acc.wait_for_everyone()


def _policy(cfg: TrainConfig, workspace: SweepWorkspace | None, undo: contextlib.ExitStack) -> Any:
    """The starting policy (built, or restored by the workspace), its SwiGLU MLPs fused until `undo` closes."""
    model = workspace.policy(cfg, build=build_policy) if workspace is not None else build_policy(cfg)
    if cfg.fused_swiglu:
        undo.callback(fuse_swiglu(model).undo)
    return model


def _inputs(
    cfg: TrainConfig,
    acc: Any,
    tokenizer: Any,
    workspace: SweepWorkspace | None,
    probe: PackedPairsProbe,
    undo: contextlib.ExitStack,
    show_progress: bool,
) -> Inputs:
    """Encode the data, get the reference log-probs (the main process computes or reads the cache, then the
    others read it) and split train / held-out.

    The policy before its first update is the reference when none is given: built first, it also serves the
    reference pass (one model load, not two). A separate reference is loaded, used and freed before the policy is
    built, so the two are never in memory together."""
    pairs, desirable = prepare_data(cfg, tokenizer)
    out = Path(cfg.output_dir)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / ".ref_cache"
    model = _policy(cfg, workspace, undo) if cfg.reference in (None, cfg.policy) else None

    def ref_pass(progress: bool) -> RefLogps:
        return reference_logps(
            cfg.reference or cfg.policy,
            tokenizer,
            pairs,
            cache_dir,
            cfg.max_length,
            cfg.resolved_average_logprobs,
            chunk_size=cfg.logprob_chunk,
            device=acc.device,
            trust_remote_code=cfg.trust_remote_code,
            show_progress=progress,
            model=model,
            share_prompt=cfg.share_prompt,
            supports_packed=probe,
            prompt_format=cfg.prompt_format(),
        )

    if acc.is_main_process:
        ref = ref_pass(show_progress)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        ref = ref_pass(False)
    train_idx, eval_idx = split_indices(len(pairs), cfg.eval_fraction, cfg.seed)
    held_out = subset(pairs, ref.logps, desirable, eval_idx)
    kl_prompts = [list(p.input_ids[: p.prompt_len]) for p, _ in held_out.pairs[: cfg.kl_prompts]]
    if cfg.kl_budget is not None and not kl_prompts:
        raise ConfigError(
            f"kl_budget={cfg.kl_budget} needs held-out prompts for the KL estimate, but eval_fraction="
            f"{cfg.eval_fraction} holds out none of the {len(pairs)} examples; raise eval_fraction"
        )
    return Inputs(subset(pairs, ref.logps, desirable, train_idx), held_out, kl_prompts, ref, model)


def _schedule(cfg: TrainConfig, n_train: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch): max_steps, or epochs × the full steps one epoch holds."""
    batches_per_epoch = n_train // cfg.batch_size
    if batches_per_epoch < cfg.grad_accum:
        raise ConfigError(
            f"{n_train} training examples cannot fill one step of "
            f"batch_size×grad_accum = {cfg.batch_size * cfg.grad_accum}"
        )
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    return cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch)), steps_per_epoch


def _step_loop(
    cfg: TrainConfig,
    acc: Any,
    model: Any,
    inputs: Inputs,
    tokenizer: Any,
    probe: PackedPairsProbe,
    workspace: SweepWorkspace | None,
) -> tuple[StepLoop, Any]:
    """AdamW, the schedule and the steppers around the prepared model; returns (loop, the unprepared optimizer)."""
    total_steps, steps_per_epoch = _schedule(cfg, len(inputs.train.pairs))
    optimizer, _ = make_optimizer(cfg, model)
    if workspace is not None:
        workspace.reuse_moments(optimizer)
    raw_optimizer = optimizer
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    # after prepare: FSDP2 (fully_shard) replaces every Parameter by a DTensor one (accelerate re-points the
    # optimizer, not a list taken before), and clipping and the finiteness checks must see the live parameters
    params = [p for p in model.parameters() if p.requires_grad]
    acc.register_for_checkpointing(scheduler)
    model.train()
    pad_id = tokenizer.pad_token_id
    loop = StepLoop(
        cfg=cfg,
        acc=acc,
        out=Path(cfg.output_dir),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        stepper=BatchLoss(cfg, inputs.train, pad_id, acc, probe),
        eval_stepper=BatchLoss(cfg, inputs.held_out, pad_id, acc, probe),
        tokenizer=tokenizer,
        kl_prompts=inputs.kl_prompts,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        run_identity=_run_identity(cfg, inputs.ref.path),
    )
    return loop, raw_optimizer


def _log_start(cfg: TrainConfig, inputs: Inputs, loop: StepLoop, path: HeadPath) -> None:
    log.info(
        "training %s: %d pairs (%d held out), %d steps of %d examples, %s log-probs, reference pass %s",
        cfg.loss,
        len(inputs.train.pairs),
        len(inputs.held_out.pairs),
        loop.total_steps,
        cfg.batch_size * cfg.grad_accum,
        "length-averaged" if cfg.resolved_average_logprobs else "summed",
        "computed" if inputs.ref.computed else "cached",
    )
    log.info("log-probs: %s (%s)", "fused LM head" if path.fused else "full logits", path.reason)


def _finish(
    loop: StepLoop, ref: RefLogps, end: LoopEnd, path: HeadPath, dtype: torch.dtype, seconds: float
) -> TrainResult:
    """Check and save the final weights (model/, in `dtype`), then summary.json and DONE (main process)."""
    cfg, acc, out = loop.cfg, loop.acc, loop.out
    checkpoint.check_weights_finite(acc, loop.params, end.step, out)
    lora_save = cfg.lora.save if cfg.lora.enabled else None
    model_dir = checkpoint.save_final(
        acc, loop.model, loop.tokenizer, out, lora_save, cfg.policy, dtype, build=lambda: build_policy(cfg)
    )
    summary = {
        "steps": end.step,
        "reference_pass": "computed" if ref.computed else "cached",
        "reference_cache": str(ref.path),
        "seconds": round(seconds, 2),
        "num_processes": acc.num_processes,
        "shared_prompt_rows": loop.stepper.packed_batches > 0,
        # training batches run as prompt + chosen + rejected rows / as two padded rows per pair (row_cost's choice)
        "shared_prompt_batches": [loop.stepper.packed_batches, loop.stepper.padded_batches],
        "fused_head": path.fused,
        "fused_head_reason": path.reason,
        "average_logprobs": cfg.resolved_average_logprobs,
        "prompt_format": cfg.prompt_format().to_json(),
        "dtype": dtype_name(dtype),
        "model_format": "adapter" if lora_save == "adapter" else "dense",
        "stopped_early": end.stopped_early,
        "final": end.last,
    }
    if acc.is_main_process:
        checkpoint.finish(out, summary)
    acc.wait_for_everyone()
    return TrainResult(
        out,
        model_dir,
        end.step,
        summary["reference_pass"],
        end.last,
        summary["shared_prompt_rows"],
        end.stopped_early,
        path.fused,
        path.reason,
    )


def is_done(output_dir: str | Path) -> bool:
    """True when a stage finished: its DONE marker is intact, summary.json parses and model/ has weights."""
    return checkpoint.is_finished(Path(output_dir))
