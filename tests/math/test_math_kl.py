"""sacpo.math.kl: k1/k2/k3 by hand, Monte Carlo against exact categorical KL, sequence KL, stderr, health."""

import math

import pytest
import torch

from sacpo.math.kl import (
    KL_ESTIMATORS,
    KL_INSPECT,
    KL_USELESS,
    get_kl_estimator,
    kl_health,
    kl_k1,
    kl_k2,
    kl_k3,
    mean_and_stderr,
    sequence_kl,
)

P = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)
Q_FAR = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.1, 0.1], dtype=torch.float64)
Q_NEAR = torch.tensor([0.38, 0.26, 0.15, 0.11, 0.06, 0.04], dtype=torch.float64)
N_SAMPLES = 200_000


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.log() - q.log())).sum())


def sample_logps(p: torch.Tensor, q: torch.Tensor, n: int, seed: int, shape=None):
    """Samples y ~ p; returns (log p(y), log q(y))."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(p, n, replacement=True, generator=g)
    if shape is not None:
        y = y.reshape(shape)
    return p.log()[y], q.log()[y]


# ------------------------------------------------------------------------------------------------ hand values


def test_estimators_hand_values():
    # l = log π − log π_ref = 1:  k1 = 1,  k2 = ½,  k3 = e^{−1} − 1 + 1 = e^{−1}.
    lp, lr = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    assert kl_k1(lp, lr).item() == pytest.approx(1.0)
    assert kl_k2(lp, lr).item() == pytest.approx(0.5)
    assert kl_k3(lp, lr).item() == pytest.approx(math.exp(-1.0), abs=1e-12)
    # l = −2:  k1 = −2,  k2 = 2,  k3 = e² − 1 − 2.
    assert kl_k1(lr, lp + 1.0).item() == pytest.approx(-2.0)
    assert kl_k2(lr, lp + 1.0).item() == pytest.approx(2.0)
    assert kl_k3(lr, lp + 1.0).item() == pytest.approx(math.exp(2.0) - 3.0, abs=1e-12)


def test_estimators_elementwise_any_shape():
    g = torch.Generator().manual_seed(0)
    a, b = -5 * torch.rand(2, 3, 4, generator=g), -5 * torch.rand(2, 3, 4, generator=g)
    for f in (kl_k1, kl_k2, kl_k3):
        assert f(a, b).shape == (2, 3, 4)
    torch.testing.assert_close(kl_k1(a, b), a - b)
    torch.testing.assert_close(kl_k2(a, b), 0.5 * (a - b) ** 2)
    torch.testing.assert_close(kl_k3(a, b), torch.exp(b - a) - 1 - (b - a))


def test_k2_and_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(1)
    a = -30 * torch.rand(10_000, generator=g, dtype=torch.float64)
    b = -30 * torch.rand(10_000, generator=g, dtype=torch.float64)
    assert (kl_k3(a, b) >= 0).all()
    assert (kl_k2(a, b) >= 0).all()
    assert (kl_k3(a, a) == 0).all()
    assert (kl_k2(a, a) == 0).all()
    # Tiny log-ratios: expm1 keeps k3 ≈ l²/2 accurate (no cancellation to 0 or negatives).
    small = torch.tensor([1e-6], dtype=torch.float64)
    assert kl_k3(small, torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(0.5e-12, rel=1e-5)
    assert (kl_k3(a.float(), (a + 1e-7).float()) >= 0).all()


def test_registry_and_unknown_name():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert get_kl_estimator("k1") is kl_k1
    assert get_kl_estimator("k2") is kl_k2
    assert get_kl_estimator("k3") is kl_k3
    with pytest.raises(ValueError) as excinfo:
        get_kl_estimator("k4")
    assert "'k4'" in str(excinfo.value)
    assert "k1, k2, k3" in str(excinfo.value)


# ---------------------------------------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize("q", [Q_FAR, Q_NEAR], ids=["far", "near"])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_k3_unbiased_against_exact_categorical_kl(q, estimator):
    kl = exact_kl(P, q)
    lp, lq = sample_logps(P, q, N_SAMPLES, seed=0)
    mean, stderr = mean_and_stderr(get_kl_estimator(estimator)(lp, lq))
    assert abs(mean - kl) < 5 * stderr + 1e-9, (mean, kl, stderr)
    assert abs(mean - kl) < 0.01


def test_k3_has_lower_variance_than_k1_for_close_distributions():
    lp, lq = sample_logps(P, Q_NEAR, N_SAMPLES, seed=2)
    _, se1 = mean_and_stderr(kl_k1(lp, lq))
    _, se3 = mean_and_stderr(kl_k3(lp, lq))
    assert se3 < se1 / 10


def test_k2_approximates_kl_for_close_distributions():
    kl = exact_kl(P, Q_NEAR)
    lp, lq = sample_logps(P, Q_NEAR, N_SAMPLES, seed=3)
    mean, _ = mean_and_stderr(kl_k2(lp, lq))
    assert mean == pytest.approx(kl, rel=0.05)


def test_k1_can_be_negative_per_sample_but_k3_cannot():
    lp, lq = sample_logps(P, Q_FAR, 1000, seed=4)
    assert (kl_k1(lp, lq) < 0).any()
    assert (kl_k3(lp, lq) >= 0).all()


# ------------------------------------------------------------------------------------------------ sequence KL


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_sequence_kl_is_masked_sum_of_token_estimates(estimator):
    g = torch.Generator().manual_seed(5)
    pol, ref = -3 * torch.rand(4, 6, generator=g), -3 * torch.rand(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1]])
    out = sequence_kl(pol, ref, mask, estimator=estimator)
    assert out.shape == (4,)
    per_token = KL_ESTIMATORS[estimator](pol, ref)
    expected = torch.stack([per_token[i][mask[i].bool()].sum() for i in range(4)])
    torch.testing.assert_close(out, expected)
    assert out[2].item() == 0.0


def test_sequence_kl_default_is_k1_log_ratio():
    pol = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert sequence_kl(pol, ref, mask).item() == pytest.approx((-1.0 + 1.5) + (-2.0 + 1.0))


def test_sequence_kl_unknown_estimator_raises():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        sequence_kl(x, x, torch.ones(1, 2), estimator="exact")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sequence_kl_unbiased_for_iid_tokens(estimator):
    # T i.i.d. tokens: KL of the sequence distributions is T·KL(p‖q); the first T−1 tokens are real, one padded.
    t = 4
    lp, lq = sample_logps(P, Q_FAR, 50_000 * (t + 1), seed=6, shape=(50_000, t + 1))
    mask = torch.ones(50_000, t + 1)
    mask[:, -1] = 0
    lp[:, -1], lq[:, -1] = 0.0, 0.0  # padding positions as token_logprobs leaves them
    mean, stderr = mean_and_stderr(sequence_kl(lp, lq, mask, estimator=estimator))
    assert abs(mean - t * exact_kl(P, Q_FAR)) < 5 * stderr


# ------------------------------------------------------------------------------------------- mean and stderr


def test_mean_and_stderr_hand_values():
    mean, se = mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # s² = ((1.5)² + (0.5)² + (0.5)² + (1.5)²)/3 = 5/3;  se = √(5/3)/√4.
    assert isinstance(mean, float) and isinstance(se, float)
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(5.0 / 3.0) / 2.0, rel=1e-12)


def test_mean_and_stderr_flattens_and_detaches():
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]], requires_grad=True)
    mean, se = mean_and_stderr(x)
    assert mean == pytest.approx(4.0)
    assert se == pytest.approx(math.sqrt(20.0 / 3.0) / 2.0, rel=1e-6)


def test_mean_and_stderr_degenerate_sizes():
    mean, se = mean_and_stderr(torch.tensor([3.5]))
    assert mean == 3.5 and math.isnan(se)
    mean, se = mean_and_stderr(torch.tensor([]))
    assert math.isnan(mean) and math.isnan(se)
    mean, se = mean_and_stderr(torch.full((5,), 2.0))
    assert mean == 2.0 and se == 0.0


# ------------------------------------------------------------------------------------------------- KL health


def test_kl_health_thresholds():
    assert KL_INSPECT == 15.0
    assert KL_USELESS == 100.0
    for fine in (-3.0, 0.0, 1.0, 14.9, 15.0):  # threshold is strict: exactly 15 nats is fine
        assert kl_health(fine) is None
    for inspect in (15.01, 50.0, 100.0):
        msg = kl_health(inspect)
        assert msg is not None and "reward hacking" in msg and "> 15" in msg
    for useless in (100.01, 1e4, float("inf")):
        msg = kl_health(useless)
        assert msg is not None and "unlikely useful" in msg and "> 100" in msg


def test_kl_health_message_contains_value_and_nan():
    assert "42.5 nats" in kl_health(42.5)
    msg = kl_health(float("nan"))
    assert msg is not None and "NaN" in msg
