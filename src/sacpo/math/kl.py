"""KL(π‖π_ref) estimators from samples y ~ π (Schulman, "Approximating KL divergence", 2020).

With log-ratio l = log π(y) − log π_ref(y) on samples from π:
    k1 = l                  unbiased, high variance, can be negative per sample
    k2 = l²/2               biased, low variance (exact to second order)
    k3 = (e^{−l} − 1) + l   unbiased, non-negative per sample

Per-sequence KL: summing the token log-ratios of a sampled sequence gives an unbiased estimate of the
sequence-level KL(π(·|x)‖π_ref(·|x)) — the "KL" of the alignment tutorial (Beirami), tracked during training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sacpo.math.logprobs import masked_sum


def kl_k1(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref, elementwise (any shape)."""
    return policy_logps - ref_logps


def kl_k2(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π − log π_ref)², elementwise."""
    return 0.5 * (policy_logps - ref_logps) ** 2


def kl_k3(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = (π_ref/π − 1) − log(π_ref/π), elementwise; ≥ 0."""
    log_r = ref_logps - policy_logps
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def get_kl_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Look up a KL estimator by name; unknown names list the valid ones."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {name!r}; valid: {', '.join(sorted(KL_ESTIMATORS))}"
        ) from None


def sequence_kl(
    policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-sequence KL estimate: Σ_t k(log π_t, log π_ref_t)·mask_t over tokens sampled from π.

    Inputs (B, T); returns (B,). With "k1" this is the sequence log-ratio log π(y|x) − log π_ref(y|x).
    """
    per_token = get_kl_estimator(estimator)(policy_token_logps, ref_token_logps)  # (B, T)
    return masked_sum(per_token, mask)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error s/√n of a 1-D tensor; stderr is NaN for n < 2 (undefined, not 0)."""
    v = values.detach().double().flatten()
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = v.mean().item()
    if n < 2:
        return mean, float("nan")
    return mean, (v.std(unbiased=True) / n**0.5).item()


# Thresholds from the alignment tutorial (Beirami): sequence KL to the reference, in nats.
KL_INSPECT = 15.0
KL_USELESS = 100.0


def kl_health(kl: float) -> str | None:
    """A warning for a sequence KL (nats): > 100 "results unlikely useful", > 15 "inspect for reward hacking"."""
    if kl != kl:  # NaN
        return "KL is undefined (NaN): check the log-probs"
    if kl > KL_USELESS:
        return f"KL(π‖π_ref) = {kl:.1f} nats > {KL_USELESS:g}: results unlikely useful"
    if kl > KL_INSPECT:
        return f"KL(π‖π_ref) = {kl:.1f} nats > {KL_INSPECT:g}: inspect samples for reward hacking"
    return None
