"""Base-model rollouts for training prefix value models: samples, their rewards, the base top-k (CD-Q), batches.

    rollouts, prompts = sample_rollouts(base, tokenizer, prompts, reward, n, max_new_tokens, max_prompt_length,
                                        seed, top_k=k)
    batch = batch_tensors(rollouts[:B], pad_id, k)   # (B, T) ids / masks, (B,) rewards, (B, T, k) children

A rollout's reward r(x, y) is computed once, by any scorer (`sacpo.scoring`); its value is kept in float32 (the
precision the regression targets are built in), then as a Python float.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sacpo.data.prompt_format import DEFAULT_FORMAT, PromptFormat
from sacpo.data.records import Prompt
from sacpo.data.tokenize import Encoded, encode_prompt, pad_sequences
from sacpo.models.prefix_value import decode_response
from sacpo.rng import torch_seeded as seeded
from sacpo.scoring import Scorer


@dataclass(frozen=True)
class Rollout:
    """A base-model sample with its reward and, for CD-Q, the base top-k at every non-terminal prefix."""

    seq: Encoded
    reward: float
    topk_ids: torch.Tensor | None = None  # (R, k): columns prompt_len−1 … len−2 (R = response length)
    topk_logp: torch.Tensor | None = None  # (R, k) full-vocabulary log-probs


@torch.no_grad()
def base_topk(
    model: Any, seqs: Sequence[Encoded], pad_id: int, k: int, batch_size: int = 32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each sequence: (ids, log-probs) (R, k) of the base model's top-k next tokens at columns
    prompt_len−1 … len−2 (every non-terminal response prefix), on the CPU."""
    device = next(model.parameters()).device
    out: list[Any] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids), reverse=True)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pad_sequences([seqs[i] for i in idx], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits  # (b, T, V)
        logp, ids = torch.log_softmax(logits.float(), -1).topk(min(k, logits.shape[-1]), dim=-1)  # (b, T, k)
        for row, i in enumerate(idx):
            s = seqs[i]
            cols = slice(s.prompt_len - 1, len(s.input_ids) - 1)
            out[i] = (ids[row, cols].cpu(), logp[row, cols].cpu())
    return out


def batch_tensors(rollouts: Sequence[Rollout], pad_id: int, k: int) -> dict[str, torch.Tensor]:
    """Padded batch + value mask (every response prefix), terminal mask, rewards and CD-Q children."""
    batch = pad_sequences([r.seq for r in rollouts], pad_id)
    B, T = batch["input_ids"].shape
    value_mask = torch.zeros(B, T, dtype=torch.bool)
    terminal = torch.zeros(B, T, dtype=torch.bool)
    child_ids = torch.full((B, T, k), pad_id, dtype=torch.long)
    child_logp = torch.zeros(B, T, k)
    for b, r in enumerate(rollouts):
        n, p = len(r.seq.input_ids), r.seq.prompt_len
        value_mask[b, p - 1 : n] = True
        terminal[b, n - 1] = True
        if r.topk_ids is not None:
            kk = r.topk_ids.shape[-1]
            child_ids[b, p - 1 : n - 1, :kk] = r.topk_ids
            child_logp[b, p - 1 : n - 1, :kk] = r.topk_logp
            child_logp[b, p - 1 : n - 1, kk:] = -math.inf  # fewer candidates than k (tiny vocabulary)
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
    return {
        **batch,
        "value_mask": value_mask,
        "terminal": terminal,
        "rewards": rewards,
        "child_ids": child_ids,
        "child_logp": child_logp,
    }


def sample_rollouts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    reward: Scorer,
    n: int,
    max_new_tokens: int,
    max_prompt_length: int,
    seed: int,
    batch_size: int = 64,
    top_k: int = 0,
    prompt_format: PromptFormat = DEFAULT_FORMAT,
) -> tuple[list[Rollout], list[Prompt]]:
    """n base-model samples (prompts cycled in a seeded order, rendered with `prompt_format`) scored by `reward`;
    with top_k > 0 also the base top-k at every non-terminal prefix (CD-Q). Returns (rollouts, their prompts)."""
    from sacpo.models.generate import sample

    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    chosen = [prompts[order[i % len(order)]] for i in range(n)]
    cache: dict[str, list[int]] = {}
    prompt_ids = []
    for p in chosen:
        key = json.dumps(p if isinstance(p, str) else list(p), sort_keys=True)
        if key not in cache:
            cache[key] = encode_prompt(tokenizer, p, max_prompt_length, fmt=prompt_format)
        prompt_ids.append(cache[key])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    with seeded(seed):  # generate draws from the global RNG; the caller's state is restored
        seqs = sample(model, prompt_ids, eos, pad, n=1, max_new_tokens=max_new_tokens, batch_size=batch_size)
    texts = [decode_response(tokenizer, s.input_ids[s.prompt_len :], eos)[0] for s in seqs]
    rewards = torch.as_tensor(reward(chosen, texts)).detach().float().double().cpu().reshape(-1)  # (n,)
    if rewards.numel() != len(seqs) or not torch.isfinite(rewards).all():
        raise ValueError(
            f"reward {getattr(reward, 'name', reward)!r} returned bad scores (count or non-finite)"
        )
    tops = base_topk(model, seqs, pad, top_k, batch_size) if top_k > 0 else [(None, None)] * len(seqs)
    rollouts = [
        Rollout(s, float(r), ids, lp) for s, r, (ids, lp) in zip(seqs, rewards.tolist(), tops, strict=True)
    ]
    return rollouts, chosen
