"""Base-model log-probs of sampled token-id sequences, batched: the one length-sorted helper of `sacpo.infer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from sacpo.data.tokenize import Encoded, pad_sequences
from sacpo.models.logprobs import sequence_logps


@torch.no_grad()
def base_logps(
    model: Any,
    seqs: Sequence[Encoded],
    pad_id: int,
    batch_size: int = 64,
    show_progress: bool = False,
    desc: str = "log-probs",
) -> torch.Tensor:
    """log p(response | prompt) = Σ_t log p(y_t | x, y_<t) of each sequence from its token ids, (N,) float64 on the
    CPU. Identical sequences are scored once; batches are sorted by length to limit padding."""
    device = next(model.parameters()).device
    unique: dict[tuple[int, tuple[int, ...]], int] = {}
    where = [unique.setdefault((s.prompt_len, s.input_ids), len(unique)) for s in seqs]
    keys = list(unique)
    order = sorted(range(len(keys)), key=lambda i: len(keys[i][1]))
    values = torch.empty(len(keys), dtype=torch.float64)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=not show_progress):
        idx = order[start : start + batch_size]
        batch = pad_sequences([Encoded(keys[i][1], keys[i][0]) for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        values[idx] = sequence_logps(model, batch).double().cpu()  # (b,)
    return values[torch.tensor(where, dtype=torch.long)]  # (N,)
