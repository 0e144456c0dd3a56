"""Sequence log-probabilities of responses under a causal LM (one forward pass per batch).

Two paths give the same numbers (fp32 log-softmax of the same logits):
- full: `model(...).logits` (N, T, V), then `token_logprobs` (gather − logsumexp, chunked over T);
- fused LM head: run the backbone only, keep the hidden states of response positions (prompt and padding need no
  log-prob) and project them through the output embedding in row chunks under activation checkpointing, so no
  (N, T, V) tensor — nor its gradient — is ever built; each chunk's (c, V) logits live only inside its forward
  and its recomputation in backward. On SmolLM2-135M (V = 49 152) this is the difference between 93 MB of logits
  per copy at 4 × 118 tokens and ~10 MB (benchmarks/RESULTS.md).
`sequence_logps` takes the fused path for vocabularies of at least `FUSED_MIN_VOCAB` tokens when the head is a
plain bias-free linear map (no logit scale or soft-capping, no adapter on the head); small vocabularies are
overhead-bound and keep the full path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from sacpo.math.logprobs import IGNORE_INDEX, masked_mean, masked_sum, token_logprobs

FUSED_MIN_VOCAB = 4096


def _plain_lm_head(model: Any) -> torch.nn.Linear | None:
    """The output projection if logits are exactly backbone_hidden @ W.T, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft → the causal LM
    backbone = getattr(base, "base_model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or backbone is base or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    return head


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # (c, V)
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (c,)


def _fused_token_logps(
    model: Any, head: torch.nn.Linear, batch: dict[str, torch.Tensor], chunk_size: int
) -> torch.Tensor:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (N, T, H)
    mask = batch["labels_mask"]  # (N, T−1)
    h = hidden[:, :-1][mask]  # (M, H): response positions only
    labels = batch["input_ids"][:, 1:][mask]  # (M,)
    grad = torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad)
    parts = [
        checkpoint(
            _chunk_logps, h[s : s + chunk_size], head.weight, labels[s : s + chunk_size], use_reentrant=False
        )
        if grad
        else _chunk_logps(h[s : s + chunk_size], head.weight, labels[s : s + chunk_size])
        for s in range(0, h.shape[0], chunk_size)
    ]  # each (c,)
    flat = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)  # (M,)
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(
        mask, flat
    )  # (N, T−1)


def response_token_logps(
    model: Any, batch: dict[str, torch.Tensor], chunk_size: int = 256, fused: bool | None = None
) -> torch.Tensor:
    """log π(y_t | x, y_<t) for every position, 0 outside the response.

    batch: input_ids (N, T), attention_mask (N, T), labels_mask (N, T−1) from `pad_sequences`. Returns (N, T−1)
    float32. fused: None = automatic (see the module docstring), True = fused LM head when the head allows it,
    False = full logits. chunk_size bounds the logits temporary: sequence positions (full) or rows (fused).
    """
    head = _plain_lm_head(model) if fused is not False else None
    if head is not None and (fused or head.weight.shape[0] >= FUSED_MIN_VOCAB):
        return _fused_token_logps(model, head, batch, chunk_size)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits  # (N, T, V)
    labels = batch["input_ids"][:, 1:].masked_fill(~batch["labels_mask"], IGNORE_INDEX)  # (N, T−1)
    return token_logprobs(logits[:, :-1], labels, chunk_size=chunk_size)  # (N, T−1)


def sequence_logps(
    model: Any,
    batch: dict[str, torch.Tensor],
    chunk_size: int = 256,
    average: bool = False,
    fused: bool | None = None,
) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over response tokens (or the per-token mean). Returns (N,)."""
    token_logps = response_token_logps(model, batch, chunk_size, fused)  # (N, T−1)
    reduce = masked_mean if average else masked_sum
    return reduce(token_logps, batch["labels_mask"])
