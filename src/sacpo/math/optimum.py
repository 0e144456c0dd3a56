"""The KL-regularised (constrained) optimum estimated from samples — PURE: torch only, no I/O, no devices.

The target of SACPO at multiplier λ (Wachi et al. 2024, Eq. 6 / Thm. 1) with preference labels drawn from a
Bradley–Terry model at scale s (P(y1 ≻ y2) = σ(s·(u(y1) − u(y2))), so DPO's implicit reward is s·u):

    π*_λ(y|x) = π_SFT(y|x)·exp(t(x,y)) / Z(x),     t = s·(r(x,y) + λ·g(x,y)) / β,     Z(x) = E_SFT[exp(t)]

It maximises J(π) = E_π[r + λg] − (β/s)·KL(π‖π_SFT) with value J(π*) = (β/s)·log Z (Gibbs variational
principle), and KL(π*‖π_SFT) = E_π*[t] − log Z. On a space that cannot be enumerated (sequences of a neural LM)
the expectations are estimated by self-normalised importance sampling (SNIS) from a proposal q with known
log-density — a defensive mixture q = Σ_k α_k·π_k of SFT and other policies (the balance heuristic, Veach &
Guibas 1995; Owen 2013, ch. 9), so every weight is bounded by exp(t)/α_SFT:

    w_i = π_SFT(y_i)·exp(t_i) / q(y_i),   Ẑ = mean_i w_i,   Ê*[f] = Σ_i w_i·f_i / Σ_i w_i,
    K̂L = Ê*[t] − log Ẑ,                   ESS = (Σ_i w_i)² / Σ_i w_i²

Ẑ is unbiased, so E[log Ẑ] ≤ log Z (Jensen): the estimated J(π*) is low in expectation, never high. The
Donsker–Varadhan bound log Z ≥ E_π[t] − KL(π‖π_SFT) holds for every π, so J(π) ≤ J(π*) for any model (a trained
model above the estimate proves the estimate low). With few effective samples (ESS ≪ N) the estimate is
unreliable: the ESS is reported with every value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TiltedEstimate:
    """SNIS estimates for one prompt; `expect` holds E_π*[f] for every value array passed in by name."""

    log_z: float  # log Ẑ = log E_SFT[exp(t)]
    kl: float  # KL(π*‖π_SFT) = E*[t] − log Z
    ess: float  # effective sample size (Σw)²/Σw², in [1, N]
    n: int  # samples used
    expect: dict[str, float]
    weights: torch.Tensor  # (N,) normalised weights w_i / Σ w, float64


def log_mixture_density(logps: torch.Tensor, counts: torch.Tensor | list[float]) -> torch.Tensor:
    """log q(y_i) of the balance-heuristic mixture q = Σ_k α_k·π_k with α_k = n_k / Σn.

    logps: (K, N) — log π_k(y_i) of every pooled sample i under every component k (the samples of all components
    concatenated); counts: (K,) samples drawn from each component. Returns (N,) float64.
    """
    lp = torch.as_tensor(logps, dtype=torch.float64)
    c = torch.as_tensor(counts, dtype=torch.float64)
    if lp.ndim != 2 or c.shape != (lp.shape[0],):
        raise ValueError(f"need logps (K, N) and counts (K,), got {tuple(lp.shape)} and {tuple(c.shape)}")
    if (c < 0).any() or c.sum() <= 0:
        raise ValueError(f"counts must be ≥ 0 with a positive sum, got {c.tolist()}")
    log_alpha = torch.log(c / c.sum())  # (K,); −inf for an unused component
    return torch.logsumexp(lp + log_alpha[:, None], dim=0)  # (N,)


def tilted_estimate(
    t: torch.Tensor | list[float],
    log_ratio: torch.Tensor | list[float] | None = None,
    values: dict[str, torch.Tensor | list[float]] | None = None,
) -> TiltedEstimate:
    """SNIS estimate of π* ∝ π_SFT·exp(t) on one prompt (module docstring).

    t: (N,) tilts t_i = s·(r_i + λ·g_i)/β of samples y_i ~ q; log_ratio: (N,) log π_SFT(y_i) − log q(y_i)
    (None: the samples come from π_SFT itself, ratio 1); values: name → (N,) f(y_i), each returned as E_π*[f].
    Example: t = [0, log 3], samples from SFT → Ẑ = (1 + 3)/2 = 2, weights (¼, ¾), KL = ¾·log 3 − log 2.
    """
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)  # (N,)
    if tt.numel() == 0:
        raise ValueError("no samples")
    lr = torch.zeros_like(tt) if log_ratio is None else torch.as_tensor(log_ratio, dtype=torch.float64)
    if lr.shape != tt.shape:
        raise ValueError(
            f"t and log_ratio must have the same shape, got {tuple(tt.shape)} and {tuple(lr.shape)}"
        )
    if not (torch.isfinite(tt).all() and torch.isfinite(lr).all()):
        raise ValueError("t and log_ratio must be finite")
    log_w = tt + lr  # (N,)
    log_z = (torch.logsumexp(log_w, 0) - math.log(tt.numel())).item()
    w = torch.softmax(log_w, 0)  # (N,) normalised
    ess = (1.0 / (w * w).sum()).item()
    expect = {}
    for name, v in (values or {}).items():
        vv = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        if vv.shape != tt.shape:
            raise ValueError(f"values[{name!r}] has shape {tuple(vv.shape)}, expected {tuple(tt.shape)}")
        expect[name] = (w * vv).sum().item()
    kl = (w * tt).sum().item() - log_z
    return TiltedEstimate(log_z, kl, ess, int(tt.numel()), expect, w)


def weighted_win_rate(
    a: torch.Tensor | list[float], weights: torch.Tensor | list[float], b: torch.Tensor | list[float]
) -> float:
    """P(A > B) + ½·P(A = B) for A ~ Σ_i weights_i·δ(a_i) (weights sum to 1) and B uniform over the values b.

    The win rate of a weighted (π*) sample against independent baseline samples: Σ_i w_i · mean_j outcome(a_i, b_j).
    Example: a = [1, 3], w = [½, ½], b = [2] → ½·0 + ½·1 = ½.
    """
    x = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)  # (N, 1)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)  # (N,)
    y = torch.as_tensor(b, dtype=torch.float64).reshape(1, -1)  # (1, M)
    if w.numel() != x.shape[0] or y.numel() == 0:
        raise ValueError(
            f"need len(weights) == len(a) and a non-empty b, got {w.numel()}, {x.shape[0]}, {y.numel()}"
        )
    outcome = (x > y).double() + 0.5 * (x == y).double()  # (N, M)
    return (w * outcome.mean(1)).sum().item() / w.sum().item()


def optimum_objective(log_z: float, beta: float, scale: float) -> float:
    """J(π*) = max_π E_π[r + λg] − (β/s)·KL(π‖π_SFT) = (β/s)·log Z."""
    if beta <= 0 or scale <= 0:
        raise ValueError(f"beta and scale must be > 0, got {beta}, {scale}")
    return beta / scale * log_z
