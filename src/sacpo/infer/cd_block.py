"""Blockwise controlled decoding ("best-of-n++", Mudgal et al. 2024 §2.3).

From the current prefix draw K blocks of M tokens from the base model (one `sacpo.models.generate.sample` call with
n = K per batch of prefixes, each prefix prefilled once), keep the block whose extended prefix has the highest
value (first index on ties), repeat until EOS or max_new_tokens. With M ≥ max_new_tokens there is one block:
best-of-K over full responses with the prefix scorer as the reward; K = 1 is plain sampling. Its KL bound
Σ_blocks (log K − (K−1)/K) (`sacpo.math.decoding.blockwise_kl_bound`) is returned here; `sacpo cd` adds the
per-block ε-estimate (`sacpo.math.decoding.blockwise_kl_estimate`) from the base log-probs of the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from sacpo.data.tokenize import Encoded
from sacpo.infer.cd_output import CDOutput, DecodeCost
from sacpo.infer.cd_stream import combined_final_values
from sacpo.math.decoding import blockwise_kl_bound
from sacpo.models.generate import sample
from sacpo.models.prefix_value import PrefixScorer


@torch.no_grad()
def block_cd(
    base: Any,
    scorers: Sequence[PrefixScorer],
    prompts: Sequence[Sequence[int]],
    eos_id: int,
    pad_id: int,
    K: int,
    M: int,
    max_new_tokens: int,
    lam: float = 0.0,
    combine: str = "safety",
    batch_size: int = 32,
    show_progress: bool = False,
) -> CDOutput:
    """Blockwise controlled decoding of one response per entry of `prompts`, using the global RNG (the draws are
    `sacpo.models.generate.sample`'s; seed it under `torch.random.fork_rng` to leave the caller's state alone).

    Each round: K blocks of min(M, tokens left) tokens per live prefix (ancestral, cut at EOS), the block
    maximising the combined value of prefix + block is appended (argmax, first on ties; K = 1 skips scoring).
    M ≥ max_new_tokens ⇒ exactly best-of-K with the scorer as reward.
    """
    if K > 1 and not scorers:
        raise ValueError("blockwise CD with K > 1 needs at least one prefix scorer")
    n = len(prompts)
    seqs = [list(p) for p in prompts]
    n_blocks = [0] * n
    cost = DecodeCost()
    bar = tqdm(total=n, desc=f"blockwise CD (K={K}, M={M})", disable=not show_progress)
    for start in range(0, n, batch_size):
        active = list(range(start, min(n, start + batch_size)))
        generated = 0
        while active:
            m = min(M, max_new_tokens - generated)
            blocks = _best_blocks(
                base, scorers, [seqs[i] for i in active], eos_id, pad_id, K, m, lam, combine, cost
            )
            generated += m
            still = []
            for i, block in zip(active, blocks, strict=True):
                seqs[i].extend(block)
                n_blocks[i] += 1
                if block and block[-1] == eos_id:
                    continue
                if generated < max_new_tokens:
                    still.append(i)
            bar.update(len(active) - len(still))
            active = still
    bar.close()
    out_seqs = [Encoded(tuple(s), len(p)) for s, p in zip(seqs, prompts, strict=True)]
    cost.generated_tokens = sum(s.response_len for s in out_seqs)
    return CDOutput(
        seqs=out_seqs,
        logp_base=[None] * n,
        logp_policy=[None] * n,
        kl=[None] * n,
        kl_topk=[None] * n,
        kl_bound=blockwise_kl_bound(K, torch.tensor(n_blocks)).tolist(),
        n_blocks=n_blocks,
        cost=cost,
    )


def _best_blocks(
    base: Any,
    scorers: Sequence[PrefixScorer],
    prefixes: list[list[int]],
    eos_id: int,
    pad_id: int,
    K: int,
    m: int,
    lam: float,
    combine: str,
    cost: DecodeCost,
) -> list[tuple[int, ...]]:
    """One round: K candidate blocks of ≤ m tokens per prefix, and per prefix the block of highest combined value
    V(prefix + block) (the first on ties; K = 1: the one block). Adds the round's tokens to `cost`."""
    cands = sample(base, prefixes, eos_id, pad_id, n=K, max_new_tokens=m, batch_size=len(prefixes))
    blocks = [c.input_ids[c.prompt_len :] for c in cands]  # (len(prefixes)·K) prompt-major
    cost.base_forward_tokens += K * sum(len(p) for p in prefixes) + sum(max(len(b) - 1, 0) for b in blocks)
    cost.base_sampled_tokens += sum(len(b) for b in blocks)
    if K > 1:
        scores, _ = combined_final_values(scorers, cands, pad_id, lam, combine, len(cands))
        cost.scorer_forward_tokens += len(scorers) * sum(len(c.input_ids) for c in cands)
        cost.scorer_calls += len(scorers) * len(cands)
        choice = scores.view(len(prefixes), K).argmax(-1).tolist()  # first max on ties
    else:
        choice = [0] * len(prefixes)
    return [blocks[a * K + choice[a]] for a in range(len(prefixes))]
