"""Parts shared by the controlled decoders: a model and its KV cache fed incrementally over a batch of rows that
can be dropped, reordered or expanded k-fold (`KVStream`, token-wise CD), the forward adapters of the base model and
of a prefix scorer, and `combined` / `combined_final_values` (V = V_r ± λ·V_2 over the scorers' values)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from sacpo.data.tokenize import Encoded
from sacpo.math.decoding import combine_values
from sacpo.models.modules import cache_kwargs, output_cache
from sacpo.models.prefix_value import PrefixScorer, positions_from_mask


class KVStream:
    """A model fed incrementally over a left-padded batch with a KV cache; rows can be reordered/expanded.

    `forward(ids, attn, positions, cache) -> (outputs (B, T, ...), cache)` wraps the model (`base_forward`,
    `scorer_forward`); the stream holds its own cache and attention mask and never modifies the model."""

    def __init__(
        self, forward: Callable[..., tuple[torch.Tensor, Any]], ids: torch.Tensor, attn: torch.Tensor
    ) -> None:
        self._forward = forward
        positions = positions_from_mask(attn)  # (B, P)
        out, self.cache = forward(ids, attn, positions, None)
        self.attn = attn  # (B, L)
        self.next_pos = positions[:, -1] + 1  # (B,)
        self.last = out[:, -1]  # (B, ...) output at the last fed token

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the output at it."""
        self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], dim=1)
        out, self.cache = self._forward(tokens[:, None], self.attn, self.next_pos[:, None], self.cache)
        self.next_pos = self.next_pos + 1
        self.last = out[:, -1]
        return self.last

    def reorder(self, idx: torch.Tensor) -> None:
        """Keep/duplicate rows: new row i = old row idx[i] (cache included)."""
        self.cache.reorder_cache(idx)
        self.attn, self.next_pos, self.last = self.attn[idx], self.next_pos[idx], self.last[idx]


def base_forward(model: Any) -> Callable[..., tuple[torch.Tensor, Any]]:
    """(ids, attn, positions, cache) → (logits at the last position (B, 1, V) float32, cache)."""

    def forward(ids, attn, positions, cache):
        out = model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
        return out.logits.float(), output_cache(out)  # (B, 1, V)

    return forward


def scorer_forward(scorer: PrefixScorer) -> Callable[..., tuple[torch.Tensor, Any]]:
    """(ids, attn, positions, cache) → (values V(x, ids[:, :t+1]) (B, T), cache)."""

    def forward(ids, attn, positions, cache):
        out = scorer(ids, attn, position_ids=positions, past_key_values=cache, use_cache=True)
        return out.values, out.past_key_values  # (B, T)

    return forward


def combined(values: list[torch.Tensor], lam: float, combine: str) -> torch.Tensor:
    """V = V_r + λ·V_g (combine "safety") or V_r − λ·V_c ("cost") from the per-scorer values [V_r, (V_2)]."""
    return combine_values(values[0], values[1] if len(values) > 1 else None, lam, combine)


@torch.no_grad()
def combined_final_values(
    scorers: Sequence[PrefixScorer],
    seqs: Sequence[Encoded],
    pad_id: int,
    lam: float,
    combine: str,
    batch_size: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(combined, per-scorer) values V(x, y) of whole sequences, (N,) each on the CPU."""
    each = [s.final_values(seqs, pad_id, batch_size) for s in scorers]
    return combined(each, lam, combine), each
