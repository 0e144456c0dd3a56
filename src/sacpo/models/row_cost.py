"""What a batch of rows costs a decoder forward, to choose between shared-prompt rows and two padded rows per pair.

Shared-prompt rows (`sacpo.data.tokenize.pack_pairs`) run each pair as one row prompt + chosen + rejected: the
prompt's p tokens pass the dense layers once instead of twice, but the row is p + c + r long instead of
max(p + c, p + r), and both layouts attend through an explicit mask over their whole padded width. Per layer and
row of width W (forward; the backward scales both terms alike, so it does not change the choice):

    dense  ≈ W · 2 · N_layer      (2 FLOPs per multiply-add of the block's N_layer weights, padding included)
    attention ≈ W² · 4 · H        (QKᵀ and the weighted sum of V, 2·H each per query-key pair, masked or not)

so a batch costs Σ_rows W·lin + W²·att with lin = 2·N_blocks (all blocks' weights, embeddings excluded: the
embedding is a lookup, and the LM head sees the same response positions in both layouts) and att = 4·H·L. Packing
pays when prompts are a large part of each sequence; with long responses behind a short prompt the quadratic term
loses it. Measured on the tiny GPT-2 with 1024 positions (H 64, batch 4 pairs, prompts ≤ 128 tokens, 1 thread):
packed ÷ padded step time 0.78 at max_length 256, 1.27 at 512, 1.55 at 1024; the model above predicts 0.80 /
1.10 / 1.37 on those batches (the mean over 5 steps), the same choice in all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sacpo.data.tokenize import Encoded, packed_length


@dataclass(frozen=True)
class RowCost:
    """lin: FLOPs per token through the blocks; att: FLOPs per query-key pair (all layers), forward."""

    lin: float
    att: float

    @classmethod
    def of(cls, model: Any) -> RowCost | None:
        """From the model's config (hidden_size, num_hidden_layers; transformers maps GPT-2's n_embd / n_layer)
        and its parameter count less the input (and an untied output) embedding; None where the config does not
        say (the caller keeps shared-prompt rows, as before this cost model)."""
        base = getattr(model, "module", model)  # DDP / DeepSpeed wrappers hold the model in .module
        config = getattr(base, "config", None)
        hidden = getattr(config, "hidden_size", None)
        layers = getattr(config, "num_hidden_layers", None)
        if not isinstance(hidden, int) or not isinstance(layers, int) or hidden <= 0 or layers <= 0:
            return None
        total = sum(p.numel() for p in base.parameters())
        embeddings = {id(m.weight): m.weight.numel() for m in _embeddings(base) if m is not None}
        blocks = total - sum(embeddings.values())
        return cls(lin=2.0 * max(blocks, 0), att=4.0 * hidden * layers)

    def rows(self, widths: list[int]) -> float:
        """Σ_w (w·lin + w²·att): the forward FLOPs of rows of these padded widths."""
        return sum(w * self.lin + w * w * self.att for w in widths)

    def batched(self, lengths: list[int], per_batch: int) -> float:
        """The FLOPs of rows of these lengths cut, in order, into batches of `per_batch`, each padded to its
        longest row."""
        return sum(
            self.rows([max(lengths[i : i + per_batch])] * len(lengths[i : i + per_batch]))
            for i in range(0, len(lengths), per_batch)
        )


def packing_pays(
    cost: RowCost | None, pairs: list[tuple[Encoded, Encoded]], batch_size: int | None = None
) -> bool:
    """Whether `pairs` (sharing their prompt) cost fewer FLOPs as shared-prompt rows than as two padded rows per pair.

    batch_size None: the pairs are one batch, b rows of width max(p + c + r) against 2b rows of width
    max(p + c, p + r) (the training step). Otherwise the reference pass's batching (`compute_ref_logps`): pairs
    sorted by packed length, batch_size // 2 per batch, against the sequences sorted by length, batch_size per
    batch. No cost model (None): True, shared-prompt rows as before the cost model."""
    if cost is None:
        return True
    packed = sorted(packed_length(a, b) for a, b in pairs)
    padded = sorted(len(e.input_ids) for pair in pairs for e in pair)
    if batch_size is None:
        return cost.batched(packed, len(packed)) < cost.batched(padded, len(padded))
    return cost.batched(packed, max(1, batch_size // 2)) < cost.batched(padded, batch_size)


def _embeddings(model: Any) -> list[Any]:
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [inputs, outputs]
