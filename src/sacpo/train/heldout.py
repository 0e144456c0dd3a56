"""Held-out measurements of a stage: loss and reward metrics on the held-out examples, the KL(π‖π_ref) estimate
on held-out prompts, and the KL budget's stop decision (the same on every process)."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import torch

from sacpo.math.kl import kl_health
from sacpo.models.load import load_model
from sacpo.train.config import TrainConfig
from sacpo.train.kl_eval import estimate_kl
from sacpo.train.sharding import is_sharded, plain_loads
from sacpo.train.step import BatchLoss

log = logging.getLogger("sacpo.train")


@torch.no_grad()
def eval_loss(stepper: BatchLoss, model: Any, n: int, acc: Any) -> dict[str, float]:
    """Loss and reward metrics on the n held-out examples: example-weighted means, Σ_b |b|·mean_b / Σ_b |b|.

    Global batches of `batch_size` are split over the processes (process i takes batch[i::P]); the sums and counts
    are added over processes, so a paired loss gives the same numbers with any number of processes. KTO gathers
    its reference point z_ref inside every call, so every process must make the same calls: its last global batch
    is trimmed to a multiple of P (at most P − 1 examples left out, multi-process only).
    """
    P, rank, bs = acc.num_processes, acc.process_index, stepper.cfg.batch_size
    collective = stepper.loss.kind != "paired"
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    model.eval()
    for start in range(0, n, bs):
        batch = list(range(start, min(n, start + bs)))
        if collective:
            batch = batch[: len(batch) // P * P]
        idx = batch[rank::P]
        if not idx:
            continue
        loss, metrics = stepper(model, idx, idx)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] += float(v) * len(idx)
            counts[k] += len(idx)
    model.train()
    parts = [(dict(totals), dict(counts))]
    if P > 1:
        from accelerate.utils import gather_object

        parts = gather_object(parts)
    total, count = defaultdict(float), defaultdict(float)
    for t, c in parts:
        for k in t:
            total[k] += t[k]
            count[k] += c[k]
    return {f"eval/{k}": total[k] / count[k] for k in sorted(total) if count[k] > 0}


def heldout_kl(
    cfg: TrainConfig, model: Any, acc: Any, tokenizer: Any, prompts: list[list[int]], step: int
) -> dict[str, float]:
    """KL(π‖π_ref) on held-out prompts (main process; {} elsewhere or without prompts). LoRA: the reference is the
    policy with its adapter off; otherwise the reference is loaded for the estimate and freed.

    Under FSDP / DeepSpeed every forward of the sharded policy is a collective (its parameters are gathered), so
    every process runs the same estimate (same prompts, same seed: the processes stay in lockstep) and only the
    main process's result is kept and logged."""
    if not prompts or not (acc.is_main_process or is_sharded(acc)):
        return {}
    policy = acc.unwrap_model(model)
    ref_is_base = cfg.lora.enabled and cfg.reference in (None, cfg.policy)
    if ref_is_base:
        ref = policy
    else:
        with plain_loads(acc):
            ref = load_model(cfg.reference or cfg.policy, trust_remote_code=cfg.trust_remote_code)
        ref = ref.to(acc.device).eval()
    result = estimate_kl(
        policy,
        ref,
        prompts,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        cfg.kl_samples,
        cfg.kl_max_new_tokens,
        seed=cfg.seed + step,
        chunk=cfg.logprob_chunk,
        reference_context=policy.disable_adapter() if ref_is_base else None,
        estimator=cfg.kl_estimator,
    )
    del ref
    if not acc.is_main_process:
        return {}
    warning = kl_health(result["kl"])
    if warning:
        log.warning("step %d: %s", step, warning)
    return {f"eval/{k}": v for k, v in result.items()}


def budget_exceeded(acc: Any, kl: float | None, budget: float, step: int) -> dict[str, float] | None:
    """{"step", "kl", "budget"} when the main process's KL estimate exceeds `budget`, else None — on every process.

    Only the main process's KL estimate counts (`heldout_kl`); its value is broadcast so that all processes take
    the same decision and stop at the same step (a process that went on alone would hang in its next gather). An
    undefined estimate (NaN) does not stop the stage."""
    value = torch.tensor([math.nan if kl is None else kl], dtype=torch.float64, device=acc.device)  # (1,)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast

        value = broadcast(value, from_process=0)
    kl_main = value.item()
    if not kl_main > budget:
        return None
    return {"step": step, "kl": kl_main, "budget": budget}
