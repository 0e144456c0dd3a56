"""One DPO-step configuration in this process: sacpo's real `train()` or TRL's real `DPOTrainer.train()`.

Both sides train the same model on the same pairs in the same batch order (TRL's dataset is reordered to sacpo's
epoch-0 permutation and read sequentially), batch size, max_length, AdamW (torch, fused — sacpo's default and
`transformers`' `adamw_torch_fused` default on torch ≥ 2.8 — lr, no weight decay, constant schedule, clip 1.0),
fp32 (the GPU check, benchmarks/gpu.py, sets spec `mixed_precision` "bf16" and `trl_args` {use_cpu: false, bf16:
true}: bf16 autocast over float32 weights on both sides), no gradient checkpointing, no eval, no logging, no
checkpoints, dataloader workers 0. A global optimizer
post-step hook (`common.StepClock`) timestamps every step on both sides; step k's time is end(k) − end(k−1), the
first `warmup` intervals are dropped. Peak RSS is read at the end of the last step
(before any final save), in this child that runs only this configuration.

Reference (`ref`):
  sacpo cached     — the design: log-probs read from the on-disk cache (`sacpo.train.ref_cache`), warmed beforehand
                     (policy log-probs through the fused LM head when V ≥ 4096: SmolLM2 yes, tiny GPT-2 no)
  sacpo live       — the loop unchanged, but the cache lookup replaced by a reference model held in memory and run
                     (no_grad, `sequence_logps`) on each micro-batch: what the loop would cost without the cache
  trl live         — TRL's default: a reference model copy (full) or the adapter-disabled policy (LoRA) per step
  trl precompute   — `precompute_ref_log_probs=True`: one reference pass before training, kept in the dataset
  trl live+malloc  — TRL live after `sacpo.train.allocator.tune_malloc()` (the glibc malloc thresholds sacpo's
                     commands set on CPU): like for like on the allocator

`--spec '{"mode": "parity", ...}'` instead computes the first batch's loss with sacpo's `BatchLoss` and TRL's
`compute_loss` (reference = a perturbed copy of the policy, so the loss is not trivially log 2), checks the token ids
and response masks both sides build are identical, and warms sacpo's reference cache for the timed runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks.common import (
    TRL_ARGS,
    StepClock,
    child_main,
    match_sacpo_allocator,
    paired_rows,
    read_rows,
    trl_dataset,
)

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


# ----------------------------------------------------------------------------------------------------- sacpo
def sacpo_config(spec: dict[str, Any], out: Path, reference: str | None = None):
    from sacpo.train.config import DataConfig, LoraSettings, TrainConfig

    lora = LoraSettings(
        enabled=bool(spec.get("lora")), r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"]
    )
    return TrainConfig(
        policy=spec["policy"],
        reference=reference,
        data=DataConfig(source=spec["data"], format="trl_paired"),
        output_dir=str(out),
        loss="dpo",
        beta=spec["beta"],
        max_length=spec["max_length"],
        max_prompt_length=spec["max_prompt_length"],
        batch_size=spec["batch_size"],
        grad_accum=1,
        max_steps=spec["steps"],
        lr=spec["lr"],
        weight_decay=0.0,
        warmup_ratio=0.0,
        scheduler="constant",
        max_grad_norm=1.0,
        lora=lora,
        gradient_checkpointing=False,
        mixed_precision=spec.get("mixed_precision", "no"),  # the GPU check (gpu.py): "bf16"
        seed=0,
        log_every=spec["steps"],
        kl_prompts=0,
        eval_fraction=0.0,
        save_every=0,
        cache_dir=spec["cache_dir"],
        malloc_tuning=True,  # as `sacpo train` runs it (sacpo.recipes.train.CommandTrainConfig)
    )


class LiveReference:
    """Stands in for the cached (N, 2) reference tensor: indexing selects pairs, `.to(device)` runs the reference
    model on them (one batch, computed the way the policy's forward is: one row per pair where prompts are shared)."""

    def __init__(
        self, model: Any, pairs: list, pad_id: int, chunk: int, average: bool, idx: list[int] | None = None
    ):
        self.model, self.pairs, self.pad_id, self.chunk, self.average = model, pairs, pad_id, chunk, average
        self.idx = list(range(len(pairs))) if idx is None else idx

    def __getitem__(self, idx: Any) -> LiveReference:
        idx = idx.tolist() if hasattr(idx, "tolist") else list(idx)
        return LiveReference(
            self.model, self.pairs, self.pad_id, self.chunk, self.average, [self.idx[i] for i in idx]
        )

    def __len__(self) -> int:
        return len(self.idx)

    def to(self, device: Any):
        from sacpo.train.ref_cache import compute_ref_logps

        pairs = [
            self.pairs[i] for i in self.idx
        ]  # one batch, computed as the policy's forward is (shared prompt)
        return compute_ref_logps(
            self.model,
            pairs,
            self.pad_id,
            2 * len(pairs),
            self.chunk,
            self.average,
            device,
            show_progress=False,
        ).to(device)  # (b, 2)


def _patch_live_reference() -> None:
    from sacpo.models.load import load_model
    from sacpo.train import loop
    from sacpo.train.ref_cache import RefLogps

    def live(reference, tokenizer, pairs, cache_dir, max_length, average=False, chunk_size=256, **_: Any):
        model = load_model(reference).eval()
        for m in model.modules():
            if m.__class__.__name__ == "Dropout":
                m.p = 0.0
        model.requires_grad_(False)
        ref = LiveReference(model, pairs, tokenizer.pad_token_id, chunk_size, average)
        return RefLogps(ref, Path(cache_dir) / "live-reference", computed=True)

    loop.reference_logps = live


def run_sacpo(spec: dict[str, Any]) -> dict[str, Any]:
    from sacpo.train import loop

    out = Path(spec["work"]) / "runs" / f"sacpo-{spec['tag']}-{os.getpid()}"
    cfg = sacpo_config(spec, out)
    if spec["ref"] == "live":
        if cfg.lora.enabled:
            raise ValueError("sacpo live reference is benchmarked for full fine-tuning only")
        _patch_live_reference()
    elif spec["ref"] != "cached":
        raise ValueError(f"sacpo reference mode must be cached or live, got {spec['ref']!r}")
    with StepClock() as clock:
        trained = loop.train(cfg, show_progress=False)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    optimizer = f"torch.optim.AdamW fused={cfg.fused_adamw} (sacpo loop)"
    return {
        "clock": clock.times,
        "rss_steps": clock.rss,
        "optimizer": optimizer,
        "shared_prompt_rows": trained.shared_prompt_rows,
        "fused_head": trained.fused_head,
        "fused_head_reason": trained.fused_head_reason,
    }


# ------------------------------------------------------------------------------------------------------- TRL
def trl_trainer(spec: dict[str, Any], out: Path, ref_model: Any = None, precompute: bool | None = None):
    """A DPOTrainer on the spec's rows, in sacpo's epoch-0 batch order, read sequentially."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from sacpo.train.batches import batch_order

    class OrderedDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any):
            return SequentialSampler(self.train_dataset)

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # the rows sacpo reads (spec["data"]): same seed and lengths whichever benchmark wrote them
    rows = read_rows(spec["data"]) if spec.get("data") else paired_rows(spec["n_rows"], spec["model"])
    order = [i for batch in batch_order(len(rows), spec["batch_size"], 0, 0) for i in batch]
    dataset = trl_dataset([rows[i] for i in order], tokenizer)
    precompute = spec["ref"] == "precompute" if precompute is None else precompute
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        beta=spec["beta"],
        max_length=spec["max_length"],
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=16,
        disable_dropout=True,
        dataloader_pin_memory=False,
        logging_strategy="no",
        **{**TRL_ARGS, **spec.get("trl_args", {})},  # the GPU check (gpu.py): use_cpu False, bf16 True
    )
    peft_config = None
    if spec.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"]
        )
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32, use_safetensors=True)
    return OrderedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["ref"] not in ("live", "precompute", "live+malloc"):
        raise ValueError(f"TRL reference mode must be live, precompute or live+malloc, got {spec['ref']!r}")
    if spec["ref"] == "live+malloc":
        match_sacpo_allocator()
    out = Path(spec["work"]) / "runs" / f"trl-{spec['tag']}-{os.getpid()}"
    trainer = trl_trainer(spec, out)
    opt = None
    with StepClock() as clock:
        trainer.train()
        opt = trainer.optimizer
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    inner = getattr(opt, "optimizer", opt)
    return {
        "clock": clock.times,
        "rss_steps": clock.rss,
        "optimizer": f"{type(inner).__module__}.{type(inner).__name__} foreach={inner.defaults.get('foreach')} "
        f"fused={inner.defaults.get('fused')}",
    }


# ---------------------------------------------------------------------------------------------------- parity
def run_parity(spec: dict[str, Any]) -> dict[str, Any]:
    """First-batch DPO loss of sacpo (BatchLoss) and TRL (compute_loss, live and precomputed reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sacpo.data.tokenize import pad_sequences
    from sacpo.models.load import load_tokenizer
    from sacpo.train import batches, policy, step
    from sacpo.train.ref_cache import reference_logps

    work = Path(spec["work"])
    cfg = sacpo_config(spec, work / "runs" / "parity-sacpo", reference=spec["reference"])
    tokenizer = load_tokenizer(cfg.policy)
    pairs, _ = batches.prepare_data(cfg, tokenizer)
    first = batches.batch_order(len(pairs), cfg.batch_size, cfg.seed, 0)[0]
    acc = policy.make_accelerator(cfg)
    model = policy.build_policy(cfg).to(acc.device)
    model.train()
    result: dict[str, Any] = {}
    losses = {}
    for name, ref_dir in (("perturbed", spec["reference"]), ("self", cfg.policy)):
        ref = reference_logps(ref_dir, tokenizer, pairs, cfg.cache_dir, cfg.max_length, show_progress=False)
        split = batches.subset(pairs, ref.logps, None, list(range(len(pairs))))
        stepper = step.BatchLoss(cfg, split, tokenizer.pad_token_id, acc)
        with torch.no_grad():
            loss, _ = stepper(model, first, first)
        losses[name] = float(loss)
    result["sacpo_loss"] = losses["perturbed"]
    result["sacpo_loss_ref_is_policy"] = losses["self"]  # log 2: what every timed run starts from
    ours = pad_sequences([pairs[i][0] for i in first] + [pairs[i][1] for i in first], tokenizer.pad_token_id)
    result["n_params"] = sum(p.numel() for p in model.parameters())
    del model

    ref_model = AutoModelForCausalLM.from_pretrained(
        spec["reference"], dtype=torch.float32, use_safetensors=True
    )
    for mode in spec.get("parity_modes", ("live", "precompute")):
        trainer = trl_trainer(
            spec, work / "runs" / f"parity-trl-{mode}", ref_model=ref_model, precompute=mode == "precompute"
        )
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        with torch.no_grad():
            result[f"trl_loss_{mode}"] = float(trainer.compute_loss(trainer.model, batch))
        if mode == "live":
            same_ids = torch.equal(batch["input_ids"].cpu(), ours["input_ids"])
            same_mask = torch.equal(batch["completion_mask"][:, 1:].cpu().bool(), ours["labels_mask"])
            result["identical_inputs"] = bool(same_ids and same_mask)
            result["first_batch_shape"] = list(batch["input_ids"].shape)
        del trainer
    for mode in ("live", "precompute"):
        if f"trl_loss_{mode}" in result:
            result[f"abs_diff_{mode}"] = abs(result["sacpo_loss"] - result[f"trl_loss_{mode}"])
    return result


def step_tokens(spec: dict[str, Any]) -> dict[str, list[int]]:
    """Tokens of each optimizer step, from sacpo's encoding of the same batches.

    tokens: real (non-pad) tokens of the two sequences of every pair, the work both tools deliver (throughput
    counts these); padded_tokens: the padded two-rows-per-pair batch; shared_tokens: real tokens with each pair's
    prompt counted once, what shared-prompt rows run through the model (MFU counts these when they are used).
    """
    from sacpo.data.tokenize import shares_prompt
    from sacpo.models.load import load_tokenizer
    from sacpo.train import batches

    cfg = sacpo_config(spec, Path(spec["work"]) / "runs" / "tokens")
    pairs, _ = batches.prepare_data(cfg, load_tokenizer(cfg.policy))
    real, padded, shared = [], [], []
    for batch in batches.batch_order(len(pairs), cfg.batch_size, cfg.seed, 0)[: cfg.max_steps]:
        seqs = [pairs[i][0] for i in batch] + [pairs[i][1] for i in batch]
        lengths = [len(s.input_ids) for s in seqs]
        real.append(sum(lengths))
        padded.append(len(seqs) * max(lengths))
        packable = all(shares_prompt(*pairs[i]) for i in batch)  # else the step pads this batch
        shared.append(sum(lengths) - (sum(pairs[i][0].prompt_len for i in batch) if packable else 0))
    return {"tokens": real, "padded_tokens": padded, "shared_tokens": shared}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("mode") == "parity":
        return run_parity(spec)
    result = run_sacpo(spec) if spec["side"] == "sacpo" else run_trl(spec)
    result.update(step_tokens(spec))
    if len(result["clock"]) != spec["steps"]:
        raise RuntimeError(f"expected {spec['steps']} optimizer steps, timed {len(result['clock'])}")
    return result


if __name__ == "__main__":
    child_main(run)
