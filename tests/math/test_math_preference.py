"""sacpo.math.preference: DPO / IPO / KTO losses against hand-computed values, identities and the registry.

Hand values use the `math` module on Python floats; the losses run in float64 so they agree to ~1e-12.
"""

import math

import pytest
import torch

from sacpo.math.preference import (
    LOSSES,
    PreferenceLossOutput,
    dpo_loss,
    get_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Two pairs of per-sequence log-probs: (policy chosen, policy rejected, ref chosen, ref rejected).
PAIRS = [(-10.0, -12.0, -11.0, -11.5), (-3.25, -2.0, -3.0, -2.5)]


def pair_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pc, pr, rc, rr = zip(*PAIRS, strict=True)
    return t(*pc), t(*pr), t(*rc), t(*rr)


def margin(pc: float, pr: float, rc: float, rr: float) -> float:
    return (pc - rc) - (pr - rr)


# --------------------------------------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_hand_values(beta):
    out = dpo_loss(*pair_tensors(), beta=beta)
    assert isinstance(out, PreferenceLossOutput)
    expected = [-log_sigmoid(beta * margin(*p)) for p in PAIRS]
    assert out.losses.shape == (2,)
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)
    # Implicit rewards β·(log π − log π_ref).
    assert out.chosen_rewards.tolist() == pytest.approx(
        [beta * (pc - rc) for pc, _, rc, _ in PAIRS], abs=1e-12
    )
    assert out.rejected_rewards.tolist() == pytest.approx(
        [beta * (pr - rr) for _, pr, _, rr in PAIRS], abs=1e-12
    )


def test_dpo_loss_first_pair_spelled_out():
    # h = (−10 − (−11)) − (−12 − (−11.5)) = 1 + 0.5 = 1.5;  β·h = 0.15;  L = log(1 + e^{−0.15}).
    out = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.5), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(1.0 + math.exp(-0.15)), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.05, abs=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25, 0.49])
def test_dpo_label_smoothing_hand_values(eps):
    beta = 0.3
    out = dpo_loss(*pair_tensors(), beta=beta, label_smoothing=eps)
    expected = [
        -(1 - eps) * log_sigmoid(beta * margin(*p)) - eps * log_sigmoid(-beta * margin(*p)) for p in PAIRS
    ]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_dpo_zero_margin_is_log2_for_any_beta_and_smoothing():
    x = t(-5.0, -7.0)
    for beta in (0.01, 1.0, 10.0):
        for eps in (0.0, 0.3):
            out = dpo_loss(x, x, x, x, beta=beta, label_smoothing=eps)
            assert out.losses.tolist() == pytest.approx([math.log(2.0)] * 2, abs=1e-12)


def test_dpo_antisymmetry_identity():
    # −log σ(x) + log σ(−x) = −x, so L(h) − L(−h) = −β·h (plain DPO); swapping chosen/rejected negates h.
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.7
    fwd = dpo_loss(pc, pr, rc, rr, beta=beta).losses
    swapped = dpo_loss(pr, pc, rr, rc, beta=beta).losses
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(fwd - swapped, -beta * h, rtol=0, atol=1e-10)


def test_dpo_gradient_matches_hand_derivative():
    # ∂L/∂log π(y_w) = −β·[(1−ε)·σ(−βh) − ε·σ(βh)],  ∂L/∂log π(y_l) = −∂L/∂log π(y_w).
    beta, eps = 0.4, 0.15
    pc = t(-10.0, -3.25).requires_grad_()
    pr = t(-12.0, -2.0).requires_grad_()
    _, _, rc, rr = pair_tensors()
    dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses.sum().backward()
    expected = [
        -beta * ((1 - eps) * sigmoid(-beta * margin(*p)) - eps * sigmoid(beta * margin(*p))) for p in PAIRS
    ]
    assert pc.grad.tolist() == pytest.approx(expected, abs=1e-12)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-12)


def test_dpo_rewards_are_detached_and_loss_is_not():
    pc = t(-1.0).requires_grad_()
    out = dpo_loss(pc, t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad


def test_dpo_is_numerically_stable_for_large_margins():
    # β·h = −1000: naive log(sigmoid(·)) underflows to −inf; logsigmoid gives exactly 1000.
    out = dpo_loss(t(-1000.0), t(0.0), t(0.0), t(0.0), beta=1.0)
    assert torch.isfinite(out.losses).all()
    assert out.losses.item() == pytest.approx(1000.0, rel=1e-12)
    out = dpo_loss(t(0.0), t(-1000.0), t(0.0), t(0.0), beta=1.0)
    assert out.losses.item() == pytest.approx(0.0, abs=1e-300)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_dpo_rejects_non_positive_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*pair_tensors(), beta=beta)


@pytest.mark.parametrize("eps", [-0.01, 0.5, 0.7, float("nan")])
def test_dpo_rejects_bad_label_smoothing(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*pair_tensors(), beta=0.1, label_smoothing=eps)


# --------------------------------------------------------------------------------------------------------- IPO


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_loss_hand_values(beta):
    out = ipo_loss(*pair_tensors(), beta=beta)
    expected = [(margin(*p) - 1.0 / (2.0 * beta)) ** 2 for p in PAIRS]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx(
        [beta * (pc - rc) for pc, _, rc, _ in PAIRS], abs=1e-12
    )
    assert out.rejected_rewards.tolist() == pytest.approx(
        [beta * (pr - rr) for _, pr, _, rr in PAIRS], abs=1e-12
    )


def test_ipo_first_pair_spelled_out():
    # h = 1.5, β = 0.1: (1.5 − 5)² = 12.25.
    out = ipo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.5), beta=0.1)
    assert out.losses.item() == pytest.approx(12.25, abs=1e-12)


def test_ipo_minimum_at_target_margin_and_gradient():
    beta = 0.25  # target h* = 1/(2β) = 2
    pc = t(-3.0, -3.0).requires_grad_()
    out = ipo_loss(pc, t(-5.0, -4.0), t(-4.0, -4.0), t(-4.0, -4.0), beta=beta)  # h = [2, 1]
    assert out.losses.tolist() == pytest.approx([0.0, 1.0], abs=1e-12)
    out.losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([0.0, 2.0 * (1.0 - 2.0)], abs=1e-12)  # 2(h − h*)


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_ipo_rejects_non_positive_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(*pair_tensors(), beta=beta)


# --------------------------------------------------------------------------------------------------------- KTO


def test_kto_reference_point_hand_value_clamp_and_detach():
    policy = t(-3.0, -5.0, -2.0).requires_grad_()
    z = kto_reference_point(policy, t(-4.0, -5.5, -2.5))  # mean([1, 0.5, 0.5]) = 2/3
    assert z.shape == ()
    assert z.item() == pytest.approx(2.0 / 3.0, abs=1e-12)
    assert not z.requires_grad
    # A negative mean log-ratio is clamped to 0.
    assert kto_reference_point(t(-5.0, -6.0), t(-4.0, -6.5)).item() == 0.0  # mean([−1, 0.5]) = −0.25


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
def test_kto_loss_hand_values(weights):
    dw, uw = weights
    beta, z = 0.5, 0.2
    policy, ref = t(-9.0, -4.5, -6.7, -1.0), t(-10.0, -4.0, -7.0, -0.25)  # r = [1, −0.5, 0.3, −0.75]
    desirable = torch.tensor([True, False, True, False])
    out = kto_loss(policy, ref, desirable, beta=beta, z_ref=z, desirable_weight=dw, undesirable_weight=uw)
    r = [1.0, -0.5, 0.3, -0.75]
    expected = [
        dw * (1 - sigmoid(beta * (r[0] - z))),
        uw * (1 - sigmoid(beta * (z - r[1]))),
        dw * (1 - sigmoid(beta * (r[2] - z))),
        uw * (1 - sigmoid(beta * (z - r[3]))),
    ]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)  # input order, not regrouped
    assert out.chosen_rewards.tolist() == pytest.approx([beta * r[0], beta * r[2]], abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([beta * r[1], beta * r[3]], abs=1e-12)


def test_kto_z_ref_float_and_tensor_agree_and_int_labels_accepted():
    policy, ref = t(-1.0, -2.0, -3.0), t(-1.5, -1.0, -3.0)
    labels = torch.tensor([1, 0, 1])
    a = kto_loss(policy, ref, labels, beta=0.1, z_ref=0.3)
    b = kto_loss(policy, ref, labels.bool(), beta=0.1, z_ref=torch.tensor(0.3, dtype=torch.float32))
    torch.testing.assert_close(a.losses, b.losses)
    assert a.losses.dtype == torch.float64


def test_kto_with_reference_point_from_mismatched_pairs():
    policy, ref = t(-2.0, -3.0), t(-2.5, -2.0)
    kl_policy, kl_ref = t(-7.0, -8.0), t(-7.4, -8.2)  # z = 0.3
    z = kto_reference_point(kl_policy, kl_ref)
    out = kto_loss(policy, ref, torch.tensor([True, False]), beta=2.0, z_ref=z)
    assert out.losses.tolist() == pytest.approx(
        [1 - sigmoid(2.0 * (0.5 - 0.3)), 1 - sigmoid(2.0 * (0.3 - (-1.0)))], abs=1e-12
    )


def test_kto_all_one_class_gives_empty_other_rewards():
    out = kto_loss(t(-1.0, -2.0), t(-1.0, -1.0), torch.tensor([True, True]), beta=0.1, z_ref=0.0)
    assert out.chosen_rewards.shape == (2,)
    assert out.rejected_rewards.shape == (0,)


def test_kto_mirror_symmetry_at_zero_reference():
    # With z = 0 and unit weights, an undesirable example with log-ratio r costs what a desirable one with −r does.
    r = torch.linspace(-3, 3, 13, dtype=torch.float64)
    zeros = torch.zeros_like(r)
    des = kto_loss(-r, zeros, torch.ones(13, dtype=torch.bool), beta=0.8, z_ref=0.0).losses
    und = kto_loss(r, zeros, torch.zeros(13, dtype=torch.bool), beta=0.8, z_ref=0.0).losses
    torch.testing.assert_close(des, und, rtol=0, atol=1e-12)


def test_kto_rejects_non_positive_beta():
    with pytest.raises(ValueError, match="beta"):
        kto_loss(t(-1.0), t(-1.0), torch.tensor([True]), beta=0.0, z_ref=0.0)


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_contents():
    assert set(LOSSES) == {"dpo", "ipo", "kto"}
    assert get_loss("dpo").fn is dpo_loss and get_loss("dpo").kind == "paired"
    assert get_loss("ipo").fn is ipo_loss and get_loss("ipo").kind == "paired"
    assert get_loss("kto").fn is kto_loss and get_loss("kto").kind == "unpaired"


def test_registry_call_through():
    out = get_loss("dpo").fn(*pair_tensors(), beta=0.1)
    torch.testing.assert_close(out.losses, dpo_loss(*pair_tensors(), beta=0.1).losses)


@pytest.mark.parametrize("name", ["simpo", "DPO", ""])
def test_get_loss_unknown_name_lists_valid_ones(name):
    with pytest.raises(ValueError) as excinfo:
        get_loss(name)
    msg = str(excinfo.value)
    assert repr(name) in msg
    assert "dpo, ipo, kto" in msg


def test_rpo_nll_hand_values():
    from sacpo.math.preference import rpo_nll

    logps, lengths = t(-6.0, -2.0), torch.tensor([3, 4])
    torch.testing.assert_close(rpo_nll(logps, lengths, averaged=False), t(2.0, 0.5))
    # already length-averaged log-probs are only negated
    torch.testing.assert_close(rpo_nll(t(-2.0, -0.5), lengths, averaged=True), t(2.0, 0.5))
    # the gradient is −1/|y_w| per summed log-prob: it never saturates
    x = t(-6.0, -2.0).requires_grad_()
    rpo_nll(x, lengths, averaged=False).sum().backward()
    torch.testing.assert_close(x.grad, t(-1 / 3, -1 / 4))
