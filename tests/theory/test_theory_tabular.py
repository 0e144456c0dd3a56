"""sacpo.math.tabular: population DPO and two-step SACPO on tabular policies reach the closed-form optima.

Here's the maths. With BT labels P(a ≻ b) = σ(s_a − s_b) and pairs covering all responses, the expected DPO loss
is a cross-entropy minimised exactly when β·(log π/π_ref)(a) − β·(log π/π_ref)(b) = s_a − s_b, i.e. at
π = π_ref·exp(s/β)/Z, where it equals the label entropy Σ μ·H(σ(s_a − s_b)). SACPO chains two such steps:
β on r then β/λ on g (or the reverse order), ending at π_ref·exp((r + λg)/β)/Z — the constrained optimum when λ is
the dual solution λ*. The optimiser works on `sacpo.math.preference.dpo_loss`, the loss used in training.
"""

import math

import pytest
import torch

from sacpo.math.lagrange import constrained_optimum
from sacpo.math.tabular import (
    PAIR_DISTRIBUTIONS,
    SACPO_ORDERS,
    dpo_optimum_tabular,
    expected_dpo_loss,
    kl_regularized_optimum,
    pair_weights,
    sacpo_tabular,
)

D = torch.float64
TV_TOL = 1e-6  # the brief asks for 1e-3; Newton gets ~1e-8 or better


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * (a - b).abs().sum(-1).max().item()


def problem(seed: int, prompts: int = 3, size: int = 7):
    g = torch.Generator().manual_seed(seed)
    ref_logits = 1.5 * torch.randn(prompts, size, generator=g, dtype=D)
    r = 2.0 * torch.randn(prompts, size, generator=g, dtype=D)
    cost = torch.randn(prompts, size, generator=g, dtype=D)
    return ref_logits, r, cost


def entropy(x: torch.Tensor) -> torch.Tensor:
    return -(x * x.log() + (1 - x) * (1 - x).log())


# ------------------------------------------------------------------------------------------------ loss
def test_expected_loss_two_responses_by_hand():
    # Y = 2, uniform pairs: L = σ(Δ)·(−log σ(β·a)) + σ(−Δ)·(−log σ(−β·a)), a = logit shift of response 0
    ref = torch.tensor([[0.3, -0.2]], dtype=D)
    score = torch.tensor([[1.0, 0.0]], dtype=D)
    beta, a = 0.5, 0.8
    logits = ref + torch.tensor([[a, 0.0]], dtype=D)
    sig = 1 / (1 + math.exp(-1.0))  # P(0 ≻ 1) = σ(s_0 − s_1)
    expected = -sig * math.log(1 / (1 + math.exp(-beta * a))) - (1 - sig) * math.log(
        1 / (1 + math.exp(beta * a))
    )
    assert expected_dpo_loss(logits, ref, score, beta).item() == pytest.approx(expected, rel=1e-12)
    assert expected_dpo_loss(ref, ref, score, beta).item() == pytest.approx(math.log(2), rel=1e-14)


@pytest.mark.parametrize("pairs", PAIR_DISTRIBUTIONS)
def test_loss_at_closed_form_is_label_entropy_and_stationary(pairs):
    ref, r, _ = problem(0)
    beta = 0.3
    logits = (torch.log_softmax(ref, -1) + r / beta).requires_grad_(True)
    loss = expected_dpo_loss(logits, ref, r, beta, pairs)
    (grad,) = torch.autograd.grad(loss, logits)
    w = pair_weights(ref, pairs)
    label_entropy = (w * entropy(torch.sigmoid(r[:, :, None] - r[:, None, :]))).sum((-2, -1)).mean()
    assert loss.item() == pytest.approx(label_entropy.item(), rel=1e-12)
    assert grad.abs().max().item() < 1e-14


# ------------------------------------------------------------------------------------------------ DPO optimum
@pytest.mark.parametrize("pairs", PAIR_DISTRIBUTIONS)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_optimum_is_the_kl_regularised_optimum(pairs, beta):
    ref, r, _ = problem(1)
    pi = dpo_optimum_tabular(ref, r, beta, pairs=pairs)
    assert tv(pi, kl_regularized_optimum(torch.softmax(ref, -1), r, beta)) <= TV_TOL


def test_dpo_optimum_with_explicit_sparse_but_connected_pairs():
    ref, r, _ = problem(2, prompts=2, size=6)
    chain = torch.zeros(6, 6, dtype=D)
    chain[torch.arange(5), torch.arange(1, 6)] = 1.0  # only neighbours are ever compared
    pi = dpo_optimum_tabular(ref, r, 0.5, pairs=chain)
    assert tv(pi, kl_regularized_optimum(torch.softmax(ref, -1), r, 0.5)) <= TV_TOL


def test_disconnected_pairs_are_rejected():
    ref, r, _ = problem(3, prompts=1, size=4)
    split = torch.zeros(4, 4, dtype=D)
    split[0, 1] = split[2, 3] = 1.0  # {0,1} and {2,3} never compared: the offset between them is unidentified
    with pytest.raises(ValueError, match="connect"):
        dpo_optimum_tabular(ref, r, 0.5, pairs=split)


# ------------------------------------------------------------------------------------------------ SACPO
@pytest.mark.parametrize("order", SACPO_ORDERS)
@pytest.mark.parametrize(("pairs", "lam"), [("uniform", 0.5), ("uniform", 3.0), ("ref", 1.5)])
def test_sacpo_reaches_the_combined_tilt(order, pairs, lam):
    ref, r, g = problem(4)
    beta = 0.2
    pi = sacpo_tabular(ref, r, g, beta, lam, order=order, pairs=pairs)
    target = kl_regularized_optimum(torch.softmax(ref, -1), r + lam * g, beta)
    assert tv(pi, target) <= TV_TOL


@pytest.mark.parametrize("order", SACPO_ORDERS)
def test_sacpo_with_dual_lambda_is_the_constrained_optimum(order):
    ref, r, g = problem(5)
    beta = 0.25
    p_ref = torch.softmax(ref, -1)
    b = (kl_regularized_optimum(p_ref, r, beta) * g).sum(-1).mean().item() + 0.5
    pi_star, lam_star = constrained_optimum(p_ref, r, g, beta, b)
    assert lam_star > 0
    pi = sacpo_tabular(ref, r, g, beta, lam_star, order=order)
    assert tv(pi, pi_star) <= TV_TOL
    assert (pi * g).sum(-1).mean().item() == pytest.approx(b, abs=1e-6)


def test_sacpo_lambda_zero_is_plain_dpo():
    ref, r, g = problem(6)
    torch.testing.assert_close(
        sacpo_tabular(ref, r, g, 0.5, 0.0), dpo_optimum_tabular(ref, r, 0.5), rtol=0, atol=1e-12
    )


def test_wrong_safety_coefficient_misses_the_target():
    # negative control: step 2 with β·λ instead of β/λ lands elsewhere, so the checks above have teeth
    ref, r, g = problem(7)
    beta, lam = 0.2, 3.0
    step1 = dpo_optimum_tabular(ref, r, beta)
    wrong = dpo_optimum_tabular(step1.log(), g, beta * lam)
    target = kl_regularized_optimum(torch.softmax(ref, -1), r + lam * g, beta)
    assert tv(wrong, target) > 0.05
    right = dpo_optimum_tabular(step1.log(), g, beta / lam)
    assert tv(right, target) <= TV_TOL


def test_invalid_arguments_raise():
    ref, r, g = problem(8)
    with pytest.raises(ValueError, match="reward_first, safety_first"):
        sacpo_tabular(ref, r, g, 0.5, 1.0, order="both")
    with pytest.raises(ValueError, match="lam"):
        sacpo_tabular(ref, r, g, 0.5, -1.0)
    with pytest.raises(ValueError, match="uniform, ref"):
        dpo_optimum_tabular(ref, r, 0.5, pairs="all")
    with pytest.raises(ValueError, match=r"\(P, Y\)"):
        dpo_optimum_tabular(ref[0], r[0], 0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_optimum_tabular(ref, r, 0.0)
