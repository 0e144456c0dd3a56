"""The optimizer-step loop of a stage: micro-batches, gradient clipping and checks, logging, held-out evaluation,
the KL budget and periodic checkpoints.

Per optimizer step: `grad_accum` micro-batches of `batch_size` examples (global, split evenly over processes); the
batches of epoch e are `batch_order(n, batch_size, seed, e)`, so a resumed run continues with the same data.
A metrics record's `lr` is the learning rate its step's AdamW update used (the schedule's warmup gives step 1 a
non-zero one: `sacpo.train.engine`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sacpo.train import checkpoint
from sacpo.train.batches import batch_order
from sacpo.train.config import TrainConfig
from sacpo.train.heldout import budget_exceeded, eval_loss, heldout_kl
from sacpo.train.step import BatchLoss, reduce_metrics

log = logging.getLogger("sacpo.train")


@dataclass
class StepLoop:
    """Everything the loop works on, prepared by `sacpo.train.loop.train`."""

    cfg: TrainConfig
    acc: Any
    out: Path
    model: Any  # as prepared by accelerate
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    stepper: BatchLoss  # over the training split
    eval_stepper: BatchLoss  # over the held-out split
    tokenizer: Any
    kl_prompts: list[list[int]]
    total_steps: int
    steps_per_epoch: int
    run_identity: dict[str, Any]


@dataclass(frozen=True)
class LoopEnd:
    step: int  # optimizer steps taken in all (a resumed run counts the ones before the crash)
    last: dict[str, float]  # the last metrics record
    stopped_early: dict[str, float] | None  # {"step", "kl", "budget"} when kl_budget stopped the stage


def run_steps(loop: StepLoop, restored: checkpoint.Restored, show_progress: bool) -> LoopEnd:
    """Train from `restored.step` to `total_steps` (or until the KL budget is exceeded)."""
    cfg, acc = loop.cfg, loop.acc
    step, last, stopped_early = restored.step, {}, None
    bar = tqdm(
        total=loop.total_steps,
        initial=step,
        desc=f"{cfg.loss} β={cfg.beta:g}",
        disable=not (show_progress and acc.is_main_process),
    )
    sums: dict[str, list[torch.Tensor]] = defaultdict(list)
    for key, values in restored.pending.items():  # metrics of steps after the last record, before the crash
        sums[key] = [torch.tensor(v, dtype=torch.float32) for v in values]
    while step < loop.total_steps:
        lr = _optimizer_step(loop, step, sums)
        step += 1
        bar.update(1)
        is_last = step == loop.total_steps
        kl_due = cfg.kl_every > 0 and step % cfg.kl_every == 0
        # a KL step writes a record even off the log cadence (its estimate, and the budget check, are not skipped)
        if step % cfg.log_every == 0 or is_last or kl_due:
            last, stopped_early = _record(loop, step, lr, sums, evaluate=is_last or kl_due, is_last=is_last)
            _write_record(loop, last, bar)
        if stopped_early is not None:
            log.info(
                "step %d of %d: held-out KL(π‖π_ref) estimate %.3f nats exceeds kl_budget=%g: stopping the stage "
                "early and saving this policy",
                step,
                loop.total_steps,
                stopped_early["kl"],
                cfg.kl_budget,
            )
            break
        if cfg.save_every and step % cfg.save_every == 0 and not is_last:
            checkpoint.check_weights_finite(acc, loop.params, step, loop.out)
            pending = {key: [float(x) for x in vals] for key, vals in sums.items()}
            checkpoint.save(acc, loop.out, step, run=loop.run_identity, pending=pending)
    bar.close()
    return LoopEnd(step, last, stopped_early)


def _optimizer_step(loop: StepLoop, step: int, sums: dict[str, list[torch.Tensor]]) -> float:
    """One optimizer step (the `step`-th, 0-based): its micro-batches' backward passes, the finiteness checks of
    the losses and the gradient norm, clipping, the AdamW and scheduler steps. Metrics are appended to `sums`.
    Returns the learning rate the AdamW update used (the scheduler's value for this step, read from the param
    group just before `optimizer.step()`)."""
    cfg, acc = loop.cfg, loop.acc
    epoch, within = divmod(step, loop.steps_per_epoch)
    micro = batch_order(len(loop.stepper.data.pairs), cfg.batch_size, cfg.seed, epoch)
    micro = micro[within * cfg.grad_accum : (within + 1) * cfg.grad_accum]
    step_losses = []
    for k, global_batch in enumerate(micro):
        per = len(global_batch) // acc.num_processes
        local = global_batch[acc.process_index * per : (acc.process_index + 1) * per]
        sync = k == len(micro) - 1
        with contextlib.nullcontext() if sync else acc.no_sync(loop.model):
            loss, metrics = loop.stepper(loop.model, local, global_batch)
            acc.backward(loss / cfg.grad_accum)
        step_losses.append(loss.detach().float())
        sums["loss"].append(loss.detach())
        for key, v in metrics.items():
            sums[key].append(v)
    # every micro-batch of every process, so all processes stop together
    checkpoint.check_finite(acc.gather(torch.stack(step_losses)), step, loop.out)
    # the norm is computed (and checked) even when clipping is off: max_norm=inf scales by exactly 1
    grad_norm = _plain(
        acc.clip_grad_norm_(loop.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    )
    if grad_norm is not None:
        checkpoint.check_finite(grad_norm, step, loop.out, what="gradient norm")
        if cfg.max_grad_norm > 0:
            sums["grad_norm"].append(grad_norm.detach().reshape(()))
    lr = float(loop.optimizer.param_groups[0]["lr"])
    loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return lr


def _plain(norm: Any) -> torch.Tensor | None:
    """The gradient norm as a plain tensor: FSDP2 returns a replicated DTensor (its full value is the same on
    every process), DeepSpeed a float from its engine; None stays None."""
    if hasattr(norm, "full_tensor"):
        return norm.full_tensor()
    return norm if norm is None or isinstance(norm, torch.Tensor) else torch.tensor(float(norm))


def _record(
    loop: StepLoop, step: int, lr: float, sums: dict[str, list[torch.Tensor]], evaluate: bool, is_last: bool
) -> tuple[dict[str, float], dict[str, float] | None]:
    """The metrics record of `step` (sums reduced, then cleared; `lr`: the one step `step` applied) and, on an
    evaluation step, the held-out loss, the KL estimate and the budget decision: (record, stopped_early or None)."""
    cfg, acc = loop.cfg, loop.acc
    record = {"step": step, "epoch": step / loop.steps_per_epoch, "lr": lr}
    record.update(reduce_metrics(acc, sums))
    sums.clear()
    stopped_early = None
    if evaluate:
        record.update(eval_loss(loop.eval_stepper, loop.model, len(loop.eval_stepper.data.pairs), acc))
        record.update(heldout_kl(cfg, loop.model, acc, loop.tokenizer, loop.kl_prompts, step))
        if cfg.kl_budget is not None and not is_last:
            stopped_early = budget_exceeded(acc, record.get("eval/kl"), cfg.kl_budget, step)
    return record, stopped_early


def _write_record(loop: StepLoop, record: dict[str, float], bar: Any) -> None:
    """Append the record to metrics.jsonl (main process; an append-only log that a resume cuts back to its
    checkpoint's step) and show loss and accuracy on the progress bar."""
    if not loop.acc.is_main_process:
        return
    with open(loop.out / checkpoint.METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
    bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('rewards/accuracy', float('nan')):.2f}")
