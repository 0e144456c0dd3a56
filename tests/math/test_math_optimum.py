"""The SNIS estimator of π* ∝ π_SFT·exp(t): hand-computed values and exact enumeration."""

import math

import pytest
import torch

from sacpo.math.optimum import log_mixture_density, optimum_objective, tilted_estimate, weighted_win_rate


def test_hand_computed_two_samples():
    # samples from SFT, t = [0, log 3]: Ẑ = (1 + 3)/2 = 2, weights (¼, ¾), KL = ¾·log 3 − log 2, ESS = 1/(1/16 + 9/16)
    est = tilted_estimate([0.0, math.log(3.0)], values={"r": [1.0, 5.0]})
    assert est.log_z == pytest.approx(math.log(2.0))
    assert est.weights.tolist() == pytest.approx([0.25, 0.75])
    assert est.kl == pytest.approx(0.75 * math.log(3.0) - math.log(2.0))
    assert est.ess == pytest.approx(1.0 / (1 / 16 + 9 / 16))
    assert est.expect["r"] == pytest.approx(0.25 * 1 + 0.75 * 5)


def test_converges_to_the_exact_optimum_from_a_mixture():
    # a categorical "policy" over 6 outcomes, enumerable: exact π* = p·e^t / Z
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.009, 0.001], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.0, 4.0, 6.0, 8.0], dtype=torch.float64)
    exact = p * t.exp() / (p * t.exp()).sum()
    exact_kl = float((exact * (exact / p).log()).sum())
    exact_log_z = float((p * t.exp()).sum().log())
    q2 = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.3, 0.3], dtype=torch.float64)  # a proposal on the tail
    n1, n2 = 20_000, 20_000
    idx = torch.cat(
        [torch.multinomial(p, n1, True, generator=g), torch.multinomial(q2, n2, True, generator=g)]
    )
    logps = torch.stack([p.log()[idx], q2.log()[idx]])  # (K=2, N)
    log_q = log_mixture_density(logps, [n1, n2])
    est = tilted_estimate(t[idx], p.log()[idx] - log_q, {"x": idx.double()})
    assert est.log_z == pytest.approx(exact_log_z, abs=0.02)
    assert est.kl == pytest.approx(exact_kl, abs=0.02)
    assert est.expect["x"] == pytest.approx(float((exact * torch.arange(6)).sum()), abs=0.02)
    # the SFT samples alone rarely see the outcome holding most of π*'s mass: the mixture is what makes it exact
    sft_only = tilted_estimate(t[idx[:200]])
    assert sft_only.ess < est.ess


def test_mixture_density_is_the_weighted_sum():
    logps = torch.log(torch.tensor([[0.5, 0.1], [0.2, 0.4]], dtype=torch.float64))
    out = log_mixture_density(logps, [3, 1])
    assert out.exp().tolist() == pytest.approx([0.75 * 0.5 + 0.25 * 0.2, 0.75 * 0.1 + 0.25 * 0.4])
    with pytest.raises(ValueError):
        log_mixture_density(logps, [0, 0])


def test_weighted_win_rate_and_objective():
    assert weighted_win_rate([1.0, 3.0], [0.5, 0.5], [2.0]) == pytest.approx(0.5)
    assert weighted_win_rate([2.0], [1.0], [2.0, 1.0]) == pytest.approx(0.75)  # a tie counts ½
    assert optimum_objective(math.log(2.0), beta=0.1, scale=2.0) == pytest.approx(0.05 * math.log(2.0))
    with pytest.raises(ValueError):
        tilted_estimate([0.0, float("inf")])
