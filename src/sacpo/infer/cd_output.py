"""What a controlled decoder returns: the decoded sequences, their per-sequence statistics and the decoding cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sacpo.data.tokenize import Encoded


@dataclass
class DecodeCost:
    """Tokens processed by forward passes (padding excluded), tokens sampled from the base model, and scorer
    calls: values V(x, yᵗ) computed (token-wise: top-k children per step; blockwise: K candidates per round),
    each scorer counted."""

    base_forward_tokens: int = 0
    scorer_forward_tokens: int = 0
    base_sampled_tokens: int = 0
    generated_tokens: int = 0  # tokens of the returned responses
    scorer_calls: int = 0

    def per_generated_token(self) -> dict[str, float | None]:
        """Each count divided by generated_tokens (None when nothing was generated: undefined, not 0)."""
        n = self.generated_tokens
        if n == 0:
            return {"base_forward": None, "scorer_forward": None, "total_forward": None, "base_sampled": None}
        return {
            "base_forward": self.base_forward_tokens / n,
            "scorer_forward": self.scorer_forward_tokens / n,
            "total_forward": (self.base_forward_tokens + self.scorer_forward_tokens) / n,
            "base_sampled": self.base_sampled_tokens / n,
        }


@dataclass
class CDOutput:
    """Decoded sequences (prompt ids + response ids) in input order, with per-sequence statistics."""

    seqs: list[Encoded]
    logp_base: list[float | None]  # log π_base(y|x) (full vocabulary)
    logp_policy: list[float | None]  # log q(y|x) for token-wise CD; None for blockwise
    kl: list[float | None]  # token-wise: Σ_t KL(q_t‖p_t) on the path (exact per step)
    kl_topk: list[float | None]  # token-wise: Σ_t KL(q_t‖p̃_t)
    kl_bound: list[float | None]  # blockwise: n_blocks·(log K − (K−1)/K)
    n_blocks: list[int | None]
    cost: DecodeCost = field(default_factory=DecodeCost)
    traces: list[list[dict[str, Any]]] | None = None  # token-wise with trace=True: per step candidates/values
