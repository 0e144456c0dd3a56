"""log π(response | prompt) of sampled sequences with every distinct prompt run once, through the KV cache.

An evaluation scores S samples of each prompt under a model (and every model's samples under the same SFT
reference). A forward pass per sequence (`sacpo.models.logprobs.batched_sequence_logps`) runs each prompt S times;
on short responses the prompts are most of the work. `PromptCachedLogps` prefills each batch of distinct prompts
once (left-padded, as `sacpo.models.generate.sample_chunk` does), keeps its KV cache and last-position logits, and
runs only the responses after it, each row on a copy of its prompt's cache:

    log π(y|x) = Σ_t log softmax(z_t)[y_t],   z_1 = the prefill's last logits, z_t (t ≥ 2) = the response forward's

The values are those of the full pass up to float rounding (tested). Prefills are kept across calls up to
`max_cache_bytes` (first come, never evicted): the models of an evaluation share one reference and one prompt
set, so the reference prefills each batch of prompts once per evaluation, not once per model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sacpo.data.tokenize import Encoded
from sacpo.math.logprobs import IGNORE_INDEX, token_logprobs
from sacpo.models.generate import _inner, left_pad
from sacpo.models.modules import cache_kwargs, output_cache


@dataclass
class _Prefill:
    cache: Any  # the KV cache of the b prompts (never run on: copied per use)
    last: torch.Tensor  # (b, V) float32 logits at each prompt's last position
    attn: torch.Tensor  # (b, P) left-padded attention mask
    next_pos: torch.Tensor  # (b,) position of the first response token
    nbytes: int


def _cache_bytes(cache: Any) -> int:
    layers = getattr(cache, "layers", None) or []
    return sum(
        t.numel() * t.element_size()
        for layer in layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )


class PromptCachedLogps:
    """Sequence log-probs under `model` (module docstring); `max_cache_bytes` bounds the prefills kept."""

    def __init__(self, model: Any, pad_id: int, max_cache_bytes: int = 256 << 20) -> None:
        self.model, self.pad_id, self.max_cache_bytes = model, pad_id, max_cache_bytes
        self._prefills: dict[tuple[tuple[int, ...], ...], _Prefill] = {}
        self.prefill_runs = 0  # prompt batches prefilled (a kept one is not run again)

    @property
    def cached_bytes(self) -> int:
        return sum(p.nbytes for p in self._prefills.values())

    @torch.no_grad()
    def _prefill(self, prompts: tuple[tuple[int, ...], ...]) -> _Prefill:
        kept = self._prefills.get(prompts)
        if kept is not None:
            return kept
        device = next(self.model.parameters()).device
        ids, attn = (t.to(device) for t in left_pad([list(p) for p in prompts], self.pad_id))  # (b, P)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (b, P)
        out = self.model(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1
        )
        cache = output_cache(out)
        pre = _Prefill(cache, out.logits[:, -1].float(), attn, pos[:, -1] + 1, _cache_bytes(cache))
        self.prefill_runs += 1
        if self.cached_bytes + pre.nbytes <= self.max_cache_bytes:
            self._prefills[prompts] = pre
        return pre

    @torch.no_grad()
    def __call__(self, seqs: Sequence[Encoded], batch_size: int = 16) -> torch.Tensor:
        """log π(response | prompt) of every sequence: (N,) float64 on the CPU. Sequences are grouped by their
        prompt ids; `batch_size` distinct prompts are prefilled together and `batch_size` rows run at a time."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(seqs):
            groups.setdefault(tuple(s.input_ids[: s.prompt_len]), []).append(i)
        values = torch.zeros(len(seqs), dtype=torch.float64)
        prompts = list(groups)
        for start in range(0, len(prompts), batch_size):
            chunk = tuple(prompts[start : start + batch_size])
            pre = self._prefill(chunk)
            rows = [(j, i) for j, p in enumerate(chunk) for i in groups[p] if len(seqs[i].input_ids) > len(p)]
            for r in range(0, len(rows), batch_size):
                part = rows[r : r + batch_size]
                which = [j for j, _ in part]
                responses = [list(seqs[i].input_ids[seqs[i].prompt_len :]) for _, i in part]
                values[[i for _, i in part]] = self._responses(pre, which, responses).double().cpu()
        return values  # (N,)

    def _responses(self, pre: _Prefill, which: list[int], responses: list[list[int]]) -> torch.Tensor:
        """Σ_t log π(y_t | x, y_<t) of each response (r,), row k continuing prompt which[k] of the prefill."""
        device = pre.last.device
        idx = torch.tensor(which, dtype=torch.long, device=device)  # (r,)
        width = max(len(y) for y in responses)
        labels = torch.full((len(responses), width), IGNORE_INDEX, dtype=torch.long)  # (r, R)
        for k, y in enumerate(responses):
            labels[k, : len(y)] = torch.tensor(y, dtype=torch.long)
        labels = labels.to(device)
        first = token_logprobs(pre.last[idx][:, None], labels[:, :1])[:, 0]  # (r,)
        if width == 1:
            return first
        inputs = (
            labels[:, :-1].clamp(min=0).masked_fill(labels[:, :-1] == IGNORE_INDEX, self.pad_id)
        )  # (r, R−1)
        attn = torch.cat([pre.attn[idx], (labels[:, :-1] != IGNORE_INDEX).long()], dim=1)  # (r, P + R − 1)
        pos = pre.next_pos[idx][:, None] + torch.arange(width - 1, device=device)  # (r, R−1)
        cache = copy.deepcopy(pre.cache)
        cache.batch_select_indices(idx)
        logits = self.model(
            input_ids=inputs,
            attention_mask=attn,
            position_ids=pos,
            use_cache=True,
            **cache_kwargs(_inner(self.model), cache),
        ).logits  # (r, R−1, V)
        rest = token_logprobs(logits, labels[:, 1:])  # (r, R−1), 0 past each response's end
        return first + rest.sum(-1)  # (r,)
