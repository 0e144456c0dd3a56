"""Reward-model maths: the Bradley–Terry loss, pairwise accuracy and ensemble aggregation (pure torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood (Bradley & Terry 1952; Ouyang et al. 2022, Eq. 1).

    P(y_w ≻ y_l | x) = σ(s_w − s_l),  L = −log σ(s_w − s_l) = softplus(s_l − s_w)

    chosen_scores, rejected_scores: (B,) → unreduced losses (B,).
    """
    return -F.logsigmoid(chosen_scores - rejected_scores)  # (B,)


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float | None:
    """Fraction of pairs ranked correctly, mean of 1[s_w > s_l] + ½·1[s_w = s_l]; None when there are no pairs
    (undefined, not 0)."""
    if chosen_scores.numel() == 0:
        return None
    wins = (chosen_scores > rejected_scores).double() + 0.5 * (chosen_scores == rejected_scores).double()
    return wins.mean().item()


def aggregate_scores(member_scores: torch.Tensor, aggregate: str) -> torch.Tensor:
    """(k, N) member values → (N,) by mean, min or max over members."""
    if aggregate == "mean":
        return member_scores.mean(0)
    if aggregate == "min":
        return member_scores.min(0).values
    if aggregate == "max":
        return member_scores.max(0).values
    raise ValueError(f"unknown aggregate {aggregate!r}; valid: mean, min, max")
