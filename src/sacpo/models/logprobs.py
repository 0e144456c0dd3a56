"""Sequence log-probabilities of responses under a causal LM (one forward pass per batch)."""

from __future__ import annotations

from typing import Any

import torch

from sacpo.math.logprobs import IGNORE_INDEX, masked_mean, masked_sum, token_logprobs


def response_token_logps(model: Any, batch: dict[str, torch.Tensor], chunk_size: int = 256) -> torch.Tensor:
    """log π(y_t | x, y_<t) for every position, 0 outside the response.

    batch: input_ids (N, T), attention_mask (N, T), labels_mask (N, T−1) from `pad_sequences`. Returns (N, T−1).
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits  # (N, T, V)
    labels = batch["input_ids"][:, 1:].masked_fill(~batch["labels_mask"], IGNORE_INDEX)  # (N, T−1)
    return token_logprobs(logits[:, :-1], labels, chunk_size=chunk_size)  # (N, T−1)


def sequence_logps(
    model: Any, batch: dict[str, torch.Tensor], chunk_size: int = 256, average: bool = False
) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over response tokens (or the per-token mean). Returns (N,)."""
    token_logps = response_token_logps(model, batch, chunk_size)  # (N, T−1)
    reduce = masked_mean if average else masked_sum
    return reduce(token_logps, batch["labels_mask"])
