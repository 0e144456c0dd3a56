"""Batched ancestral sampling from a causal LM (no top-k/top-p truncation, so samples follow π exactly)."""

from __future__ import annotations

from typing import Any

import torch

from sacpo.data.tokenize import Encoded


@torch.no_grad()
def sample(
    model: Any,
    prompts: list[list[int]],
    eos_id: int,
    pad_id: int,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> list[Encoded]:
    """Draw n responses per prompt; one `generate` call per batch of prompts (left-padded).

    Returns len(prompts)·n sequences in prompt-major order, each prompt + response (ending at its first EOS,
    which is kept, or cut at max_new_tokens).
    """
    device = next(model.parameters()).device
    out: list[Encoded] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (b, P) left-padded
        attn = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )  # (b·n, P + new)
        new_tokens = gen[:, width:].cpu().tolist()
        for j, toks in enumerate(new_tokens):
            if eos_id in toks:
                toks = toks[: toks.index(eos_id) + 1]
            prompt = chunk[j // n]
            out.append(Encoded(tuple(prompt) + tuple(toks), len(prompt)))
    return out
