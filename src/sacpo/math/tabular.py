"""Exact alignment math on a finite output space: closed-form optima and a tabular SACPO check.

A "tabular policy" is one softmax over a finite response set per prompt: logits of shape (P, Y). Everything here is
computed in float64 by enumerating the space, so it serves as ground truth for the sampled, neural versions.

    KL-regularised optimum    π*(y|x) = π_ref(y|x)·exp(r(x,y)/β) / Z(x)
                              = argmax_π E_π[r] − β·KL(π‖π_ref)      (Gibbs variational principle)

SACPO (Wachi et al. 2024, "Stepwise Alignment for Constrained Language Model Policy Optimization", its key
theorem and Alg. 1): the constrained optimum π* ∝ π_ref·exp((r + λ·g)/β) is reached by two DPO steps, reward
with β and then safety with β/λ (reference = step-1 policy), in either order. `sacpo_tabular` runs exactly that
on the population DPO loss, with Bradley–Terry preferences P(y1 ≻ y2) = σ(s(y1) − s(y2)) summed over all pairs,
so no sampling noise is involved: DPO's population optimum is π_ref·exp(s/β)/Z (the BT score s is identified up
to a per-prompt constant when the pair distribution connects all responses), and the check is exact up to the
optimiser.

The constrained optimum with λ* from the dual lives in `sacpo.math.lagrange.constrained_optimum`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sacpo.math.preference import dpo_loss

ArrayLike = torch.Tensor | Sequence[float] | Sequence[Sequence[float]]

PAIR_DISTRIBUTIONS = ("uniform", "ref")
SACPO_ORDERS = ("reward_first", "safety_first")


def _sum_tolerance(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float64 else 1e-4


def as_distribution(p: ArrayLike, name: str = "p") -> torch.Tensor:
    """Validate probabilities over the last dimension and return them as float64, renormalised.

    p: (..., Y), non-negative, finite, each row summing to 1 within 1e-6 (float64 input) or 1e-4 (other dtypes);
    rows are divided by their sum so that downstream cumulative sums end exactly at 1.
    """
    in_dtype = p.dtype if isinstance(p, torch.Tensor) else torch.float64
    t = torch.as_tensor(p, dtype=torch.float64)
    if t.ndim == 0 or t.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    if (t < 0).any():
        raise ValueError(f"{name} must be non-negative, min is {t.min().item():.3g}")
    total = t.sum(-1, keepdim=True)  # (..., 1)
    err = (total - 1.0).abs().max().item()
    if err > _sum_tolerance(in_dtype):
        raise ValueError(f"{name} must sum to 1 over its last dimension; off by up to {err:.3g}")
    return t / total


def as_scores(s: ArrayLike, like: torch.Tensor, name: str) -> torch.Tensor:
    """A finite float64 score tensor (reward, cost, logits) broadcastable to `like`'s shape, broadcast to it."""
    t = torch.as_tensor(s, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    try:
        return torch.broadcast_to(t, like.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}, not broadcastable to {tuple(like.shape)}"
        ) from None


def _as_logits(ref_logits: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(ref_logits, dtype=torch.float64)
    if t.ndim != 2:
        raise ValueError(f"ref_logits must have shape (P, Y), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("ref_logits must be finite")
    return t


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def kl_regularized_optimum(p: ArrayLike, r: ArrayLike, beta: float) -> torch.Tensor:
    """π*(y) = p(y)·exp(r(y)/β) / Σ_y' p(y')·exp(r(y')/β), the maximiser of E_π[r] − β·KL(π‖p).

    p: (..., Y) probabilities, r: broadcastable to p; returns (..., Y) float64. Computed as a softmax of
    log p + r/β, so large r/β cannot overflow; outcomes with p(y) = 0 keep probability 0.
    (Rafailov et al. 2023, Eq. 4; Beirami, "LM alignment: theory & practice", the KL-regularised RL optimum.)
    """
    _check_beta(beta)
    p = as_distribution(p)
    r = as_scores(r, p, "r")
    return torch.softmax(p.log() + r / beta, dim=-1)  # (..., Y)


# ------------------------------------------------------------------------------------------------ population DPO
def pair_weights(ref_logits: ArrayLike, pairs: str | ArrayLike = "uniform") -> torch.Tensor:
    """Distribution μ(y1, y2 | x) of the (unlabelled) preference pairs, (P, Y, Y), each prompt's slice summing to 1.

    "uniform": uniform over ordered pairs of distinct responses. "ref": π_ref(y1)·π_ref(y2) over distinct
    responses, renormalised. A tensor: non-negative weights (P, Y, Y) or (Y, Y), normalised per prompt.
    """
    ref_logits = _as_logits(ref_logits)
    n_prompts, n_resp = ref_logits.shape
    off_diag = 1.0 - torch.eye(n_resp, dtype=torch.float64)  # (Y, Y)
    if isinstance(pairs, str):
        if pairs == "uniform":
            w = off_diag.expand(n_prompts, n_resp, n_resp)
        elif pairs == "ref":
            ref = torch.softmax(ref_logits, dim=-1)  # (P, Y)
            w = ref[:, :, None] * ref[:, None, :] * off_diag  # (P, Y, Y)
        else:
            raise ValueError(f"unknown pair distribution {pairs!r}; valid: {', '.join(PAIR_DISTRIBUTIONS)}")
    else:
        w = torch.as_tensor(pairs, dtype=torch.float64)
        if w.shape not in ((n_resp, n_resp), (n_prompts, n_resp, n_resp)):
            raise ValueError(f"pair weights must have shape (Y, Y) or (P, Y, Y), got {tuple(w.shape)}")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("pair weights must be finite and non-negative")
        w = w.expand(n_prompts, n_resp, n_resp)
    total = w.sum(dim=(-2, -1), keepdim=True)  # (P, 1, 1)
    if (total <= 0).any():
        raise ValueError("pair weights must put positive mass on some pair of every prompt")
    return w / total


def _check_connected(weights: torch.Tensor) -> None:
    """DPO identifies the BT score only up to a constant per connected component of the pair graph."""
    adj = ((weights + weights.transpose(-2, -1)) > 0).to(torch.float64)  # (P, Y, Y)
    reach = ((adj + torch.eye(adj.shape[-1], dtype=torch.float64)) > 0).to(torch.float64)
    for _ in range(max(1, adj.shape[-1]).bit_length()):
        reach = ((reach @ reach) > 0).to(torch.float64)
    if not bool((reach > 0).all()):
        raise ValueError(
            "pair weights do not connect all responses of every prompt; the DPO optimum is then not identified"
        )


def expected_dpo_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    score: torch.Tensor,
    beta: float,
    pairs: str | ArrayLike = "uniform",
) -> torch.Tensor:
    """Population DPO loss of a tabular policy under Bradley–Terry labels, summed exactly over all pairs.

    L(θ) = mean_x Σ_{y1,y2} μ(y1,y2|x) [σ(s1 − s2)·ℓ(y1 ≻ y2) + σ(s2 − s1)·ℓ(y2 ≻ y1)],
    ℓ(a ≻ b) = −log σ(β·(log π_θ(a)/π_ref(a) − log π_θ(b)/π_ref(b)))        (Rafailov et al. 2023, Eq. 7)

    logits, ref_logits, score: (P, Y); μ from `pair_weights`. ℓ is `sacpo.math.preference.dpo_loss`, the loss
    used in training. Returns a differentiable scalar. At the optimum it equals the BT label entropy
    mean_x Σ μ·H(σ(s1 − s2)) (the loss is a cross-entropy against the BT labels).
    """
    w = pair_weights(ref_logits, pairs)  # (P, Y, Y)
    n_resp = logits.shape[-1]
    logps = torch.log_softmax(logits, dim=-1)  # (P, Y)
    ref_logps = torch.log_softmax(ref_logits, dim=-1)  # (P, Y)
    score = torch.broadcast_to(score, logits.shape)  # (P, Y)
    label = torch.sigmoid(score[:, :, None] - score[:, None, :])  # (P, Y, Y): P(a ≻ b)
    pair_w = (w + w.transpose(-2, -1)) * label  # (P, Y, Y): weight of the labelled comparison "a ≻ b"
    a = torch.arange(n_resp).repeat_interleave(n_resp)  # (Y·Y,) chosen index
    b = torch.arange(n_resp).repeat(n_resp)  # (Y·Y,) rejected index
    out = dpo_loss(logps[:, a], logps[:, b], ref_logps[:, a], ref_logps[:, b], beta)  # losses (P, Y·Y)
    return (pair_w.reshape(pair_w.shape[0], -1) * out.losses).sum(-1).mean()


def _dpo_logits(
    ref_logits: torch.Tensor,
    score: torch.Tensor,
    beta: float,
    weights: torch.Tensor,
    grad_tol: float,
    max_iter: int,
) -> torch.Tensor:
    """Minimise the population DPO loss over logits ref + u/β by damped Newton steps; returns the logits (P, Y).

    u is the implicit reward β·log(π/π_ref) + const, which makes the problem equally well scaled for every β (the
    loss is a BT logistic regression in u). The loss is invariant to a per-prompt shift of u, so u[:, 0] is pinned
    to 0; with connected pairs the reduced Hessian (autograd, (P·(Y−1))² entries) is then positive definite. Steps
    are halved until the loss decreases (Armijo) or, near the optimum where loss differences drown in round-off,
    the gradient shrinks. Converges quadratically; RuntimeError if max |∂L/∂u| stays above grad_tol.
    """
    n_prompts, n_resp = ref_logits.shape

    def loss_of(free: torch.Tensor) -> torch.Tensor:  # free: (P·(Y−1),)
        u = torch.cat([torch.zeros(n_prompts, 1, dtype=free.dtype), free.view(n_prompts, n_resp - 1)], dim=-1)
        return expected_dpo_loss(ref_logits + u / beta, ref_logits, score, beta, weights)

    def loss_and_grad(free: torch.Tensor) -> tuple[float, torch.Tensor]:
        free = free.detach().requires_grad_(True)
        loss = loss_of(free)
        (grad,) = torch.autograd.grad(loss, free)
        return loss.item(), grad

    free = torch.zeros(n_prompts * (n_resp - 1), dtype=torch.float64)  # start at π_ref
    loss, grad = loss_and_grad(free)
    for _ in range(max_iter):
        grad_max = grad.abs().max().item() if grad.numel() else 0.0
        if grad_max <= grad_tol:
            u = torch.cat(
                [torch.zeros(n_prompts, 1, dtype=free.dtype), free.view(n_prompts, n_resp - 1)], dim=-1
            )
            return ref_logits + u / beta
        hess = torch.autograd.functional.hessian(loss_of, free)  # (P·(Y−1), P·(Y−1))
        direction = -torch.linalg.solve(hess, grad)  # Newton step
        slope = (grad * direction).sum().item()  # < 0
        t = 1.0
        while True:
            new_loss, new_grad = loss_and_grad(free + t * direction)
            armijo = new_loss <= loss + 1e-4 * t * slope
            if armijo or new_grad.abs().max().item() < grad_max or t < 1e-12:
                break
            t *= 0.5
        free, loss, grad = free + t * direction, new_loss, new_grad
    raise RuntimeError(
        f"tabular DPO did not converge in {max_iter} Newton steps: max |∂L/∂u| = {grad_max:.3g} > {grad_tol:.3g}"
    )


def dpo_optimum_tabular(
    ref_logits: ArrayLike,
    reward: ArrayLike,
    beta: float,
    pairs: str | ArrayLike = "uniform",
    grad_tol: float = 1e-12,
    max_iter: int = 100,
) -> torch.Tensor:
    """Policy probabilities (P, Y) minimising `expected_dpo_loss` (float64 damped Newton from π_ref).

    ref_logits: (P, Y) reference logits; reward: BT score broadcastable to (P, Y); pairs: see `pair_weights`
    ("ref" means pairs from this reference). With full pair coverage the result is π_ref·exp(reward/β)/Z, i.e.
    `kl_regularized_optimum(softmax(ref_logits), reward, beta)`. Raises RuntimeError if the gradient does not
    fall below grad_tol, ValueError if the pairs do not connect all responses.
    """
    _check_beta(beta)
    ref_logits = _as_logits(ref_logits)
    score = as_scores(reward, ref_logits, "reward")
    weights = pair_weights(ref_logits, pairs)  # (P, Y, Y)
    _check_connected(weights)
    logits = _dpo_logits(ref_logits, score, beta, weights, grad_tol, max_iter)
    return torch.softmax(logits, dim=-1)


def sacpo_tabular(
    ref_logits: ArrayLike,
    r: ArrayLike,
    g: ArrayLike,
    beta: float,
    lam: float,
    order: str = "reward_first",
    pairs: str | ArrayLike = "uniform",
    grad_tol: float = 1e-12,
    max_iter: int = 100,
) -> torch.Tensor:
    """Two-step SACPO on a tabular policy (Wachi et al. 2024, Alg. 1); returns the final probabilities (P, Y).

    "reward_first": step 1 DPO(β) on BT(r) pairs with reference π_ref → π₁ ∝ π_ref·exp(r/β);
                    step 2 DPO(β/λ) on BT(g) pairs with reference π₁ → π₂ ∝ π₁·exp(λg/β).
    "safety_first": step 1 DPO(β/λ) on BT(g) pairs with reference π_ref → π₁ ∝ π_ref·exp(λg/β);
                    step 2 DPO(β) on BT(r) pairs with reference π₁ → π₂ ∝ π₁·exp(r/β).
    Both end at π* ∝ π_ref·exp((r + λg)/β) (SACPO's key result: the optimum is a tilt of the reward-aligned
    policy). λ = 0 skips the safety step (β/λ = ∞ leaves the reference unchanged). The pair distribution is the
    data's and does not change between steps: "ref" means pairs from the original π_ref in both steps.
    ref_logits: (P, Y); r, g: broadcastable to (P, Y).
    """
    _check_beta(beta)
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if order not in SACPO_ORDERS:
        raise ValueError(f"unknown SACPO order {order!r}; valid: {', '.join(SACPO_ORDERS)}")
    ref_logits = _as_logits(ref_logits)
    r = as_scores(r, ref_logits, "r")
    g = as_scores(g, ref_logits, "g")
    weights = pair_weights(ref_logits, pairs)  # (P, Y, Y), fixed across steps
    _check_connected(weights)
    steps = [(r, beta), (g, beta / lam if lam > 0 else None)]
    if order == "safety_first":
        steps.reverse()
    logits = ref_logits
    for score, step_beta in steps:
        if step_beta is not None:
            logits = _dpo_logits(logits, score, step_beta, weights, grad_tol, max_iter)
    return torch.softmax(logits, dim=-1)
