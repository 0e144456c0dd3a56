"""sacpo.math.logprobs: chunked label log-probs against log_softmax + gather, and masked reductions by hand."""

import math

import pytest
import torch

from sacpo.math.logprobs import IGNORE_INDEX, masked_mean, masked_sum, token_logprobs


def random_batch(
    b: int = 3, t: int = 7, v: int = 11, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(b, t, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = IGNORE_INDEX  # prompt-like prefix
    labels[1, -3:] = IGNORE_INDEX  # padding-like suffix
    labels[2, 3] = IGNORE_INDEX  # a hole in the middle
    return logits, labels


def reference_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    mask = labels != ignore_index
    full = torch.log_softmax(logits.float(), dim=-1)
    picked = full.gather(-1, labels.clamp(min=0).masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 6, 7, 8, 256])
def test_token_logprobs_matches_log_softmax_gather(chunk_size):
    logits, labels = random_batch()
    out = token_logprobs(logits, labels, chunk_size=chunk_size)
    assert out.shape == labels.shape
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_logprobs(logits, labels), rtol=0, atol=1e-5)


def test_token_logprobs_ignored_positions_are_exactly_zero():
    logits, labels = random_batch()
    out = token_logprobs(logits, labels, chunk_size=3)
    ignored = labels == IGNORE_INDEX
    assert ignored.sum() == 6
    assert (out[ignored] == 0).all()
    assert (out[~ignored] < 0).all()


def test_token_logprobs_ignored_positions_zero_even_with_nonfinite_logits():
    logits, labels = random_batch()
    logits[1, -1] = float("-inf")  # all-(−inf) row at an ignored position would give NaN before masking
    logits[1, -2] = float("nan")
    out = token_logprobs(logits, labels)
    assert torch.isfinite(out).all()
    assert (out[1, -3:] == 0).all()


def test_token_logprobs_hand_value():
    # logits (0, ln 2, ln 3) → probabilities (1/6, 2/6, 3/6).
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(3.0)]] * 3], dtype=torch.float64)  # (1, 3, 3)
    labels = torch.tensor([[2, 0, IGNORE_INDEX]])
    out = token_logprobs(logits, labels, chunk_size=2)
    assert out.tolist()[0] == pytest.approx([math.log(0.5), math.log(1.0 / 6.0), 0.0], abs=1e-6)


def test_token_logprobs_custom_ignore_index():
    logits, labels = random_batch()
    labels = labels.masked_fill(labels == IGNORE_INDEX, -1)
    out = token_logprobs(logits, labels, chunk_size=4, ignore_index=-1)
    torch.testing.assert_close(out, reference_logprobs(logits, labels, ignore_index=-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logprobs_low_precision_logits_computed_in_float32(dtype):
    logits, labels = random_batch(dtype=dtype)
    out = token_logprobs(logits, labels, chunk_size=2)
    assert out.dtype == torch.float32
    # Same as the float32 computation on the (already rounded) logits, not a bf16/fp16 logsumexp.
    torch.testing.assert_close(out, reference_logprobs(logits.float(), labels), rtol=0, atol=1e-5)


def test_token_logprobs_gradient_matches_reference():
    logits, labels = random_batch(t=5)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    (token_logprobs(a, labels, chunk_size=2) * weights).sum().backward()
    (reference_logprobs(b, labels) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


def test_token_logprobs_empty_sequence():
    out = token_logprobs(torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2, 0)
    assert out.dtype == torch.float32


def test_token_logprobs_misaligned_shapes_raise():
    logits, labels = random_batch()
    with pytest.raises(ValueError, match="do not align"):
        token_logprobs(logits[:, :-1], labels)


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_token_logprobs_bad_chunk_size_raises(chunk_size):
    logits, labels = random_batch()
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, labels, chunk_size=chunk_size)


def test_token_logprobs_sum_is_sequence_logprob():
    # Σ_t log p(y_t) over the unmasked tokens equals the log of the product of the per-token probabilities.
    logits, labels = random_batch(dtype=torch.float64)
    mask = labels != IGNORE_INDEX
    seq = masked_sum(token_logprobs(logits, labels, chunk_size=3), mask)
    probs = torch.softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = torch.where(mask, probs, torch.ones_like(probs)).prod(-1).log()
    torch.testing.assert_close(seq, expected.float(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ masked reductions

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, 0.5, 2.0]])
MASK = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize("mask", [MASK, MASK.bool(), MASK.float()])
def test_masked_sum_by_hand(mask):
    assert masked_sum(VALUES, mask).tolist() == pytest.approx([4.0, 0.0, 1.5])


@pytest.mark.parametrize("mask", [MASK, MASK.bool(), MASK.float()])
def test_masked_mean_by_hand(mask):
    # An all-masked row divides by max(1, 0) = 1 and gives 0, not NaN.
    assert masked_mean(VALUES, mask).tolist() == pytest.approx([2.0, 0.0, 0.5])


def test_masked_reductions_keep_dtype_and_leading_dims():
    v = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    m = torch.ones(2, 3, 4, dtype=torch.bool)
    assert masked_sum(v, m).shape == (2, 3)
    assert masked_sum(v, m).dtype == torch.float64
    torch.testing.assert_close(masked_mean(v, m), v.mean(-1))
