"""Reward / cost models (single or ensembles) as scorers: `RewardModelScorer`.

Texts are encoded with `sacpo.data.tokenize` exactly as the policy sees them (same prompt rendering, same
truncation) and scored at the last attended token (`sacpo.models.reward.sequence_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sacpo.data.records import Prompt
from sacpo.data.tokenize import Encoded, encode, encode_prompt
from sacpo.math.reward import aggregate_scores
from sacpo.models.load import (
    default_device,
    fingerprint_tokenizer,
    load_tokenizer,
)
from sacpo.models.reward import META_FILE, load_reward_model, read_meta, resolve_member_dirs, score_encoded

AGGREGATES = ("mean", "min", "max", "pessimistic")
VIEWS = ("auto", "score", "reward", "cost")


def _prompt_key(prompt: Prompt) -> Any:
    """A hashable key of a prompt (conversations hold dicts)."""
    return prompt if isinstance(prompt, str) else tuple(tuple(sorted(m.items())) for m in prompt)


class RewardModelScorer:
    """Scores (prompt, response) pairs with one reward/cost model or an ensemble.

    `dirs`: one directory or several; an ensemble directory written by `train_reward_model` expands to its
    members. `view`: "score" returns the head output s; "cost" returns c = −s; "reward" returns s; "auto" picks
    "cost" for models trained as cost models, else "score". `aggregate` over members (on the view's scale): "mean",
    "min", "max", or "pessimistic" = the worst case (Coste et al. 2023): min for rewards/scores, max for costs.

    `__call__(prompts, responses)` → (N,) float32 tensor on the CPU. Texts are encoded with
    `sacpo.data.tokenize` and the lengths stored with each model (reward_model.json) unless overridden; scoring
    runs under `torch.inference_mode` in length-sorted batches of `batch_size` sequences. `member_scores` gives
    the (k, N) values before aggregation.
    """

    def __init__(
        self,
        dirs: str | Path | Sequence[str | Path],
        aggregate: str = "mean",
        batch_size: int = 16,
        device: str | torch.device | None = None,
        view: str = "auto",
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> None:
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; valid: {', '.join(AGGREGATES)}")
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; valid: {', '.join(VIEWS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        roots = [dirs] if isinstance(dirs, str | Path) else list(dirs)
        if not roots:
            raise ValueError("no reward model directories given")
        self.dirs = [m for r in roots for m in resolve_member_dirs(r)]
        self.device = torch.device(default_device()) if device is None else torch.device(device)
        self.batch_size = batch_size
        self.models, self.tokenizers, self.lengths = [], [], []
        self._encodings: list[
            tuple[str, int, int]
        ] = []  # (tokenizer fingerprint, max_length, max_prompt_length)
        kinds = set()
        for d in self.dirs:
            meta = read_meta(d)
            kinds.add(meta.get("kind", "reward"))
            lengths = (
                max_length or meta.get("max_length"),
                max_prompt_length or meta.get("max_prompt_length"),
            )
            if None in lengths:
                raise ValueError(
                    f"{d}: no {META_FILE} with max_length/max_prompt_length; pass them explicitly"
                )
            tokenizer = load_tokenizer(d, trust_remote_code)
            model = load_reward_model(d, dtype, trust_remote_code)
            self.models.append(model.to(self.device).eval())
            self.tokenizers.append(tokenizer)
            self.lengths.append(lengths)
            self._encodings.append((fingerprint_tokenizer(tokenizer), *lengths))
        if view == "auto":
            if len(kinds) > 1:
                raise ValueError(f"members mix kinds {sorted(kinds)}; pass view='score' or view='cost'")
            view = "cost" if kinds == {"cost"} else "score"
        self.view = view
        self.sign = -1.0 if view == "cost" else 1.0
        self.aggregate = ("max" if view == "cost" else "min") if aggregate == "pessimistic" else aggregate
        label = "+".join(Path(r).resolve().name for r in roots)
        k = len(self.models)
        self.name = f"{'reward' if view == 'score' else view}:{label}" + (
            f"[{self.aggregate}×{k}]" if k > 1 else ""
        )

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.name!r}, members={len(self.models)}, view={self.view!r})"

    def member_scores(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """(k, N) values on the view's scale (s, or −s for the cost view), one row per member."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        cache: dict[tuple[str, int, int], list[Encoded]] = {}  # members sharing a tokenizer encode once
        rows = []
        for model, tokenizer, key in zip(self.models, self.tokenizers, self._encodings, strict=True):
            if key not in cache:
                _, max_len, max_prompt = key
                prompt_ids: dict[Any, list[int]] = {}
                seqs = []
                for prompt, response in zip(prompts, responses, strict=True):
                    pk = _prompt_key(prompt)
                    if pk not in prompt_ids:
                        prompt_ids[pk] = encode_prompt(tokenizer, prompt, max_prompt)
                    seqs.append(encode(tokenizer, prompt_ids[pk], response, max_len))
                cache[key] = seqs
            rows.append(
                score_encoded(model, cache[key], tokenizer.pad_token_id, self.batch_size, self.device)
            )
        return self.sign * torch.stack(rows)  # (k, N)

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """(N,) aggregated values."""
        return aggregate_scores(self.member_scores(prompts, responses), self.aggregate)
