"""KL(π‖π_ref) on held-out prompts by sampling from π — the tutorial's training-health signal.

KL(π(·|x)‖π_ref(·|x)) ≈ mean over y ~ π(·|x) of k(log π(y|x), log π_ref(y|x)), with a sequence-level estimator k of
`sacpo.math.kl.KL_ESTIMATORS` (k1 = log r, unbiased, the default; k3 = (1/r − 1) + log r, unbiased and ≥ 0; k2 =
½(log r)², biased, low variance), reported with its standard error. < 8 nats is fine; > 15 inspect for reward
hacking; > 100 results unlikely useful.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from sacpo.math.kl import get_kl_estimator, mean_and_stderr
from sacpo.models.generate import sample
from sacpo.models.logprobs import batched_sequence_logps
from sacpo.rng import torch_seeded


def estimate_kl(
    policy: Any,
    reference: Any,
    prompts: list[list[int]],
    eos_id: int,
    pad_id: int,
    n_samples: int = 2,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    chunk: int = 256,
    reference_context: contextlib.AbstractContextManager | None = None,
    estimator: str = "k1",
) -> dict[str, float]:
    """Sample from `policy`, score with both models; returns kl, kl_stderr, response length and n.

    `reference` may be the policy itself with `reference_context` disabling its LoRA adapter. The global RNG is
    forked, so estimating KL does not change the training trajectory.
    """
    was_training = policy.training
    policy.eval()
    with torch_seeded(seed):
        seqs = sample(policy, prompts, eos_id, pad_id, n_samples, max_new_tokens, batch_size=batch_size)
    logp = batched_sequence_logps(policy, seqs, pad_id, batch_size, chunk, sort=False).float()  # (M,)
    with reference_context or contextlib.nullcontext():
        logq = batched_sequence_logps(reference, seqs, pad_id, batch_size, chunk, sort=False).float()  # (M,)
    policy.train(was_training)
    kl, stderr = mean_and_stderr(get_kl_estimator(estimator)(logp, logq))  # (M,) per-sample values
    lengths = torch.tensor([s.response_len for s in seqs], dtype=torch.float32)
    return {"kl": kl, "kl_stderr": stderr, "kl_response_len": lengths.mean().item(), "kl_n": float(len(seqs))}
