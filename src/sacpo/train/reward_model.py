"""Training Bradley–Terry reward and cost models (`sacpo reward`), single or as seeded ensembles.

Model: the policy's causal-LM backbone with a scalar head, `AutoModelForSequenceClassification(num_labels=1)`.
The score s(x, y) is the head's output at the last *attended* token of prompt + response + EOS, encoded with
`sacpo.data.tokenize` exactly as the policy sees it (same prompt rendering, same truncation). Pooling follows the
attention mask, not `config.pad_token_id`: sacpo tokenizers often use EOS as PAD, and Hugging Face's own
`...ForSequenceClassification.forward` would then pool the token *before* the final EOS. Score with
`sacpo.scoring.reward_model.RewardModelScorer` (or `sacpo.models.reward.sequence_scores`), not with
`model(...).logits`.

Training (Bradley & Terry 1952; reward-model recipe of Ouyang et al. 2022, §3.5): for pairs (x, y_w, y_l),

    L = −log σ(s(x, y_w) − s(x, y_l))  +  c · mean(s²)            (c = center_coef, scores over both sides)

The BT likelihood is invariant to adding a constant to s; the small centring term pins that constant so scores
stay near 0 (Ouyang et al. shift the trained RM by a bias instead; the in-training term follows Eisenstein et al.
2023, "Helping or herding?"). Chosen and rejected go through the model in one concatenated
forward pass; AdamW, linear warmup + linear decay, gradient clipping, dropout off (as TRL's RewardTrainer), on
the shared engine (`sacpo.train.engine`).

LoRA (`lora.enabled`): adapters on the backbone's linear layers, the head trained in full; AdamW then holds moments
of the adapters and the head only, and no gradient of a backbone weight is stored.

Cost models: train on safety pairs (format `pku_safe`, chosen = safer); the head then outputs a *safety score*
and the cost is c(x, y) = −s(x, y) (kind "cost").

Ensembles (`ensemble: k`): k members with seeds seed, …, seed+k−1 (head initialisation and data order differ; the
train/held-out split is the same for all, drawn from `seed`, so held-out pairs are unseen by every member).
Worst-case aggregation of an ensemble (min over member rewards, max over member costs) follows Coste et al. 2023,
"Reward model ensembles help mitigate overoptimization".

Output directory (built in a temporary sibling, then put in place by `sacpo.fsutil.atomic_dir`):

    ensemble = 1:  <output_dir>/ = HF model dir (config.json, model.safetensors, tokenizer files),
                   reward_model.json (kind, lengths, seed), metrics.json, config.yaml; with LoRA and
                   lora.save=adapter the model files are a peft SEQ_CLS adapter on `model` instead (adapter_config.json,
                   adapter_model.safetensors with the head, sacpo_adapter.json; `sacpo.models.reward.load_reward_model`)
    ensemble = k:  <output_dir>/member-<i>/ (each as above, without config.yaml),
                   <output_dir>/reward_model.json (kind, members), metrics.json (ensemble + members), config.yaml
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sacpo.config import (
    ConfigError,
    Device,
    Fraction,
    LearningRate,
    ModelDtype,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Seed,
    config_dataclass,
    help_field,
    to_yaml,
)
from sacpo.data.formats import get_format
from sacpo.data.tokenize import Encoded, encode_paired, pad_sequences
from sacpo.fsutil import atomic_dir, atomic_write_json, atomic_write_text
from sacpo.math.reward import aggregate_scores, bradley_terry_loss, pairwise_accuracy
from sacpo.models.adapters import save_adapter
from sacpo.models.dtypes import resolve_dtype, save_pretrained_as
from sacpo.models.load import check_model_dir, load_tokenizer
from sacpo.models.modules import disable_dropout, enable_checkpointing, resolve_device
from sacpo.models.reward import META_FILE, build_reward_model, score_encoded, sequence_scores
from sacpo.rng import torch_seeded as seeded
from sacpo.train.batches import batch_order, split_indices
from sacpo.train.config import DataConfig, LoraSettings
from sacpo.train.engine import Stepper, autocast, fit, warmup_linear_decay
from sacpo.train.policy import with_lora

log = logging.getLogger("sacpo.reward")

Kind = Literal["auto", "reward", "cost"]  # auto: cost for pku_safe data, reward otherwise


# ------------------------------------------------------------------------------------------------------ config
@config_dataclass
class RewardConfig:
    model: str = help_field(help="causal-LM directory (safetensors) whose backbone becomes the reward model")
    data: DataConfig = help_field(help="paired preference data (pku_helpful: reward, pku_safe: cost)")
    output_dir: str = help_field(help="model dir (ensemble=1) or dir of member-<i>/ model dirs (ensemble>1)")
    kind: Kind = help_field("auto", help="reward | cost (c = −score) | auto: cost for pku_safe, else reward")
    ensemble: PositiveInt = help_field(1, help="number of members k, trained with seeds seed..seed+k−1")
    max_length: PositiveInt = help_field(
        256, help="max tokens of prompt + response (same policy as training)"
    )
    max_prompt_length: PositiveInt = help_field(
        128, help="max prompt tokens (prompt is truncated from the left)"
    )
    batch_size: PositiveInt = help_field(
        8, help="pairs per optimizer step (2×batch_size sequences per forward)"
    )
    epochs: float = help_field(1.0, help="passes over the training pairs (ignored if max_steps > 0)")
    max_steps: NonNegativeInt = help_field(0, help="optimizer steps per member; 0 = derive from epochs")
    lr: LearningRate = help_field(1e-5, help="AdamW learning rate")
    weight_decay: NonNegativeFloat = help_field(0.0, help="AdamW weight decay")
    warmup_ratio: Fraction = help_field(
        0.1, help="fraction of steps with linear warmup (then linear decay to 0)"
    )
    max_grad_norm: float = help_field(1.0, help="gradient clipping norm; 0 disables", ge=0)
    center_coef: NonNegativeFloat = help_field(
        1e-3, help="coefficient c of the centring term c·mean(score²); 0 disables"
    )
    eval_fraction: Fraction = help_field(0.1, help="fraction of pairs held out for accuracy (seeded split)")
    eval_batch_size: PositiveInt = help_field(32, help="sequences per forward when scoring for metrics")
    log_every: PositiveInt = help_field(
        10, help="record the training loss/accuracy every N steps (metrics.json)"
    )
    seed: Seed = help_field(0, help="seed of the split, of member 0's head init and data order")
    device: Device = help_field("auto", help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    mixed_precision: Literal["auto", "no", "bf16"] = help_field(
        "auto", help="auto | no | bf16 (auto: bf16 on CUDA when supported)"
    )
    gradient_checkpointing: bool = help_field(False, help="trade compute for activation memory")
    dtype: ModelDtype = help_field(
        "auto",
        help="dtype of the saved reward model(s) (auto | bf16 | fp16 | fp32; auto = the backbone checkpoint's "
        "own). Training keeps float32 weights (mixed_precision sets the autocast); the cast is made on save",
    )
    lora: LoraSettings = help_field(
        LoraSettings(),
        help="LoRA on the backbone (peft, task SEQ_CLS); the scalar head stays fully trained (a module to save). "
        "lora.save: adapter = each model directory is the adapter on `model`; merged = the dense model; both = the "
        "dense model with the adapter in adapter/",
    )
    trust_remote_code: bool = help_field(False, help="allow model code from the model directory")

    def __post_init__(self) -> None:  # cross-field checks; types, bounds and choices are declared above
        if not (self.epochs > 0 or self.max_steps > 0):
            raise ConfigError("set epochs > 0 or max_steps > 0")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError("max_prompt_length must be < max_length")
        if get_format(self.data.format).kind != "paired":
            raise ConfigError(
                f"reward models train on paired data; data.format {self.data.format!r} is unpaired "
                "(use pku_helpful, pku_safe or trl_paired)"
            )


def resolve_kind(cfg: RewardConfig) -> str:
    """ "reward" or "cost": `auto` means cost for safety pairs (pku_safe), reward otherwise."""
    if cfg.kind != "auto":
        return cfg.kind
    return "cost" if cfg.data.format == "pku_safe" else "reward"


# ---------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class RewardResult:
    output_dir: Path
    model_dirs: list[Path]  # one per member
    kind: str  # "reward" | "cost"
    metrics: dict[str, Any]  # as metrics.json


@dataclass
class _MemberRun:
    metrics: dict[str, Any]
    train_scores: torch.Tensor  # (n_train, 2): chosen, rejected
    eval_scores: torch.Tensor  # (n_eval, 2)


def _pair_scores(model: Any, pairs: list[tuple[Encoded, Encoded]], pad_id: int, cfg: RewardConfig, device):
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    s = score_encoded(model, seqs, pad_id, cfg.eval_batch_size, device)  # (2n,)
    return torch.stack(s.split(len(pairs)), dim=1) if pairs else torch.empty(0, 2)  # (n, 2)


def _pair_metrics(scores: torch.Tensor, prefix: str) -> dict[str, float | None]:
    chosen, rejected = scores[:, 0], scores[:, 1]
    loss = bradley_terry_loss(chosen, rejected).mean().item() if len(scores) else None
    return {f"{prefix}_accuracy": pairwise_accuracy(chosen, rejected), f"{prefix}_loss": loss}


def _train_member(
    cfg: RewardConfig,
    tokenizer: Any,
    train_pairs: list[tuple[Encoded, Encoded]],
    eval_pairs: list[tuple[Encoded, Encoded]],
    seed: int,
    desc: str,
    show_progress: bool,
) -> tuple[Any, _MemberRun]:
    """One member: head initialised from `seed`, batches in the (seed, epoch) order, then scored for metrics."""
    started = time.time()
    device = resolve_device(cfg.device)
    steps_per_epoch = len(train_pairs) // cfg.batch_size
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))

    with seeded(seed):  # head (and LoRA) initialisation
        model = build_reward_model(cfg.model, tokenizer, cfg.trust_remote_code)
        disable_dropout(model)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        if cfg.lora.enabled:
            model = with_lora(model, cfg.lora, "SEQ_CLS", cfg.gradient_checkpointing)
    model.to(device).train()
    stepper = Stepper(
        [p for p in model.parameters() if p.requires_grad],
        cfg.lr,
        warmup_linear_decay(math.ceil(cfg.warmup_ratio * total_steps), total_steps),
        cfg.weight_decay,
        cfg.max_grad_norm,
        name=desc,
        hint="lower lr or check the data",
    )
    pad_id = tokenizer.pad_token_id
    batches: list[list[int]] = []

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        nonlocal batches
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0:
            batches = batch_order(len(train_pairs), cfg.batch_size, seed, epoch)
        idx = batches[within]
        batch = pad_sequences([train_pairs[i][0] for i in idx] + [train_pairs[i][1] for i in idx], pad_id)
        with autocast(cfg.mixed_precision, device):
            scores = sequence_scores(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )  # (2B,)
        chosen, rejected = scores.split(len(idx))  # (B,), (B,)
        bt = bradley_terry_loss(chosen, rejected).mean()
        accuracy = pairwise_accuracy(chosen.detach(), rejected.detach()) or 0.0
        return bt + cfg.center_coef * scores.pow(2).mean(), {"loss": bt.item(), "accuracy": accuracy}

    run = fit(stepper, total_steps, loss_fn, desc, cfg.log_every, show_progress, log_lr=True)
    model.eval()
    train_scores = _pair_scores(model, train_pairs, pad_id, cfg, device)
    eval_scores = _pair_scores(model, eval_pairs, pad_id, cfg, device)
    metrics = {
        "seed": seed,
        "steps": total_steps,
        **_pair_metrics(train_scores, "train"),
        **_pair_metrics(eval_scores, "heldout"),
        "score_mean": train_scores.mean().item(),
        "score_std": train_scores.std().item() if train_scores.numel() > 1 else None,
        "n_pairs": len(train_pairs) + len(eval_pairs),
        "n_train": len(train_pairs),
        "n_heldout": len(eval_pairs),
        "seconds": round(time.time() - started, 2),
        "history": run.history,
    }
    log.info(
        "%s: train accuracy %.3f, held-out accuracy %s",
        desc,
        metrics["train_accuracy"],
        "undefined (no held-out pairs)"
        if metrics["heldout_accuracy"] is None
        else f"{metrics['heldout_accuracy']:.3f}",
    )
    return model, _MemberRun(metrics, train_scores, eval_scores)


def _save_member(
    model: Any,
    tokenizer: Any,
    path: Path,
    final: Path,
    cfg: RewardConfig,
    meta: dict[str, Any],
    metrics: dict[str, Any],
    dtype: torch.dtype = torch.float32,
) -> None:
    """One member's directory: the dense model, or with LoRA what lora.save says (`final`: where `path` ends up)."""
    path.mkdir(exist_ok=True)
    save = cfg.lora.save if cfg.lora.enabled else None
    if save in ("adapter", "both"):
        target, target_final = (path, final) if save == "adapter" else (path / "adapter", final / "adapter")
        target.mkdir(exist_ok=True)
        save_adapter(model, tokenizer, target, target_final, cfg.model)
    if save != "adapter":
        dense = model.merge_and_unload() if save else model
        dense.config.use_cache = True
        save_pretrained_as(dense, path, dtype)
        tokenizer.save_pretrained(path)
    atomic_write_json(path / META_FILE, {**meta, "model_format": "adapter" if save == "adapter" else "dense"})
    atomic_write_json(path / "metrics.json", metrics)


def _ensemble_metrics(runs: list[_MemberRun], n_pairs: int) -> dict[str, Any]:
    train = torch.stack([r.train_scores for r in runs])  # (k, n_train, 2)
    held = torch.stack([r.eval_scores for r in runs])  # (k, n_eval, 2)

    def acc(scores: torch.Tensor, how: str) -> float | None:
        agg = aggregate_scores(scores, how)  # (n, 2)
        return pairwise_accuracy(agg[:, 0], agg[:, 1])

    return {
        "ensemble": len(runs),
        "heldout_accuracy": acc(held, "mean"),
        "heldout_accuracy_worst_case": acc(held, "min"),  # min score = min reward = max cost
        "train_accuracy": acc(train, "mean"),
        "member_heldout_accuracy": [r.metrics["heldout_accuracy"] for r in runs],
        "member_train_accuracy": [r.metrics["train_accuracy"] for r in runs],
        "n_pairs": n_pairs,
        "n_train": train.shape[1],
        "n_heldout": held.shape[1],
        "members": [r.metrics for r in runs],
    }


def train_reward_model(cfg: RewardConfig, show_progress: bool = True) -> RewardResult:
    """Train `cfg.ensemble` Bradley–Terry models on `cfg.data` and write them to `cfg.output_dir` atomically.

    Returns the output directory, the member model directories, the kind and the metrics (as metrics.json:
    train/held-out pairwise accuracy and BT loss, n pairs; for an ensemble also the mean-aggregated and
    worst-case ensemble accuracies and every member's metrics).
    """
    kind = resolve_kind(cfg)
    out = Path(cfg.output_dir)
    started = time.time()
    check_model_dir(cfg.model)
    dtype = resolve_dtype(cfg.dtype, cfg.model)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_pairs, eval_pairs = _split_pairs(cfg, tokenizer)
    log.info(
        "training %d %s model(s) on %d pairs (%d held out)",
        cfg.ensemble,
        kind,
        len(train_pairs),
        len(eval_pairs),
    )
    meta = {
        "kind": kind,
        "format": cfg.data.format,
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "backbone": cfg.model,
    }
    names = [f"member-{i}" if cfg.ensemble > 1 else "." for i in range(cfg.ensemble)]
    with atomic_dir(out) as tmp:
        runs = []
        for i, name in enumerate(names):
            seed = cfg.seed + i
            desc = f"{kind} model" + (f" {i + 1}/{cfg.ensemble}" if cfg.ensemble > 1 else "")
            model, run = _train_member(cfg, tokenizer, train_pairs, eval_pairs, seed, desc, show_progress)
            member_meta = {**meta, "seed": seed}
            _save_member(model.cpu(), tokenizer, tmp / name, out / name, cfg, member_meta, run.metrics, dtype)
            del model
            runs.append(run)
        if cfg.ensemble > 1:
            metrics = _ensemble_metrics(runs, len(train_pairs) + len(eval_pairs))
            metrics["seconds"] = round(time.time() - started, 2)
            seeds = [cfg.seed + i for i in range(cfg.ensemble)]
            atomic_write_json(tmp / META_FILE, {**meta, "members": names, "seeds": seeds})
            atomic_write_json(tmp / "metrics.json", metrics)
        else:
            metrics = runs[0].metrics
        atomic_write_text(tmp / "config.yaml", to_yaml(cfg))
    model_dirs = [(out / n).resolve() if n != "." else out.resolve() for n in names]
    return RewardResult(out, model_dirs, kind, metrics)


def _split_pairs(
    cfg: RewardConfig, tokenizer: Any
) -> tuple[list[tuple[Encoded, Encoded]], list[tuple[Encoded, Encoded]]]:
    """Encoded (chosen, rejected) pairs split into train / held-out by `cfg.seed` (same split for every member)."""
    pairs = encode_paired(tokenizer, cfg.data.load(), cfg.max_length, cfg.max_prompt_length)
    train_idx, eval_idx = split_indices(len(pairs), cfg.eval_fraction, cfg.seed)
    train_pairs, eval_pairs = [pairs[i] for i in train_idx], [pairs[i] for i in eval_idx]
    if len(train_pairs) < cfg.batch_size:
        raise ConfigError(
            f"{len(train_pairs)} training pairs cannot fill one batch of batch_size={cfg.batch_size}"
        )
    return train_pairs, eval_pairs
