"""Controlled decoding as logit tilts: the token-wise KL-regularised optimum over a top-k set, its exact KL, value
combinations for several objectives, the CD-Q Bellman backup and the blockwise (best-of-K per block) KL bound.

Token-wise controlled decoding (Mudgal et al. 2024, "Controlled Decoding from Language Models", Eq. 4; Yang & Klein
2021, FUDGE; Beirami, "LM alignment: theory & practice"): at a prefix (x, y^t), with the base policy p(z) = π_base(z
| x, y^t) and a prefix value V(z) = V(x, y^t z) of each candidate next token z, the step policy is

    q(z) = p(z)·exp(V(z)/β) / Σ_{z'∈C} p(z')·exp(V(z')/β)        for z ∈ C = top-k of p, 0 elsewhere,

the maximiser of E_q[V] − β·KL(q‖p̃) over distributions on C, where p̃ = p restricted to C and renormalised.
It is computed in log space: log q = log_softmax(log p + V/β) over C (the normaliser of p cancels).

Exact per-step KL, two references (both returned, consistently everywhere in sacpo):

    kl_topk = KL(q‖p̃) = Σ_C q·(log q − log p̃)           ≥ 0, the "tilt" part (0 when β = ∞)
    kl      = KL(q‖p)  = kl_topk − log S,  S = Σ_C p(z)  the KL to the *full* base distribution: the truncation
                                                         term −log S ≥ 0 is what restricting sampling to C costs

`kl` is the one comparable with any other policy's KL to the base model (best-of-n, a fine-tuned policy): by the
chain rule the sum of per-step `kl` over a sampled path is an unbiased estimate of the sequence-level
KL(π_CD(·|x)‖π_base(·|x)). With k = |vocabulary| the two coincide.

All functions are pure (torch only) and work over the last dimension (the k candidates) with any leading shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from sacpo.math.bon import bon_kl_bound, bon_kl_estimate


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0 (math.inf = no tilt), got {beta}")
    return beta


def _check_shapes(logp: torch.Tensor, values: torch.Tensor) -> None:
    if logp.shape != values.shape:
        raise ValueError(
            f"logp and values must have the same shape, got {tuple(logp.shape)} and {tuple(values.shape)}"
        )
    if logp.shape[-1] < 1:
        raise ValueError("need at least one candidate token (last dimension ≥ 1)")


def tilted_logprobs(logp: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """log q = log_softmax(log p + V/β) over the candidates (last dim).

    logp: (..., k) base log-probs of the candidates (normalised over the full vocabulary or not: the constant
    cancels; −inf marks an impossible candidate). values: (..., k) prefix values V(x, y^t z). β = math.inf gives
    log p̃, the base distribution restricted to the candidates. Returns (..., k).
    """
    _check_shapes(logp, values)
    beta = _check_beta(beta)
    tilt = values / beta if math.isfinite(beta) else torch.zeros_like(values)
    return torch.log_softmax(logp + tilt, dim=-1)  # (..., k)


def _kl_terms(logq: torch.Tensor, logr: torch.Tensor) -> torch.Tensor:
    """Σ q·(log q − log r) over the last dim, with 0·log 0 = 0 (candidates q gives no mass contribute nothing)."""
    q = logq.exp()
    terms = torch.where(q > 0, q * (logq - logr), torch.zeros_like(q))
    return terms.sum(-1)


class TiltedStep(NamedTuple):
    """One step of token-wise controlled decoding over k candidates (see the module docstring)."""

    logq: torch.Tensor  # (..., k) log q(z)
    kl: torch.Tensor  # (...,) KL(q‖p), p = full base distribution
    kl_topk: torch.Tensor  # (...,) KL(q‖p̃), p̃ = base restricted to the candidates, renormalised
    log_mass: torch.Tensor  # (...,) log S = log Σ_C p(z) ≤ 0 (0 when logp is already normalised over C)


def tilted_step(logp: torch.Tensor, values: torch.Tensor, beta: float) -> TiltedStep:
    """q ∝ p·exp(V/β) on the candidates and its exact KLs.

    logp: (..., k) log p(z) of the candidates under the *full-vocabulary* base distribution (so that
    log S = logsumexp(logp) is the candidates' mass). values: (..., k). Returns TiltedStep.
    """
    logq = tilted_logprobs(logp, values, beta)  # (..., k)
    log_mass = torch.logsumexp(logp, dim=-1)  # (...,)
    log_p_tilde = logp - log_mass.unsqueeze(-1)  # (..., k)
    kl_topk = _kl_terms(logq, log_p_tilde)  # (...,)
    return TiltedStep(logq, kl_topk - log_mass, kl_topk, log_mass)


def tilted_kl(logp: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(q‖p) to the full base distribution (= kl_topk − log S). Shapes as `tilted_step`; returns (...,)."""
    return tilted_step(logp, values, beta).kl


# ------------------------------------------------------------------------------------------ several objectives
def _safety(v_reward: torch.Tensor, v_other: torch.Tensor, lam: float) -> torch.Tensor:
    return v_reward + lam * v_other


def _cost(v_reward: torch.Tensor, v_other: torch.Tensor, lam: float) -> torch.Tensor:
    return v_reward - lam * v_other


COMBINERS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "safety": _safety,  # V = V_r + λ·V_g   (g: higher is safer)
    "cost": _cost,  # V = V_r − λ·V_c   (c: higher is more harmful)
}


def combine_values(
    v_reward: torch.Tensor, v_other: torch.Tensor | None = None, lam: float = 0.0, kind: str = "safety"
) -> torch.Tensor:
    """Value of the Lagrangian objective r + λ·g (kind "safety") or r − λ·c (kind "cost"), elementwise.

    Decoding with q ∝ p·exp((V_r + λ·V_g)/β) is the inference-time counterpart of SACPO's target policy
    π* ∝ π_ref·exp((r + λ·g)/β) (Wachi et al. 2024). v_other = None (or λ = 0) returns v_reward unchanged.
    """
    if kind not in COMBINERS:
        raise ValueError(f"unknown value combination {kind!r}; valid: {', '.join(sorted(COMBINERS))}")
    lam = float(lam)
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be >= 0 and finite, got {lam}")
    if v_other is None:
        return v_reward
    if v_other.shape != v_reward.shape:
        raise ValueError(f"value shapes differ: {tuple(v_reward.shape)} and {tuple(v_other.shape)}")
    return COMBINERS[kind](v_reward, v_other, lam)


# ------------------------------------------------------------------------------------------------------- CD-Q
def expected_child_value(logp: torch.Tensor, child_values: torch.Tensor) -> torch.Tensor:
    """Σ_{z∈C} p̃(z)·V(x, y^t z): the base policy's expected next value over the candidates, p̃ = p renormalised
    over C (the top-k approximation of Mudgal et al.'s CD-Q backup E_{z~p}[V(x, y^t z)]).

    logp: (..., k) (any normalisation), child_values: (..., k). Returns (...,).
    """
    _check_shapes(logp, child_values)
    return (torch.softmax(logp, dim=-1) * child_values).sum(-1)


def bellman_targets(
    logp: torch.Tensor, child_values: torch.Tensor, rewards: torch.Tensor, terminal: torch.Tensor
) -> torch.Tensor:
    """CD-Q regression targets: the reward r(x, y) at terminal prefixes, Σ_C p̃(z)·V̄(x, y^t z) elsewhere.

    logp, child_values: (..., k); rewards: (...,) (broadcastable); terminal: (...,) bool. Returns (...,). The
    child values come from a stop-gradient copy V̄ of the value model (the caller detaches them).
    """
    backup = expected_child_value(logp, child_values)  # (...,)
    return torch.where(terminal, rewards.to(backup.dtype).expand_as(backup), backup)


# ------------------------------------------------------------------------------------------------ blockwise CD
def blockwise_kl_bound(k: int | torch.Tensor, n_blocks: int | torch.Tensor) -> float | torch.Tensor:
    """Upper bound on KL(π_block‖π_base) of blockwise CD: Σ_blocks (log K − (K−1)/K) = n_blocks·(log K − (K−1)/K).

    Each block is best-of-K over the base model's continuations given the prefix (Mudgal et al. 2024, §2.3), so
    by the chain rule of KL the sequence KL is at most the sum of the per-block best-of-K bounds (Beirami et al.
    2024, Thm. 3.1). An upper bound, not the value: ties, a short final block and a scorer with few distinct
    values all make the real KL smaller. k, n_blocks: ints or integer tensors (broadcast).
    """
    per_block = bon_kl_bound(k)
    if isinstance(n_blocks, torch.Tensor):
        if (n_blocks < 0).any():
            raise ValueError("n_blocks must be >= 0")
        return n_blocks.to(torch.float64) * torch.as_tensor(per_block, dtype=torch.float64)
    if n_blocks < 0:
        raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
    return n_blocks * per_block


def blockwise_kl_estimate(token_logps: torch.Tensor, M: int, K: int) -> float:
    """ε-estimate of KL(π_block‖π_base) for one response of blockwise CD: Σ_b KL̂(ε_b, K) (Beirami et al. 2024, §4).

    token_logps: (R,) log π_base(y_t | x, y_<t) of the response's tokens. Block b is tokens [b·M, (b+1)·M) (every
    block but the last has exactly M tokens: a block stops early only at EOS, which ends the response), and
    ε_b = π_base(block b | x, y_<b) = exp(Σ_{t∈b} log π_base(y_t|…)). Each block is best-of-K by the scorer among
    base continuations of its prefix, so by the chain rule of KL the sequence KL is the sum over the path of the
    per-block best-of-K KLs, each estimated by KL̂(ε_b) — exact for an atom of mass ε_b on top of blocks of
    distinct (continuous) values. Always ≤ `blockwise_kl_bound(K, n_blocks)`; K = 1 gives 0.
    """
    if M < 1 or K < 1:
        raise ValueError(f"M and K must be >= 1, got M={M}, K={K}")
    t = token_logps.double().flatten()
    if t.numel() == 0:
        return 0.0
    n_blocks = -(-t.numel() // M)
    padded = torch.zeros(n_blocks * M, dtype=torch.float64)
    padded[: t.numel()] = t
    eps = padded.view(n_blocks, M).sum(-1).clamp(max=0.0).exp()  # (B,)
    return float(bon_kl_estimate(eps, K).sum())
