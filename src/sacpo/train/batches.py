"""A stage's examples: encoded and checked, split into train / held-out, and put in a seeded batch order.

Paired losses (DPO, IPO) take (chosen, rejected) pairs; KTO takes (completion, mismatched completion) pairs with a
desirable flag per example. Both splits and the order of every epoch are functions of the seed only (explicit
generators: no global RNG is drawn from).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from sacpo.config import ConfigError
from sacpo.data.formats import DataError, get_format
from sacpo.data.prompt_format import log_first_prompt
from sacpo.data.tokenize import Encoded, encode_binary, encode_paired
from sacpo.math.preference import get_loss
from sacpo.train.config import TrainConfig

log = logging.getLogger("sacpo.train")


@dataclass(frozen=True)
class Split:
    """Encoded pairs with their reference log-probs; `desirable` only for KTO."""

    pairs: list[tuple[Encoded, Encoded]]
    ref: torch.Tensor  # (N, 2)
    desirable: torch.Tensor | None  # (N,) bool


def prepare_data(
    cfg: TrainConfig, tokenizer: Any
) -> tuple[list[tuple[Encoded, Encoded]], torch.Tensor | None]:
    """Load records and encode them with the config's prompt format: (pairs, desirable flags (N,) or None). The
    first prompt's rendered text is logged (INFO)."""
    spec = get_format(cfg.data.format)
    loss_kind = get_loss(cfg.loss).kind
    if spec.kind != loss_kind:
        raise ConfigError(
            f"loss {cfg.loss!r} needs {loss_kind} data but data.format {cfg.data.format!r} is {spec.kind}"
        )
    examples = cfg.data.load()
    fmt = cfg.prompt_format()
    if examples:
        log_first_prompt(log, tokenizer, examples[0].prompt, fmt)
    stats: Counter = Counter()
    if loss_kind == "paired":
        pairs = encode_paired(tokenizer, examples, cfg.max_length, cfg.max_prompt_length, stats, fmt)
        _log_truncation(cfg, stats)
        _check_pairs_differ(cfg, pairs)
        return pairs, None
    desirable = torch.tensor([ex.desirable for ex in examples], dtype=torch.bool)  # (N,)
    encoded = encode_binary(tokenizer, examples, cfg.max_length, cfg.max_prompt_length, stats, fmt=fmt)
    _log_truncation(cfg, stats)
    return encoded, desirable


def _check_pairs_differ(cfg: TrainConfig, pairs: list[tuple[Encoded, Encoded]]) -> None:
    """A pair whose two sides are the same tokens carries no preference: an error if all are, else a warning."""
    same = sum(a.input_ids == b.input_ids for a, b in pairs)
    if same == len(pairs):
        raise DataError(
            f"{cfg.data.source}: all {same} pairs have identical chosen and rejected tokens after truncation "
            f"to max_length={cfg.max_length}; raise max_length"
        )
    if same:
        log.warning(
            "%s: %d of %d pairs have identical chosen and rejected tokens after truncation to max_length=%d "
            "(responses differ only past the cut); they carry no preference signal",
            cfg.data.source,
            same,
            len(pairs),
            cfg.max_length,
        )


def _log_truncation(cfg: TrainConfig, stats: Counter) -> None:
    """The truncation policy is explicit, and so is how often it applied (a warning with the counts)."""
    if stats["prompts_truncated"]:
        log.warning(
            "%s: %d of %d prompts are longer than max_prompt_length=%d tokens: kept their last %d tokens",
            cfg.data.source,
            stats["prompts_truncated"],
            stats["prompts"],
            cfg.max_prompt_length,
            cfg.max_prompt_length,
        )
    if stats["responses_cut"]:
        log.warning(
            "%s: %d of %d responses cut to fit max_length=%d (their end and EOS dropped)",
            cfg.data.source,
            stats["responses_cut"],
            stats["responses"],
            cfg.max_length,
        )


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/held-out split of example indices: round(n·eval_fraction) held out."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_eval = round(n * eval_fraction)
    if n - n_eval < 1:
        raise ConfigError(f"eval_fraction={eval_fraction} leaves no training examples out of {n}")
    return sorted(idx[n_eval:]), sorted(idx[:n_eval])


def subset(
    pairs: list[tuple[Encoded, Encoded]], ref: torch.Tensor, desirable: torch.Tensor | None, idx: list[int]
) -> Split:
    """The examples at `idx` with their rows of ref (N, 2) and desirable (N,)."""
    return Split([pairs[i] for i in idx], ref[idx], desirable[idx] if desirable is not None else None)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Global batches of one epoch: a permutation seeded by (seed, epoch), incomplete last batch dropped."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
