"""Scorers: anything that maps (prompts, responses) to one float per response.

A `Scorer` has a `name` and is called on two equal-length sequences, returning a (N,) tensor. Gold oracles given
as code are wrapped per example by `FunctionScorer`; learned reward / cost models provide their own classes with
the same protocol (batched on a device), so the evaluation never needs to know which kind it holds.

    reward = FunctionScorer("r*", gold_reward)        # fn(prompt, response) -> float
    reward(["How do I bake bread?"], ["Mix flour."])  # tensor([...], dtype=float64)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from sacpo.data.records import Prompt


@runtime_checkable
class Scorer(Protocol):
    """scores = scorer(prompts, responses): (N,) float tensor, higher = more of what the scorer measures."""

    name: str

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class FunctionScorer:
    """A Scorer from a per-example function fn(prompt, response) -> float (a gold oracle as code).

    Returns float64 so oracle values (e.g. 0.3 steps) compare exactly in win rates.
    """

    name: str
    fn: Callable[[Prompt, str], float]

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        check_lengths(self.name, prompts, responses)
        return torch.tensor(
            [float(self.fn(p, r)) for p, r in zip(prompts, responses, strict=True)], dtype=torch.float64
        )  # (N,)


def check_lengths(name: str, prompts: Sequence[Prompt], responses: Sequence[str]) -> None:
    """Scorers are called on aligned sequences: one prompt per response."""
    if len(prompts) != len(responses):
        raise ValueError(f"scorer {name!r}: {len(prompts)} prompts but {len(responses)} responses")


def run_scorer(scorer: Scorer, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
    """Call a scorer and check its output: shape (N,), finite. Returns float64 on the CPU."""
    scores = torch.as_tensor(scorer(prompts, responses)).detach().cpu().double().reshape(-1)  # (N,)
    if scores.numel() != len(responses):
        raise ValueError(
            f"scorer {scorer.name!r} returned {scores.numel()} scores for {len(responses)} responses"
        )
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"scorer {scorer.name!r} returned non-finite scores for {len(bad)} responses (first index {bad[0]}: "
            f"{responses[bad[0]]!r})"
        )
    return scores
