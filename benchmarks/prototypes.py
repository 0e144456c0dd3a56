"""PROTOTYPES measured next to sacpo, as evidence for proposed changes (not used by sacpo itself).

`fused_sequence_logps` — a drop-in for `sacpo.models.logprobs.sequence_logps` that never builds the (N, T, V)
logits: it runs the backbone, keeps the hidden states of response positions only (prompt and padding tokens need
no log-prob), and projects them through the LM head in row chunks under activation checkpointing, so each chunk's
(c, V) logits live only inside that chunk's forward and its recomputation in backward. Same log-probs (fp32).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from sacpo.math.logprobs import masked_mean, masked_sum

ROWS_PER_CHUNK = 256


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # (c, V)
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (c,)


def _plain_head(model: Any) -> bool:
    """Only models whose logits are exactly hidden @ W.T (no bias, scale or soft-cap) take the fused path."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings()
    scaled = any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    return head is not None and getattr(head, "bias", None) is None and not scaled


def fused_sequence_logps(
    model: Any, batch: dict[str, torch.Tensor], chunk_size: int = 256, average: bool = False
) -> torch.Tensor:
    """log π(y|x) summed (or averaged) over response tokens, as `sequence_logps`. Returns (N,)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft → the causal LM
    if not _plain_head(base):
        from sacpo.models.logprobs import sequence_logps

        return sequence_logps(model, batch, chunk_size, average)
    hidden = base.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (N, T, H)
    mask = batch["labels_mask"]  # (N, T−1)
    h = hidden[:, :-1][mask]  # (M, H): response positions only
    labels = batch["input_ids"][:, 1:][mask]  # (M,)
    weight = base.get_output_embeddings().weight  # (V, H)
    parts = [
        checkpoint(
            _chunk_logps,
            h[s : s + ROWS_PER_CHUNK],
            weight,
            labels[s : s + ROWS_PER_CHUNK],
            use_reentrant=False,
        )
        for s in range(0, h.shape[0], ROWS_PER_CHUNK)
    ]
    flat = torch.cat(parts) if parts else h.new_zeros(0)
    token_logps = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)
    return (masked_mean if average else masked_sum)(token_logps, mask)  # (N,)


def install_fused_logps() -> None:
    """Route the training loop's policy log-probs through the prototype (the loop imports the name)."""
    from sacpo.train import loop

    loop.sequence_logps = fused_sequence_logps
