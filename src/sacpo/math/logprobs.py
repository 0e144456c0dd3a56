"""Per-token log-probabilities of labels without a full-vocabulary log_softmax tensor.

log p(y_t | y_<t) = z_t[y_t] − logsumexp_v z_t[v]

Gathering the label logit and subtracting the logsumexp avoids the (B, T, V) log_softmax output; processing the
sequence in chunks bounds the temporary that logsumexp needs to (B, chunk, V).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 256, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Log-probability of each label under the logits at the same position.

    logits: (B, T, V) — already aligned with labels (shift before calling: logits[:, :-1] with labels[:, 1:]).
    labels: (B, T) int64, `ignore_index` where there is no label. Returns (B, T) float; 0 at ignored positions.
    Computed in float32 (bf16 logsumexp loses ~2 digits).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = labels != ignore_index  # (B, T)
    safe_labels = labels.masked_fill(~mask, 0)  # (B, T)
    out = []
    for start in range(0, logits.shape[1], chunk_size):
        chunk = logits[:, start : start + chunk_size].float()  # (B, c, V)
        lab = safe_labels[:, start : start + chunk_size]  # (B, c)
        picked = chunk.gather(-1, lab.unsqueeze(-1)).squeeze(-1)  # (B, c)
        out.append(picked - torch.logsumexp(chunk, dim=-1))  # (B, c)
    logps = torch.cat(out, dim=1) if out else logits.new_zeros(labels.shape, dtype=torch.float32)
    return logps.masked_fill(~mask, 0.0)  # (B, T)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t values[b, t]·mask[b, t]. values, mask: (B, T) → (B,). Masked positions are ignored even if inf/NaN."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum(dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average over the sequence: Σ_t v·m / max(1, Σ_t m). (B, T) → (B,)."""
    return masked_sum(values, mask) / mask.to(values.dtype).sum(dim=-1).clamp(min=1.0)
