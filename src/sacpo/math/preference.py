"""Preference losses as pure functions of per-sequence log-probabilities.

Every loss takes the summed (or, if the caller chooses, length-averaged) log-probabilities of the policy π_θ and of
the reference π_ref and returns *unreduced* per-example losses together with the implicit rewards
β·log(π_θ/π_ref). Reduction, devices and data handling belong to the caller.

SACPO (Wachi et al. 2024, Alg. 1) calls these twice: step 1 with coefficient β on helpfulness pairs and the SFT
policy as reference, step 2 with coefficient β/λ on safety pairs and the step-1 policy as reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class PreferenceLossOutput(NamedTuple):
    """Per-example losses and implicit rewards.

    For paired losses `chosen_rewards`/`rejected_rewards` have shape (B,). For KTO, `chosen_rewards` holds the
    rewards of desirable examples and `rejected_rewards` those of undesirable ones (shapes (B_d,), (B_u,)).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Direct Preference Optimization loss (Rafailov et al. 2023, Eq. 7).

    h = log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)
    L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)        (ε = label_smoothing, conservative DPO; ε = 0 is plain DPO)

    All inputs have shape (B,); returns losses (B,) and implicit rewards β·log(π/π_ref) for chosen and rejected.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return PreferenceLossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> PreferenceLossOutput:
    """Identity Preference Optimization loss (Azar et al. 2023, Eq. 17, sampled form).

    h = log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)
    L = (h − 1/(2β))²                        (β plays the role of τ in the paper)

    Inputs (B,); pass length-averaged log-probs (log π(y|x)/|y|) to get TRL's normalised IPO — what the trainer
    does by default for ipo (`average_logprobs: null` = auto, sacpo.train.config.resolve_average_logprobs).
    """
    _check_beta(beta)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO reference point z_ref = max(0, mean_i [log π(y'_i|x_i) − log π_ref(y'_i|x_i)]), detached.

    (y'_i, x_i) are *mismatched* pairs (a completion paired with another example's prompt), as in the KTO paper
    (Ethayarajh et al. 2024, §4.1) and TRL. Inputs (B,) — gather across processes before calling; returns a scalar.
    y'_i must not have been written for x_i: a matched pair's log-ratio is what the loss moves, not the KL
    (sacpo.data.tokenize.mismatched_partners pairs across different prompts).
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    z_ref: torch.Tensor | float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLossOutput:
    """Kahneman–Tversky Optimization loss (Ethayarajh et al. 2024, Eq. 8).

    r = log π(y|x)/π_ref(y|x)
    desirable:   L = λ_D·(1 − σ(β·(r − z_ref)))
    undesirable: L = λ_U·(1 − σ(β·(z_ref − r)))

    policy_logps, ref_logps: (B,); desirable: (B,) bool; z_ref: scalar from `kto_reference_point`.
    Returns losses (B,) in input order and rewards β·r split into desirable (B_d,) and undesirable (B_u,).
    """
    _check_beta(beta)
    desirable = desirable.to(torch.bool)
    logratios = policy_logps - ref_logps  # (B,)
    z = torch.as_tensor(z_ref, dtype=logratios.dtype, device=logratios.device)
    chosen_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z)))  # (B,)
    rejected_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z - logratios)))  # (B,)
    losses = torch.where(desirable, chosen_losses, rejected_losses)
    rewards = beta * logratios.detach()
    return PreferenceLossOutput(losses, rewards[desirable], rewards[~desirable])


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and whether it consumes pairs or binary-labelled examples."""

    fn: Callable[..., PreferenceLossOutput]
    kind: str  # "paired" or "unpaired"


def rpo_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor, averaged: bool) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1):
    the chosen response's per-token negative log-likelihood,

        nll_i = −log π(y_w,i | x_i) / |y_w,i|

    policy_chosen_logps (B,) are summed log-probs (averaged=False) or already length-averaged (averaged=True);
    chosen_lengths (B,) are the response token counts. Returns (B,); the training loss adds α·nll_i to each pair's
    preference loss. Unlike the DPO term it does not saturate: it keeps raising the chosen response's likelihood
    after the margin is won, so the policy cannot win it by pushing the rejected response down alone (likelihood
    displacement, Razin et al. 2024). Per pair, as in the paper; TRL 1.x's `loss_type=["sigmoid", "sft"]` takes
    the mean over all chosen tokens of a batch instead (equal when the chosen lengths are)."""
    if averaged:
        return -policy_chosen_logps
    return -policy_chosen_logps / chosen_lengths.clamp(min=1).to(policy_chosen_logps.dtype)


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, "paired"),
    "ipo": LossSpec(ipo_loss, "paired"),
    "kto": LossSpec(kto_loss, "unpaired"),
}


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name; unknown names raise a ValueError listing the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}") from None
