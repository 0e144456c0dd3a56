"""Training prefix value models V_θ(x, y^t) (`sacpo.models.prefix_value.PrefixScorer`) by CD-FUDGE or CD-Q.

Training data: base-model rollouts y ~ π_base(·|x) on training prompts, scored once by a reward — r(x, y): any
scorer spec of `sacpo.scoring` (a registered gold oracle such as the toyworld's `toyworld-gold`, or a
`sacpo reward` directory read on its own view: the cost c = −s for a cost model).

* CD-FUDGE (Yang & Klein 2021; Mudgal et al. 2024 §3.1): regress V at every response prefix (empty response
  included) on the final reward: L = mean_t (V(x, y^t) − r(x, y))². Its minimiser is E_{y~π_base}[r | x, y^t].
* CD-Q (Mudgal et al. 2024 §3.2): Bellman targets with a stop-gradient target network V̄ (a copy of V refreshed
  every `target_update_every` steps): target(x, y^t) = Σ_{z∈top-k} p̃(z)·V̄(x, y^t z) for non-terminal prefixes,
  where p̃ is the base policy's next-token distribution restricted to its top-k tokens and *renormalised* over
  them (`sacpo.math.decoding.bellman_targets`); target = r(x, y) at the terminal prefix (the full rollout — ending
  with EOS, or cut at max_new_tokens, which is the decoder's horizon too). The top-k tokens and their base
  log-probs are computed once per rollout (the base model is fixed); V̄ of the children comes from one
  tree-attention forward (`PrefixScorer.child_values`).

Optimisation (`sacpo.train.engine`): AdamW, the LR constant after a 5% linear warmup, gradient clipping.

Output directory (written atomically, `PrefixScorer.save`): HF model dir, prefix_scorer.json (kind, method,
reward, base model fingerprint, lengths), metrics.json, config.yaml. Load with `PrefixScorer.load`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from sacpo.config import (
    ConfigError,
    Device,
    Fraction,
    LearningRate,
    NonNegativeFloat,
    PositiveInt,
    Seed,
    config_dataclass,
    help_field,
    to_yaml,
)
from sacpo.data.prompt_format import CHAT_TEMPLATE_HELP, SYSTEM_PROMPT_HELP, PromptFormat, log_first_prompt
from sacpo.data.prompts import load_prompts
from sacpo.math.decoding import bellman_targets
from sacpo.models.load import (
    check_model_dir,
    fingerprint_model,
    fingerprint_tokenizer,
    load_model,
    load_tokenizer,
)
from sacpo.models.modules import resolve_device
from sacpo.models.prefix_value import PrefixScorer
from sacpo.scoring import check_scorer_spec, resolve_scorer
from sacpo.train.engine import Stepper, fit, warmup_constant
from sacpo.train.prefix_rollouts import Rollout, batch_tensors, sample_rollouts

log = logging.getLogger("sacpo.prefix_scorer")

Method = Literal["fudge", "q"]  # CD-FUDGE, CD-Q
METHODS = get_args(Method)


def scorer_targets(
    method: str, batch: dict[str, torch.Tensor], target: PrefixScorer | None, chunk: int = 0
) -> torch.Tensor:
    """Regression targets (B, T) of a batch from `batch_tensors` (meaningful where value_mask).

    fudge: r(x, y) at every prefix. q: r at the terminal prefix, Σ_top-k p̃(z)·V̄(x, y^t z) elsewhere, V̄ = `target`.
    """
    rewards = batch["rewards"][:, None].expand_as(batch["value_mask"]).to(batch["input_ids"].device)  # (B, T)
    if method == "fudge":
        return rewards
    if method != "q":
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if target is None:
        raise ValueError("CD-Q needs a target network")
    with torch.no_grad():
        child = target.child_values(batch["input_ids"], batch["attention_mask"], batch["child_ids"], chunk)
    return bellman_targets(batch["child_logp"], child, rewards, batch["terminal"])  # (B, T)


def masked_mse(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over mask of (values − targets)²; (B, T) inputs → scalar."""
    diff = (values - targets.to(values.dtype)) ** 2
    return torch.where(mask, diff, torch.zeros_like(diff)).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------------ config
@config_dataclass
class TrainScorerConfig:
    model: str = help_field(
        help="base causal-LM directory (safetensors): sampled from, and the scorer's backbone"
    )
    output_dir: str = help_field(help="the prefix scorer directory (HF format + prefix_scorer.json)")
    prompts: str = help_field(
        help="training prompts: .json (list or splits, e.g. toyworld prompts.json) / .jsonl / .txt"
    )
    reward: str = help_field(
        "toyworld-gold",
        help="reward of full responses, a scorer spec: toyworld-gold (r*), toyworld-safety (g*), another "
        "registered name, or a `sacpo reward` directory (a cost model gives its cost)",
    )
    method: Method = help_field(
        "fudge", help="fudge (regress every prefix on the final reward) | q (CD-Q Bellman)"
    )
    prompts_split: str = help_field("train", help="key of the prompt list when the .json maps splits")
    max_prompts: PositiveInt | None = help_field(None, help="use the first N prompts only")
    n_rollouts: int = help_field(
        512, help="base-model responses sampled (prompts cycled in a seeded order)", ge=2
    )
    max_new_tokens: PositiveInt = help_field(40, help="max tokens per rollout")
    max_prompt_length: PositiveInt = help_field(128, help="prompts are left-truncated to this many tokens")
    system_prompt: str | None = help_field(None, help=SYSTEM_PROMPT_HELP)
    chat_template: str | None = help_field(None, help=CHAT_TEMPLATE_HELP)
    steps: PositiveInt = help_field(300, help="optimizer steps")
    batch_size: PositiveInt = help_field(
        32, help="rollouts per step (every response prefix of each is a target)"
    )
    lr: LearningRate = help_field(3e-4, help="AdamW learning rate (constant after a 5% linear warmup)")
    weight_decay: NonNegativeFloat = help_field(0.0, help="AdamW weight decay")
    max_grad_norm: float = help_field(1.0, help="gradient clipping norm; 0 disables", ge=0)
    top_k: PositiveInt = help_field(10, help="CD-Q: base top-k children of each prefix in the Bellman backup")
    target_update_every: PositiveInt = help_field(
        25, help="CD-Q: copy V into the target network V̄ every N steps"
    )
    eval_fraction: Fraction = help_field(0.1, help="fraction of rollouts held out for the validation loss")
    generation_batch_size: PositiveInt = help_field(
        64, help="prompts per generate call when sampling rollouts"
    )
    log_every: PositiveInt = help_field(20, help="record the training loss every N steps (metrics.json)")
    seed: Seed = help_field(0, help="seed of the prompt order, rollouts, head init and batches")
    device: Device = help_field("auto", help="auto (cuda if available) | cpu | cuda | cuda:N")


# ---------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainScorerResult:
    output_dir: Path
    metrics: dict[str, Any]  # as metrics.json


@torch.no_grad()
def evaluate_scorer(
    scorer: PrefixScorer,
    rollouts: Sequence[Rollout],
    pad_id: int,
    method: str,
    target: PrefixScorer | None,
    k: int,
    batch_size: int = 32,
) -> dict[str, float | None]:
    """Mean losses over rollouts: the method's own loss, the MSE to the final reward at every prefix (the FUDGE
    loss, comparable across methods) and at the terminal prefix only. None when there are no rollouts."""
    if not rollouts:
        return {"loss": None, "mse_to_return": None, "terminal_mse": None}
    sums = {"loss": 0.0, "mse_to_return": 0.0, "terminal_mse": 0.0}
    counts = {"loss": 0, "mse_to_return": 0, "terminal_mse": 0}
    device = scorer.device
    for start in range(0, len(rollouts), batch_size):
        batch = {
            key: v.to(device)
            for key, v in batch_tensors(rollouts[start : start + batch_size], pad_id, k).items()
        }
        values = scorer(batch["input_ids"], batch["attention_mask"]).values  # (B, T)
        returns = batch["rewards"][:, None].expand_as(values)
        own = scorer_targets(method, batch, target)
        for name, tgt, mask in (
            ("loss", own, batch["value_mask"]),
            ("mse_to_return", returns, batch["value_mask"]),
            ("terminal_mse", returns, batch["terminal"]),
        ):
            sq = (values - tgt.to(values.dtype)) ** 2
            sums[name] += torch.where(mask, sq, torch.zeros_like(sq)).sum().item()
            counts[name] += int(mask.sum().item())
    return {name: sums[name] / counts[name] for name in sums}


def train_prefix_scorer(cfg: TrainScorerConfig, show_progress: bool = True) -> TrainScorerResult:
    """Sample rollouts from the base model, score them, train V by CD-FUDGE or CD-Q, save atomically.

    metrics.json: rollout statistics (reward mean/std — the std² is the MSE of the best constant predictor),
    held-out losses before and after training, the loss history, seconds.
    """
    check_scorer_spec(cfg.reward, "reward")
    check_model_dir(cfg.model)
    prompts = load_prompts(cfg.prompts, cfg.prompts_split, cfg.max_prompts)
    started = time.time()
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id

    k = cfg.top_k if cfg.method == "q" else 0
    rollouts = _rollouts(cfg, tokenizer, prompts, device, k)
    rng = random.Random(cfg.seed + 1)
    idx = list(range(len(rollouts)))
    rng.shuffle(idx)
    n_eval = round(cfg.eval_fraction * len(idx))
    eval_set = [rollouts[i] for i in idx[:n_eval]]
    train_set = [rollouts[i] for i in idx[n_eval:]]

    scorer = PrefixScorer.from_base(cfg.model, tokenizer, cfg.seed).to(device)
    target = _frozen_copy(scorer) if cfg.method == "q" else None
    kk = max(k, 1)
    scorer.model.eval()
    before = evaluate_scorer(scorer, eval_set, pad_id, cfg.method, target, kk)
    history = _fit(cfg, scorer, target, train_set, pad_id, kk, show_progress)
    scorer.model.eval()
    after = evaluate_scorer(scorer, eval_set, pad_id, cfg.method, target, kk)
    after_train = evaluate_scorer(scorer, train_set, pad_id, cfg.method, target, kk)
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)  # (n,)
    metrics = {
        "method": cfg.method,
        "reward": cfg.reward,
        "n_rollouts": len(rollouts),
        "n_train": len(train_set),
        "n_heldout": len(eval_set),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else None,
        "mean_response_tokens": sum(r.seq.response_len for r in rollouts) / len(rollouts),
        "heldout_before": before,
        "heldout_after": after,
        "train_after": after_train,
        "steps": cfg.steps,
        "history": history,
        "seconds": round(time.time() - started, 2),
    }
    scorer.meta.update(
        {
            "method": cfg.method,
            "reward": cfg.reward,
            "base_fingerprint": fingerprint_model(cfg.model),
            "tokenizer_fingerprint": fingerprint_tokenizer(tokenizer),
            "max_prompt_length": cfg.max_prompt_length,
            "max_new_tokens": cfg.max_new_tokens,
            "top_k": cfg.top_k if cfg.method == "q" else None,
            "prompt_format": PromptFormat.from_fields(cfg.system_prompt, cfg.chat_template).to_json(),
        }
    )
    out = scorer.to("cpu").save(
        cfg.output_dir,
        tokenizer,
        {"metrics.json": json.dumps(metrics, indent=2) + "\n", "config.yaml": to_yaml(cfg)},
    )
    log.info(
        "prefix scorer (%s) → %s; held-out MSE to the return: %s → %s",
        cfg.method,
        out,
        before["mse_to_return"],
        after["mse_to_return"],
    )
    return TrainScorerResult(out, metrics)


def _rollouts(
    cfg: TrainScorerConfig, tokenizer: Any, prompts: list[Any], device: torch.device, k: int
) -> list[Rollout]:
    """cfg.n_rollouts base-model samples scored by cfg.reward (+ the base top-k when k > 0); the base model and
    the reward are released before training."""
    fmt = PromptFormat.from_fields(cfg.system_prompt, cfg.chat_template)
    log_first_prompt(log, tokenizer, prompts[0], fmt)
    base = load_model(cfg.model).to(device).eval()
    reward = resolve_scorer(cfg.reward, device=device, view="auto")  # a cost model's view is its cost
    log.info("sampling %d rollouts from %s", cfg.n_rollouts, cfg.model)
    rollouts, _ = sample_rollouts(
        base,
        tokenizer,
        prompts,
        reward,
        cfg.n_rollouts,
        cfg.max_new_tokens,
        cfg.max_prompt_length,
        cfg.seed,
        cfg.generation_batch_size,
        top_k=k,
        prompt_format=fmt,
    )
    del base, reward
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    return rollouts


def _frozen_copy(scorer: PrefixScorer) -> PrefixScorer:
    model = copy.deepcopy(scorer.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return PrefixScorer(model, scorer.meta, name=scorer.name + "(target)")


def _fit(
    cfg: TrainScorerConfig,
    scorer: PrefixScorer,
    target: PrefixScorer | None,
    train_set: list[Rollout],
    pad_id: int,
    k: int,
    show_progress: bool,
) -> list[dict[str, float]]:
    """cfg.steps steps of the masked MSE to the method's targets on batches drawn without replacement (reshuffled
    by `random.Random(seed + 2)` when the pool runs out); CD-Q refreshes the target network every
    target_update_every steps. Returns the loss history."""
    if not train_set:
        raise ConfigError("no training rollouts left after the held-out split; raise n_rollouts")
    device = scorer.device
    scorer.model.train()
    stepper = Stepper(
        [p for p in scorer.model.parameters() if p.requires_grad],
        cfg.lr,
        warmup_constant(max(1, math.ceil(0.05 * cfg.steps))),
        cfg.weight_decay,
        cfg.max_grad_norm,
        name="prefix scorer",
    )
    rng = random.Random(cfg.seed + 2)
    order: list[int] = []

    def loss_fn(step: int) -> tuple[torch.Tensor, None]:
        nonlocal order
        if target is not None and step > 0 and step % cfg.target_update_every == 0:
            target.model.load_state_dict(scorer.model.state_dict())
        if len(order) < cfg.batch_size:
            fresh = list(range(len(train_set)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = {
            key: v.to(device) for key, v in batch_tensors([train_set[i] for i in idx], pad_id, k).items()
        }
        targets = scorer_targets(cfg.method, batch, target)  # (B, T)
        values = scorer(batch["input_ids"], batch["attention_mask"]).values  # (B, T)
        return masked_mse(values, targets, batch["value_mask"]), None

    desc = f"prefix scorer ({cfg.method})"
    return fit(stepper, cfg.steps, loss_fn, desc, cfg.log_every, show_progress).history
