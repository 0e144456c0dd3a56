"""Token-wise controlled decoding (Mudgal et al. 2024, "Controlled Decoding from Language Models", Eq. 4; FUDGE,
Yang & Klein 2021).

At every step take the base model's top-k next tokens, score each continuation (x, y^t z) with the prefix scorer(s)
— one batched forward of B·k single tokens on a KV cache expanded k-fold, the chosen child's cache kept — and sample
from q(z) ∝ p(z)·exp(V(x, y^t z)/β) (`sacpo.math.decoding.tilted_step`), V = V_r + λ·V_g with a second scorer. The
sequence KL is the sum over the sampled path of the *exact* per-step KL(q_t‖p_t) to the full base distribution (an
unbiased estimate of KL(π_CD‖π_base)); `kl_topk` is the same against the top-k-renormalised base. β = ∞ with
top_k ≥ |vocabulary| is plain sampling from the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from sacpo.data.tokenize import Encoded
from sacpo.infer.cd_output import CDOutput
from sacpo.infer.cd_stream import KVStream, base_forward, combined, scorer_forward
from sacpo.math.decoding import TiltedStep, tilted_step
from sacpo.models.generate import left_pad
from sacpo.models.prefix_value import PrefixScorer


@dataclass(frozen=True)
class _Settings:
    eos_id: int
    pad_id: int
    beta: float
    top_k: int
    max_new_tokens: int
    lam: float
    combine: str
    generator: torch.Generator | None


@torch.no_grad()
def token_cd(
    base: Any,
    scorers: Sequence[PrefixScorer],
    prompts: Sequence[Sequence[int]],
    eos_id: int,
    pad_id: int,
    beta: float,
    top_k: int,
    max_new_tokens: int,
    lam: float = 0.0,
    combine: str = "safety",
    batch_size: int = 32,
    trace: bool = False,
    show_progress: bool = False,
    generator: torch.Generator | None = None,
) -> CDOutput:
    """Token-wise controlled decoding of one response per entry of `prompts` (token ids).

    Per step and row: base top-k (log p over the full vocabulary), values of the k children from every scorer,
    combined (V_r + λ·V_g), q = tilt, one draw from `generator` (on the base model's device; None = the global
    RNG). Rows stop at EOS (kept) or max_new_tokens. trace=True records every step's candidates and values.
    """
    if not scorers:
        raise ValueError("token-wise CD needs at least one prefix scorer")
    n = len(prompts)
    out = CDOutput(
        seqs=[],
        logp_base=[0.0] * n,
        logp_policy=[0.0] * n,
        kl=[0.0] * n,
        kl_topk=[0.0] * n,
        kl_bound=[None] * n,
        n_blocks=[None] * n,
        traces=[[] for _ in range(n)] if trace else None,
    )
    settings = _Settings(eos_id, pad_id, beta, top_k, max_new_tokens, lam, combine, generator)
    responses: list[list[int]] = [[] for _ in range(n)]
    bar = tqdm(total=n, desc=f"token-wise CD (β={beta:g}, k={top_k})", disable=not show_progress)
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(n, start + batch_size))  # global row index of each live row
        _decode_batch(base, scorers, prompts, rows, settings, out, responses, bar)
    bar.close()
    out.seqs = [Encoded(tuple(p) + tuple(r), len(p)) for p, r in zip(prompts, responses, strict=True)]
    out.cost.generated_tokens = sum(len(r) for r in responses)
    return out


def _decode_batch(
    base: Any,
    scorers: Sequence[PrefixScorer],
    prompts: Sequence[Sequence[int]],
    rows: torch.Tensor,
    st: _Settings,
    out: CDOutput,
    responses: list[list[int]],
    bar: Any,
) -> None:
    """Decode the rows `rows` (B,) together until each has ended; finished rows leave the batch (and the caches)."""
    device = next(base.parameters()).device
    cost = out.cost
    ids, attn = (
        t.to(device) for t in left_pad([list(prompts[i]) for i in rows.tolist()], st.pad_id)
    )  # (B, P)
    prompt_tokens = int(attn.sum())
    base_s = KVStream(base_forward(base), ids, attn)
    scorer_s = [KVStream(scorer_forward(s), ids, attn) for s in scorers]
    cost.base_forward_tokens += prompt_tokens
    cost.scorer_forward_tokens += prompt_tokens * len(scorers)
    for t in range(st.max_new_tokens):
        b = len(rows)
        z = _step(base_s, scorer_s, rows, st, out, responses)  # (b,)
        cost.base_sampled_tokens += b
        keep = (z != st.eos_id).nonzero().flatten()
        bar.update(b - len(keep) if t < st.max_new_tokens - 1 else b)
        if len(keep) == 0 or t == st.max_new_tokens - 1:
            break
        if len(keep) < b:
            base_s.reorder(keep)
            for s in scorer_s:
                s.reorder(keep)
            rows, z = rows[keep.cpu()], z[keep]
        base_s.step(z)
        cost.base_forward_tokens += len(rows)


def _step(
    base_s: KVStream,
    scorer_s: list[KVStream],
    rows: torch.Tensor,
    st: _Settings,
    out: CDOutput,
    responses: list[list[int]],
) -> torch.Tensor:
    """One token per live row: top-k of the base, the k children's values, q = tilt, a draw. Returns z (b,)."""
    b = len(rows)
    device = base_s.last.device
    logp = torch.log_softmax(base_s.last.double(), -1)  # (b, V) float64: exact KLs to ~1e-12
    k = min(st.top_k, logp.shape[-1])
    top_logp, top_ids = logp.topk(k, dim=-1)  # (b, k)
    expand = torch.arange(b, device=device).repeat_interleave(k)  # (b·k,)
    values = []
    for s in scorer_s:
        s.reorder(expand)
        values.append(s.step(top_ids.reshape(-1)).view(b, k))  # (b, k)
    out.cost.scorer_forward_tokens += b * k * len(scorer_s)
    out.cost.scorer_calls += b * k * len(scorer_s)
    v = combined(values, st.lam, st.combine)  # (b, k)
    step = tilted_step(top_logp.double(), v.double(), st.beta)
    choice = torch.multinomial(step.logq.exp(), 1, generator=st.generator).squeeze(-1)  # (b,)
    ar = torch.arange(b, device=device)
    for s in scorer_s:
        s.reorder(ar * k + choice)  # keep the chosen child's cache
    _record(out, responses, rows, top_ids, top_logp, v, step, choice)
    return top_ids[ar, choice]  # (b,)


def _record(
    out: CDOutput,
    responses: list[list[int]],
    rows: torch.Tensor,
    top_ids: torch.Tensor,
    top_logp: torch.Tensor,
    v: torch.Tensor,
    step: TiltedStep,
    choice: torch.Tensor,
) -> None:
    """Append the drawn tokens and add their log p, log q and per-step KLs to each row's sums (and trace)."""
    ar = torch.arange(len(rows), device=choice.device)
    z_list, rows_list = top_ids[ar, choice].tolist(), rows.tolist()
    lp_base = top_logp[ar, choice].double().cpu().tolist()
    lp_q = step.logq[ar, choice].cpu().tolist()
    kls, kls_topk = step.kl.cpu().tolist(), step.kl_topk.cpu().tolist()
    for a, i in enumerate(rows_list):
        responses[i].append(z_list[a])
        out.logp_base[i] += lp_base[a]
        out.logp_policy[i] += lp_q[a]
        out.kl[i] += kls[a]
        out.kl_topk[i] += kls_topk[a]
        if out.traces is not None:
            out.traces[i].append(
                {
                    "ids": top_ids[a].cpu(),
                    "logp": top_logp[a].double().cpu(),
                    "values": v[a].double().cpu(),
                    "choice": int(choice[a]),
                    "kl": kls[a],
                    "kl_topk": kls_topk[a],
                }
            )
