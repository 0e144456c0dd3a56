"""Candidate pools for best-of-n: M i.i.d. responses per prompt from ONE batched `sacpo.models.generate.sample` call
(each prompt prefilled once) per prompt batch, with the base log-prob of each sampled token-id sequence, and their
scores (`Scores`: every distinct response scored once).

Layout of a pool (`CandidatePool`): per prompt, M = S·(N + 1) responses; candidate j of draw s is response s·N + j
(j < N), and response S·N + s is an independent base sample (the win-rate opponent of draw s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from sacpo.data.prompt_format import DEFAULT_FORMAT, PromptFormat
from sacpo.data.records import Prompt
from sacpo.data.tokenize import Encoded, encode_prompt
from sacpo.models.generate import sample
from sacpo.models.logprobs import batched_sequence_logps
from sacpo.rng import torch_seeded
from sacpo.scoring.base import run_scorer


@dataclass
class CandidatePool:
    """M = S·(N + 1) sampled responses per prompt (layout in the module docstring) and their base log-probs.

    responses: P lists of M texts; logp (P, M) float64 = log p(y|x) of the sampled ids; response_tokens (P, M)
    long; finished (P, M) bool (ended with EOS); roundtrip (P, M) bool (re-encoding the text gives the ids).
    """

    prompts: list[Prompt]
    responses: list[list[str]]
    logp: torch.Tensor
    response_tokens: torch.Tensor
    finished: torch.Tensor
    roundtrip: torch.Tensor
    n_draws: int  # S
    group_size: int  # N

    @property
    def width(self) -> int:
        return self.n_draws * (self.group_size + 1)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """(P, M) per-response values → (P, S, N) candidates of each draw."""
        s, n = self.n_draws, self.group_size
        return x[:, : s * n].reshape(x.shape[0], s, n)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """(P, M) → (P, S): the independent base sample of each draw."""
        return x[:, self.n_draws * self.group_size :]

    def global_index(self, chosen: torch.Tensor) -> torch.Tensor:
        """(P, S) index within each draw → (P, S) column in the (P, M) layout."""
        return chosen + self.group_size * torch.arange(self.n_draws).unsqueeze(0)

    def distinct_ids(self) -> torch.Tensor:
        """(P, M) long: per prompt, the column of the first response with the same text (equal ids = the same
        response, scored alike by every scorer; `sacpo.infer.bon_stats` tells discrete scores from repeats by it)."""
        ids = []
        for ys in self.responses:
            first: dict[str, int] = {}
            ids.append([first.setdefault(y, j) for j, y in enumerate(ys)])
        return torch.tensor(ids, dtype=torch.long).view(len(self.prompts), self.width)

    def base_columns(self) -> torch.Tensor:
        """(P, S) global columns of the independent base samples."""
        base = self.n_draws * self.group_size + torch.arange(self.n_draws)
        return base.unsqueeze(0).expand(len(self.prompts), -1)


@dataclass(frozen=True)
class Scores:
    """(P, M) per-response values: the selection scorers and (optionally) the gold oracle."""

    reward: torch.Tensor
    safety: torch.Tensor | None = None
    gold_reward: torch.Tensor | None = None
    gold_safety: torch.Tensor | None = None
    gold_safe: torch.Tensor | None = None  # bool


def _decode(tokenizer: Any, response_ids: Sequence[int], eos_id: int) -> tuple[str, bool, bool]:
    """(text without the final EOS, finished, roundtrip)."""
    ids = list(response_ids)
    finished = bool(ids) and ids[-1] == eos_id
    text_ids = ids[:-1] if finished else ids
    text = tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text, finished, tokenizer(text, add_special_tokens=False)["input_ids"] == text_ids


def sample_candidates(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    n_draws: int,
    group_size: int,
    max_new_tokens: int = 64,
    batch_size: int = 4,
    seed: int = 0,
    max_prompt_length: int = 256,
    logp_batch_size: int = 64,
    show_progress: bool = False,
    prompt_format: PromptFormat = DEFAULT_FORMAT,
) -> CandidatePool:
    """Draw M = n_draws·(group_size + 1) responses per prompt — one `sample` call (n = M) per
    batch of `batch_size` prompts — and their base log-probs (one more forward pass per log-prob batch).

    The draws use the global RNG seeded with `seed` inside `torch.random.fork_rng` (`sacpo.models.generate.sample`
    draws from the global RNG only), so the caller's RNG state is left as it was. Prompts are rendered with
    `prompt_format`."""
    if not prompts:
        raise ValueError("no prompts")
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    limit = max_prompt_length if context is None else min(max_prompt_length, context - max_new_tokens)
    if limit < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in context {context}")
    prompt_ids = [encode_prompt(tokenizer, p, limit, fmt=prompt_format) for p in prompts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    m = n_draws * (group_size + 1)
    seqs: list[Encoded] = []
    with torch_seeded(seed):
        starts = range(0, len(prompt_ids), batch_size)
        for start in tqdm(starts, desc=f"bon sample ×{m}", disable=not show_progress):
            chunk = prompt_ids[start : start + batch_size]
            seqs += sample(
                model, chunk, eos, pad, n=m, max_new_tokens=max_new_tokens, batch_size=len(chunk)
            )  # one sample call: len(chunk)·m sequences, prompt-major
    logp = batched_sequence_logps(
        model, seqs, pad, logp_batch_size, dedup=True, show_progress=show_progress, desc="bon log-probs"
    ).view(len(prompts), m)  # (P, M)
    decoded = [_decode(tokenizer, s.input_ids[s.prompt_len :], eos) for s in seqs]
    return CandidatePool(
        prompts=list(prompts),
        responses=[[d[0] for d in decoded[i * m : (i + 1) * m]] for i in range(len(prompts))],
        logp=logp,
        response_tokens=torch.tensor([s.response_len for s in seqs]).view(len(prompts), m),
        finished=torch.tensor([d[1] for d in decoded]).view(len(prompts), m),
        roundtrip=torch.tensor([d[2] for d in decoded]).view(len(prompts), m),
        n_draws=n_draws,
        group_size=group_size,
    )


def score_pool(
    scorer: Any, pool: CandidatePool, chunk: int = 4096, show_progress: bool = False
) -> torch.Tensor:
    """Scores (P, M) float64 of every response; each distinct (prompt, response) is scored once
    (`sacpo.scoring.run_scorer`: one score per response, all finite)."""
    unique: dict[tuple[int, str], int] = {}
    where = [[unique.setdefault((i, y), len(unique)) for y in ys] for i, ys in enumerate(pool.responses)]
    keys = list(unique)
    values = []
    name = getattr(scorer, "name", "scorer")
    for start in tqdm(range(0, len(keys), chunk), desc=f"bon score {name}", disable=not show_progress):
        part = keys[start : start + chunk]
        values.append(run_scorer(scorer, [pool.prompts[i] for i, _ in part], [y for _, y in part]))
    flat = torch.cat(values)
    return flat[torch.tensor(where, dtype=torch.long)]  # (P, M)
