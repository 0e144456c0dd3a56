"""sacpo.math.decoding by hand: the tilted step, its exact KLs, value combinations, the CD-Q backup, the block bound.

Here's the maths used below.
  • q ∝ p·exp(V/β) on the candidates. p = (½, ¼, ¼) (all of the vocabulary), V = (0, β·log 2, 0): weights
    (½, ½, ¼) → q = (2/5, 2/5, 1/5); KL(q‖p) = 2/5·log(4/5) + 2/5·log(8/5) + 1/5·log(4/5).
  • truncation: candidates with p = (0.4, 0.2) (mass S = 0.6), equal values → q = p̃ = (2/3, 1/3), KL(q‖p̃) = 0 and
    KL(q‖p) = −log 0.6: what sampling only from the top-k costs.
  • Gibbs: q maximises E_q[V] − β·KL(q‖p̃) and the maximum is β·log Σ p̃·exp(V/β).
  • CD-Q backup: p̃ = (2/3, 1/3) on children with values (1, 2) → 4/3; terminal prefixes take the reward.
  • best-of-K per block: n_blocks·(log K − (K−1)/K); K = 1 costs nothing.
"""

import math
import subprocess
import sys

import pytest
import torch

from sacpo.math.decoding import (
    bellman_targets,
    blockwise_kl_bound,
    combine_values,
    expected_child_value,
    tilted_kl,
    tilted_logprobs,
    tilted_step,
)

D = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def test_tilted_step_by_hand():
    beta = 0.7
    logp = t(0.5, 0.25, 0.25).log()
    values = t(0.0, beta * math.log(2), 0.0)
    step = tilted_step(logp, values, beta)
    assert torch.allclose(step.logq.exp(), t(0.4, 0.4, 0.2))
    kl = 0.4 * math.log(0.8) + 0.4 * math.log(1.6) + 0.2 * math.log(0.8)
    assert step.kl.item() == pytest.approx(kl, abs=1e-12)
    assert step.kl_topk.item() == pytest.approx(kl, abs=1e-12)  # the candidates are the whole vocabulary
    assert step.log_mass.item() == pytest.approx(0.0, abs=1e-12)
    assert tilted_kl(logp, values, beta).item() == pytest.approx(kl, abs=1e-12)


def test_truncation_term():
    logp = t(0.4, 0.2).log()  # mass 0.6 of some larger vocabulary
    step = tilted_step(logp, t(1.0, 1.0), beta=0.3)
    assert torch.allclose(step.logq.exp(), t(2 / 3, 1 / 3))
    assert step.kl_topk.item() == pytest.approx(0.0, abs=1e-12)
    assert step.kl.item() == pytest.approx(-math.log(0.6), abs=1e-12)
    assert step.log_mass.item() == pytest.approx(math.log(0.6), abs=1e-12)


def test_infinite_beta_is_the_renormalised_base():
    logp = t(0.5, 0.3, 0.1).log()
    step = tilted_step(logp, t(5.0, -3.0, 100.0), math.inf)
    assert torch.allclose(step.logq.exp(), t(5, 3, 1) / 9)
    assert step.kl_topk.item() == pytest.approx(0.0, abs=1e-12)
    big = tilted_step(logp, t(5.0, -3.0, 100.0), 1e9)  # β → ∞ converges to it
    assert big.kl_topk.item() < 1e-12


def test_small_beta_is_argmax_and_kl_is_minus_log_p():
    logp = t(0.6, 0.3, 0.1).log()
    step = tilted_step(logp, t(0.0, 0.0, 1.0), 1e-4)
    assert step.logq.exp()[2].item() == pytest.approx(1.0)
    assert step.kl.item() == pytest.approx(-math.log(0.1), rel=1e-9)


def test_gibbs_variational_principle():
    torch.manual_seed(0)
    beta = 0.5
    logp = torch.log_softmax(torch.randn(6, dtype=D), -1)
    values = torch.randn(6, dtype=D)
    step = tilted_step(logp, values, beta)
    q = step.logq.exp()
    best = (q * values).sum() - beta * step.kl_topk
    assert best.item() == pytest.approx(beta * torch.logsumexp(logp + values / beta, -1).item(), abs=1e-12)
    for _ in range(50):
        other = torch.softmax(step.logq + 0.3 * torch.randn(6, dtype=D), -1)
        kl_other = (other * (other.log() - logp)).sum()
        assert (other * values).sum() - beta * kl_other <= best + 1e-12


def test_batched_shapes_and_stability():
    logp = torch.log_softmax(torch.randn(3, 4, 5, dtype=D), -1)
    values = 1e4 * torch.randn(3, 4, 5, dtype=D)  # huge tilts stay finite in log space
    step = tilted_step(logp, values, beta=1e-3)
    assert step.logq.shape == (3, 4, 5) and step.kl.shape == (3, 4)
    assert torch.isfinite(step.kl).all() and (step.kl >= -1e-12).all()
    assert torch.allclose(step.logq.exp().sum(-1), torch.ones(3, 4, dtype=D))


def test_impossible_candidate_gets_no_mass():
    logp = t(math.log(0.5), -math.inf, math.log(0.5))
    step = tilted_step(logp, t(0.0, 10.0, 0.0), 1.0)
    assert step.logq.exp()[1].item() == 0.0
    assert step.kl.item() == pytest.approx(0.0, abs=1e-12)


def test_tilt_matches_softmax_definition():
    logp, values = t(-1.0, -2.0, -0.5), t(0.3, -0.1, 0.2)
    expected = torch.softmax(logp + values / 0.25, -1).log()
    assert torch.allclose(tilted_logprobs(logp, values, 0.25), expected)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        tilted_step(t(0.0, 0.0), t(0.0, 0.0), beta)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        tilted_step(t(0.0, 0.0), t(0.0, 0.0, 0.0), 1.0)


def test_combine_values():
    vr, vg = t(1.0, 2.0), t(-1.0, 3.0)
    assert torch.equal(combine_values(vr, vg, 0.5), t(0.5, 3.5))
    assert torch.equal(combine_values(vr, vg, 0.5, kind="cost"), t(1.5, 0.5))
    assert torch.equal(combine_values(vr, None, 3.0), vr)
    assert torch.equal(combine_values(vr, vg, 0.0), vr)
    with pytest.raises(ValueError, match="lam"):
        combine_values(vr, vg, -1.0)
    with pytest.raises(ValueError, match="valid: cost, safety"):
        combine_values(vr, vg, 1.0, kind="sum")
    with pytest.raises(ValueError, match="shapes"):
        combine_values(vr, t(1.0), 1.0)


def test_bellman_backup_by_hand():
    logp = torch.stack([t(0.5, 0.25).log(), t(0.1, 0.1).log(), t(0.3, 0.6).log()])  # (3, 2)
    children = torch.stack([t(1.0, 2.0), t(3.0, 4.0), t(5.0, 6.0)])
    assert torch.allclose(expected_child_value(logp, children), t(4 / 3, 3.5, 17 / 3))
    targets = bellman_targets(logp, children, torch.tensor(7.0), torch.tensor([False, False, True]))
    assert torch.allclose(targets, t(4 / 3, 3.5, 7.0))


def test_blockwise_bound():
    assert blockwise_kl_bound(1, 5) == pytest.approx(0.0)
    assert blockwise_kl_bound(4, 3) == pytest.approx(3 * (math.log(4) - 0.75))
    out = blockwise_kl_bound(4, torch.tensor([0, 1, 2]))
    assert torch.allclose(out, t(0.0, 1.0, 2.0) * (math.log(4) - 0.75))
    with pytest.raises(ValueError):
        blockwise_kl_bound(0, 1)
    with pytest.raises(ValueError):
        blockwise_kl_bound(2, -1)


def test_decoding_imports_without_transformers():
    code = (
        "import sys\nimport sacpo.math.decoding\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
