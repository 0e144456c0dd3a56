"""Controlled decoding (`run_cd`): token-wise CD and blockwise CD ("best-of-n++") with prefix scorers.

Token-wise (Mudgal et al. 2024, "Controlled Decoding from Language Models", Eq. 4; FUDGE, Yang & Klein 2021): at
every step take the base model's top-k next tokens, score each continuation (x, y^t z) with the prefix scorer —
one batched forward of B·k single tokens on a KV cache expanded k-fold, the chosen child's cache kept — and sample
from q(z) ∝ p(z)·exp(V(x, y^t z)/β) (`sacpo.math.decoding.tilted_step`). The sequence KL reported is the sum over
the sampled path of the *exact* per-step KL(q_t‖p_t) to the full base distribution (an unbiased estimate of
KL(π_CD‖π_base); `kl_topk` is the same against the top-k-renormalised base, see `sacpo.math.decoding`).
β = math.inf with top_k ≥ |vocabulary| is plain sampling from the base model.

Blockwise (Mudgal et al. 2024 §2.3): from the current prefix draw K blocks of M tokens from the base model (one
`sacpo.models.generate.sample` call with n = K per batch of prefixes, each prefix prefilled once), keep the block
whose extended prefix has the highest value (first index on ties), repeat until EOS or max_new_tokens. With M ≥
max_new_tokens there is one block: best-of-K over full responses with the prefix scorer as the reward; K = 1 is
plain sampling. Its KL is reported as the upper bound Σ_blocks (log K − (K−1)/K)
(`sacpo.math.decoding.blockwise_kl_bound`), not a value.

Several objectives (inference-time SACPO): with a second, safety prefix scorer V_g and λ > 0 every value above is
V = V_r + λ·V_g (`combine: cost` for a cost scorer: V_r − λ·V_c), the decoding analogue of π ∝ π_ref·exp((r+λg)/β).

Cost: tokens processed by forward passes (prompt prefill included, padding excluded), of the base model and of
the scorer(s), and tokens *sampled* from the base model, each also per generated token; `plain_sampling_tokens` is
what ancestral sampling of the same responses would process, so cost_ratio = total / plain. Blockwise here
re-encodes the prefix every block (no cache kept across `sample` calls), so its forward count is that of this
implementation; its sampled-token count (K per generated token) is implementation-independent.

Outputs (`<output_dir>.tmp`, renamed when complete): samples.jsonl — rows readable by
`sacpo.evaluate.generate.read_samples` (prompt, response, sample, logp_policy = log q(y) for token-wise CD or None,
logp_ref = log π_base(y), prompt_index, response_tokens, finished, roundtrip, plus value, kl, gold scores …) —,
summary.json and config.yaml. With an oracle (and `baseline_samples`, the default) also baseline.jsonl — n_samples
plain ancestral samples per prompt from the base model (seed + 1), the win-rate opponents: sample s of CD against
base sample s of the same prompt, as `sacpo eval` pairs a model with SFT — and results.json: ModelMetrics rows
("base", family sft; the CD run, family cd-token (param β), cd-block (param K) or cd-bon (one block of
M ≥ max_new_tokens: best-of-K by the scorer, param K)) judged by the gold oracle, for `sacpo report`. Their KL is
the exact per-token sum (token-wise) or the upper bound (blockwise) — `sacpo.evaluate.plots.KL_KINDS` labels it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sacpo.config import ConfigError, help_field, to_yaml
from sacpo.data.prompts import load_prompts
from sacpo.data.tokenize import Encoded, encode_prompt, pad_sequences
from sacpo.math.decoding import COMBINERS, blockwise_kl_bound, combine_values, tilted_step
from sacpo.models.load import (
    ModelLoadError,
    check_model_dir,
    fingerprint_tokenizer,
    load_model,
    load_tokenizer,
)
from sacpo.models.modules import cache_kwargs, output_cache, resolve_device
from sacpo.models.prefix_value import META_FILE, PrefixScorer, decode_response, positions_from_mask
from sacpo.scoring import resolve_scorer

log = logging.getLogger("sacpo.cd")

ORACLES = {"toyworld": ("toyworld-gold", "toyworld-safety")}  # gold reward, gold safety (scorer names)
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
BASELINE_FILE = "baseline.jsonl"
RESULTS_FILE = "results.json"


# ------------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class CDConfig:
    model: str = help_field(help="base causal-LM directory (safetensors)")
    scorer: str = help_field(help="reward prefix scorer directory (train_prefix_scorer output)")
    prompts: str = help_field(
        help="prompts: .json (list or splits, e.g. toyworld prompts.json) / .jsonl / .txt"
    )
    output_dir: str = help_field(help="writes samples.jsonl, summary.json, config.yaml")
    mode: str = help_field(
        "token", help="token (token-wise CD) | block (blockwise CD; M ≥ max_new_tokens = BoN)"
    )
    beta: float = help_field(
        1.0, help="token-wise: q ∝ p·exp(V/β); larger = closer to the base model (inf ok)"
    )
    top_k: int = help_field(10, help="token-wise: candidates per step (the base model's top-k)")
    K: int = help_field(4, help="blockwise: candidate blocks per step (best-of-K)")
    M: int = help_field(4, help="blockwise: tokens per block")
    safety_scorer: str | None = help_field(
        None, help="second prefix scorer (safety g, or cost c with combine=cost); not loaded when lam = 0"
    )
    lam: float = help_field(0.0, help="λ of V = V_r + λ·V_g (or V_r − λ·V_c); > 0 needs safety_scorer")
    combine: str = help_field("safety", help="safety: V_r + λ·V_g | cost: V_r − λ·V_c")
    prompts_split: str = help_field("test", help="key of the prompt list when the .json maps splits")
    max_prompts: int | None = help_field(None, help="use the first N prompts only")
    n_samples: int = help_field(4, help="responses per prompt")
    max_new_tokens: int = help_field(40, help="max response tokens")
    max_prompt_length: int = help_field(128, help="prompts are left-truncated to this many tokens")
    batch_size: int = help_field(
        32, help="sequences decoded together (blockwise: prefixes per sampling call)"
    )
    oracle: str | None = help_field(None, help="gold oracle scoring the outputs (toyworld) or null")
    baseline_samples: bool = help_field(
        True,
        help="with an oracle: draw n_samples plain base samples per prompt (seed + 1) as win-rate opponents and "
        "write results.json (ModelMetrics rows for `sacpo report`)",
    )
    seed: int = help_field(0, help="sampling seed")
    device: str = help_field("auto", help="auto (cuda if available) | cpu | cuda | cuda:N")

    def __post_init__(self) -> None:
        validate_cd_config(self)


def validate_cd_config(cfg: CDConfig) -> None:
    """Reject impossible values before any model loads (ConfigError)."""
    checks = [
        (cfg.mode in DECODERS, f"unknown mode {cfg.mode!r}; valid: {', '.join(DECODERS)}"),
        (cfg.beta > 0, f"beta must be > 0 (inf = no tilt), got {cfg.beta}"),
        (cfg.top_k >= 1, f"top_k must be >= 1, got {cfg.top_k}"),
        (cfg.K >= 1, f"K must be >= 1, got {cfg.K}"),
        (cfg.M >= 1, f"M must be >= 1, got {cfg.M}"),
        (cfg.lam >= 0 and math.isfinite(cfg.lam), f"lam must be >= 0 and finite, got {cfg.lam}"),
        (cfg.combine in COMBINERS, f"unknown combine {cfg.combine!r}; valid: {', '.join(sorted(COMBINERS))}"),
        (cfg.lam == 0 or cfg.safety_scorer is not None, f"lam={cfg.lam} > 0 needs a safety_scorer"),
        (cfg.n_samples >= 1, f"n_samples must be >= 1, got {cfg.n_samples}"),
        (cfg.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
        (cfg.max_prompt_length >= 1, f"max_prompt_length must be >= 1, got {cfg.max_prompt_length}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.max_prompts is None or cfg.max_prompts >= 1, f"max_prompts must be >= 1, got {cfg.max_prompts}"),
        (
            cfg.oracle is None or cfg.oracle in ORACLES,
            f"unknown oracle {cfg.oracle!r}; valid: {', '.join(sorted(ORACLES))} or null",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ------------------------------------------------------------------------------------------------------ output
@dataclass
class DecodeCost:
    """Tokens processed by forward passes (padding excluded) and tokens sampled from the base model."""

    base_forward_tokens: int = 0
    scorer_forward_tokens: int = 0
    base_sampled_tokens: int = 0
    generated_tokens: int = 0  # tokens of the returned responses

    def per_generated_token(self) -> dict[str, float | None]:
        """Each count divided by generated_tokens (None when nothing was generated: undefined, not 0)."""
        n = self.generated_tokens
        if n == 0:
            return {"base_forward": None, "scorer_forward": None, "total_forward": None, "base_sampled": None}
        return {
            "base_forward": self.base_forward_tokens / n,
            "scorer_forward": self.scorer_forward_tokens / n,
            "total_forward": (self.base_forward_tokens + self.scorer_forward_tokens) / n,
            "base_sampled": self.base_sampled_tokens / n,
        }


@dataclass
class CDOutput:
    """Decoded sequences (prompt ids + response ids) in input order, with per-sequence statistics."""

    seqs: list[Encoded]
    logp_base: list[float | None]  # log π_base(y|x) (full vocabulary)
    logp_policy: list[float | None]  # log q(y|x) for token-wise CD; None for blockwise
    kl: list[float | None]  # token-wise: Σ_t KL(q_t‖p_t) on the path (exact per step)
    kl_topk: list[float | None]  # token-wise: Σ_t KL(q_t‖p̃_t)
    kl_bound: list[float | None]  # blockwise: n_blocks·(log K − (K−1)/K)
    n_blocks: list[int | None]
    cost: DecodeCost = field(default_factory=DecodeCost)
    traces: list[list[dict[str, Any]]] | None = None  # token-wise with trace=True: per step candidates/values


# ------------------------------------------------------------------------------------------ incremental models
class _Stream:
    """A model fed incrementally over a left-padded batch with a KV cache; rows can be reordered/expanded."""

    def __init__(
        self, forward: Callable[..., tuple[torch.Tensor, Any]], ids: torch.Tensor, attn: torch.Tensor
    ):
        self.forward = forward
        positions = positions_from_mask(attn)  # (B, P)
        out, self.cache = forward(ids, attn, positions, None)
        self.attn = attn  # (B, L)
        self.next_pos = positions[:, -1] + 1  # (B,)
        self.last = out[:, -1]  # (B, ...) output at the last fed token

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the output at it."""
        self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], dim=1)
        out, self.cache = self.forward(tokens[:, None], self.attn, self.next_pos[:, None], self.cache)
        self.next_pos = self.next_pos + 1
        self.last = out[:, -1]
        return self.last

    def reorder(self, idx: torch.Tensor) -> None:
        """Keep/duplicate rows: new row i = old row idx[i] (cache included)."""
        self.cache.reorder_cache(idx)
        self.attn, self.next_pos, self.last = self.attn[idx], self.next_pos[idx], self.last[idx]


def _base_forward(model: Any) -> Callable[..., tuple[torch.Tensor, Any]]:
    def forward(ids, attn, positions, cache):
        out = model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
        return out.logits.float(), output_cache(out)  # (B, 1, V)

    return forward


def _scorer_forward(scorer: PrefixScorer) -> Callable[..., tuple[torch.Tensor, Any]]:
    def forward(ids, attn, positions, cache):
        out = scorer(ids, attn, position_ids=positions, past_key_values=cache, use_cache=True)
        return out.values, out.past_key_values  # (B, T)

    return forward


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attn[i, width - len(p) :] = 1
    return ids.to(device), attn.to(device)


def _combined(values: list[torch.Tensor], lam: float, combine: str) -> torch.Tensor:
    return combine_values(values[0], values[1] if len(values) > 1 else None, lam, combine)


# ----------------------------------------------------------------------------------------------- token-wise CD
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
) -> CDOutput:
    """Token-wise controlled decoding of one response per entry of `prompts` (token ids), using the global RNG.

    Per step and row: base top-k (log p over the full vocabulary), values of the k children from every scorer,
    combined (V_r + λ·V_g), q = tilt, one draw. Rows stop at EOS (kept) or max_new_tokens.
    """
    if not scorers:
        raise ValueError("token-wise CD needs at least one prefix scorer")
    device = next(base.parameters()).device
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
    responses: list[list[int]] = [[] for _ in range(n)]
    cost = out.cost
    bar = tqdm(total=n, desc=f"token-wise CD (β={beta:g}, k={top_k})", disable=not show_progress)
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(n, start + batch_size))  # global row index of each live row
        ids, attn = _left_pad([prompts[i] for i in rows.tolist()], pad_id, device)
        prompt_tokens = int(attn.sum())
        base_s = _Stream(_base_forward(base), ids, attn)
        scorer_s = [_Stream(_scorer_forward(s), ids, attn) for s in scorers]
        cost.base_forward_tokens += prompt_tokens
        cost.scorer_forward_tokens += prompt_tokens * len(scorers)
        for t in range(max_new_tokens):
            b = len(rows)
            logp = torch.log_softmax(base_s.last.double(), -1)  # (b, V) float64: exact KLs to ~1e-12
            k = min(top_k, logp.shape[-1])
            top_logp, top_ids = logp.topk(k, dim=-1)  # (b, k)
            expand = torch.arange(b, device=device).repeat_interleave(k)  # (b·k,)
            values = []
            for s in scorer_s:
                s.reorder(expand)
                values.append(s.step(top_ids.reshape(-1)).view(b, k))  # (b, k)
            cost.scorer_forward_tokens += b * k * len(scorers)
            v = _combined(values, lam, combine)  # (b, k)
            step = tilted_step(top_logp.double(), v.double(), beta)
            choice = torch.multinomial(step.logq.exp(), 1).squeeze(-1)  # (b,)
            ar = torch.arange(b, device=device)
            z = top_ids[ar, choice]  # (b,)
            for s in scorer_s:
                s.reorder(ar * k + choice)  # keep the chosen child's cache
            z_list, rows_list = z.tolist(), rows.tolist()
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
            cost.base_sampled_tokens += b
            keep = (z != eos_id).nonzero().flatten()
            bar.update(b - len(keep) if t < max_new_tokens - 1 else b)
            if len(keep) == 0 or t == max_new_tokens - 1:
                break
            if len(keep) < b:
                base_s.reorder(keep)
                for s in scorer_s:
                    s.reorder(keep)
                rows, z = rows[keep.cpu()], z[keep]
            base_s.step(z)
            cost.base_forward_tokens += len(rows)
    bar.close()
    out.seqs = [Encoded(tuple(p) + tuple(r), len(p)) for p, r in zip(prompts, responses, strict=True)]
    cost.generated_tokens = sum(len(r) for r in responses)
    return out


# ------------------------------------------------------------------------------------------------ blockwise CD
@torch.no_grad()
def combined_final_values(
    scorers: Sequence[PrefixScorer],
    seqs: Sequence[Encoded],
    pad_id: int,
    lam: float,
    combine: str,
    batch_size: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(combined, per-scorer) values V(x, y) of whole sequences, (N,) each on the CPU."""
    each = [s.final_values(seqs, pad_id, batch_size) for s in scorers]
    return _combined(each, lam, combine), each


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
    """Blockwise controlled decoding of one response per entry of `prompts`, using the global RNG.

    Each round: K blocks of min(M, tokens left) tokens per live prefix from `sacpo.models.generate.sample`
    (ancestral, cut at EOS), the block maximising the combined value of prefix + block is appended (argmax, first
    on ties; K = 1 skips scoring). M ≥ max_new_tokens ⇒ exactly best-of-K with the scorer as reward.
    """
    from sacpo.models.generate import sample

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
            prefixes = [seqs[i] for i in active]
            cands = sample(base, prefixes, eos_id, pad_id, n=K, max_new_tokens=m, batch_size=len(active))
            blocks = [c.input_ids[c.prompt_len :] for c in cands]  # (len(active)·K) prompt-major
            cost.base_forward_tokens += K * sum(len(p) for p in prefixes) + sum(
                max(len(b) - 1, 0) for b in blocks
            )
            cost.base_sampled_tokens += sum(len(b) for b in blocks)
            if K > 1:
                scores, _ = combined_final_values(scorers, cands, pad_id, lam, combine, len(cands))
                cost.scorer_forward_tokens += len(scorers) * sum(len(c.input_ids) for c in cands)
                choice = scores.view(len(active), K).argmax(-1).tolist()  # first max on ties
            else:
                choice = [0] * len(active)
            generated += m
            still = []
            for a, i in enumerate(active):
                block = blocks[a * K + choice[a]]
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
    bound = blockwise_kl_bound(K, torch.tensor(n_blocks)).tolist()
    return CDOutput(
        seqs=out_seqs,
        logp_base=[None] * n,
        logp_policy=[None] * n,
        kl=[None] * n,
        kl_topk=[None] * n,
        kl_bound=bound,
        n_blocks=n_blocks,
        cost=cost,
    )


@torch.no_grad()
def base_logps(model: Any, seqs: Sequence[Encoded], pad_id: int, batch_size: int = 32) -> list[float]:
    """log π_base(response | prompt) of each sequence (one forward per batch)."""
    from sacpo.models.logprobs import sequence_logps

    device = next(model.parameters()).device
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in pad_sequences([seqs[i] for i in idx], pad_id).items()}
        for i, v in zip(idx, sequence_logps(model, batch).double().cpu().tolist(), strict=True):
            out[i] = v
    return out


# ----------------------------------------------------------------------------------------------------- entry
def _decode_token(cfg: CDConfig, base: Any, scorers: list[PrefixScorer], prompts, eos, pad, show_progress):
    return token_cd(
        base, scorers, prompts, eos, pad, cfg.beta, cfg.top_k, cfg.max_new_tokens, cfg.lam, cfg.combine,
        cfg.batch_size, show_progress=show_progress,
    )  # fmt: skip


def _decode_block(cfg: CDConfig, base: Any, scorers: list[PrefixScorer], prompts, eos, pad, show_progress):
    return block_cd(
        base, scorers, prompts, eos, pad, cfg.K, cfg.M, cfg.max_new_tokens, cfg.lam, cfg.combine,
        cfg.batch_size, show_progress=show_progress,
    )  # fmt: skip


DECODERS: dict[str, Callable[..., CDOutput]] = {"token": _decode_token, "block": _decode_block}


def _check_scorer_dir(path: str, base_tokenizer_fp: str | None = None) -> None:
    p = check_model_dir(path)
    if not (p / META_FILE).is_file():
        raise ModelLoadError(
            f"{p}: no {META_FILE} — not a prefix scorer (train one with train_prefix_scorer)"
        )
    if base_tokenizer_fp is not None and fingerprint_tokenizer(load_tokenizer(p)) != base_tokenizer_fp:
        raise ModelLoadError(
            f"{p}: the prefix scorer's tokenizer differs from the base model's; values would be "
            "computed on different token ids"
        )


def _mean_se(xs: Sequence[float | None]) -> dict[str, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return {"mean": None, "stderr": None}
    t = torch.tensor(vals, dtype=torch.float64)
    se = (t.std() / math.sqrt(len(vals))).item() if len(vals) > 1 else None
    return {"mean": t.mean().item(), "stderr": se}


def run_cd(cfg: CDConfig, show_progress: bool = True) -> dict[str, Any]:
    """Decode n_samples responses per prompt with controlled decoding and write samples.jsonl, summary.json and
    config.yaml to cfg.output_dir (atomically). Returns the summary."""
    validate_cd_config(cfg)
    check_model_dir(cfg.model)
    scorer_dirs = [cfg.scorer] + ([cfg.safety_scorer] if cfg.safety_scorer and cfg.lam > 0 else [])
    for d in scorer_dirs:
        _check_scorer_dir(d)
    prompts = load_prompts(cfg.prompts, cfg.prompts_split, cfg.max_prompts)
    tokenizer = load_tokenizer(cfg.model)
    tok_fp = fingerprint_tokenizer(tokenizer)
    for d in scorer_dirs:
        _check_scorer_dir(d, tok_fp)
    started = time.time()
    device = resolve_device(cfg.device)
    base = load_model(cfg.model).to(device).eval()
    scorers = [PrefixScorer.load(d, device) for d in scorer_dirs]
    context = getattr(base.config, "n_positions", None) or getattr(
        base.config, "max_position_embeddings", None
    )
    limit = (
        cfg.max_prompt_length if context is None else min(cfg.max_prompt_length, context - cfg.max_new_tokens)
    )
    if limit < 1:
        raise ConfigError(
            f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in context {context}"
        )
    prompt_ids = [encode_prompt(tokenizer, p, limit) for p in prompts]
    row_prompts = [ids for ids in prompt_ids for _ in range(cfg.n_samples)]  # prompt-major
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    devices = [device.index or 0] if device.type == "cuda" else []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        out = DECODERS[cfg.mode](cfg, base, scorers, row_prompts, eos, pad, show_progress)
    decode_seconds = time.perf_counter() - t0
    if cfg.mode == "block":
        out.logp_base = list(base_logps(base, out.seqs, pad, cfg.batch_size))
    combined, each = combined_final_values(scorers, out.seqs, pad, cfg.lam, cfg.combine, cfg.batch_size)

    texts, finished = zip(
        *(decode_response(tokenizer, s.input_ids[s.prompt_len :], eos) for s in out.seqs), strict=True
    )
    row_prompt_objs = [prompts[i // cfg.n_samples] for i in range(len(out.seqs))]
    gold: dict[str, list[float]] = {}
    if cfg.oracle is not None:
        r_spec, g_spec = ORACLES[cfg.oracle]
        gold["gold_reward"] = resolve_scorer(r_spec)(row_prompt_objs, list(texts)).float().double().tolist()
        gold["gold_safety"] = resolve_scorer(g_spec)(row_prompt_objs, list(texts)).float().double().tolist()
    rows = []
    for i, s in enumerate(out.seqs):
        response_ids = list(s.input_ids[s.prompt_len :])
        text_ids = response_ids[:-1] if finished[i] else response_ids
        row = {
            "prompt": row_prompt_objs[i] if isinstance(row_prompt_objs[i], str) else list(row_prompt_objs[i]),
            "response": texts[i],
            "sample": i % cfg.n_samples,
            "logp_policy": out.logp_policy[i],
            "logp_ref": out.logp_base[i],
            "prompt_index": i // cfg.n_samples,
            "response_tokens": len(response_ids),
            "finished": finished[i],
            "roundtrip": tokenizer(texts[i], add_special_tokens=False)["input_ids"] == text_ids,
            "value": combined[i].item(),
            "value_reward": each[0][i].item(),
            "value_safety": each[1][i].item() if len(each) > 1 else None,
            "kl": out.kl[i],
            "kl_topk": out.kl_topk[i],
            "kl_bound": out.kl_bound[i],
            "n_blocks": out.n_blocks[i],
        }
        for name, vals in gold.items():
            row[name] = vals[i]
        if "gold_safety" in gold:
            row["gold_safe"] = gold["gold_safety"][i] > 0
        rows.append(row)

    cost = out.cost
    plain = sum(len(s.input_ids) - 1 for s in out.seqs)  # ancestral sampling: prompt + response − last token
    total = cost.base_forward_tokens + cost.scorer_forward_tokens
    summary: dict[str, Any] = {
        "mode": cfg.mode,
        "beta": cfg.beta if cfg.mode == "token" else None,
        "top_k": cfg.top_k if cfg.mode == "token" else None,
        "K": cfg.K if cfg.mode == "block" else None,
        "M": cfg.M if cfg.mode == "block" else None,
        "lam": cfg.lam,
        "combine": cfg.combine if len(scorers) > 1 else None,
        "scorers": [str(d) for d in scorer_dirs],
        "n_prompts": len(prompts),
        "n_samples": cfg.n_samples,
        "n_rows": len(rows),
        "value": _mean_se([r["value"] for r in rows]),
        "kl": {
            "kind": "exact per-token sum (KL to the full base distribution)"
            if cfg.mode == "token"
            else "upper bound: Σ_blocks (log K − (K−1)/K)",
            **_mean_se(out.kl if cfg.mode == "token" else out.kl_bound),
        },
        "kl_topk": _mean_se(out.kl_topk) if cfg.mode == "token" else None,
        "kl_k1_estimate": _mean_se([r["logp_policy"] - r["logp_ref"] for r in rows])
        if cfg.mode == "token"
        else None,
        "cost": {
            "base_forward_tokens": cost.base_forward_tokens,
            "scorer_forward_tokens": cost.scorer_forward_tokens,
            "base_sampled_tokens": cost.base_sampled_tokens,
            "generated_tokens": cost.generated_tokens,
            "per_generated_token": cost.per_generated_token(),
            "plain_sampling_tokens": plain,
            "cost_ratio_vs_sampling": total / plain if plain else None,
        },
        "mean_response_tokens": cost.generated_tokens / len(rows),
        "finished_fraction": sum(r["finished"] for r in rows) / len(rows),
        "decode_seconds": round(decode_seconds, 3),
        "seconds": round(time.time() - started, 3),
    }
    results = None
    baseline: list[dict[str, Any]] = []
    if gold:
        summary["gold_reward"] = _mean_se(gold["gold_reward"])
        summary["gold_safety"] = _mean_se(gold["gold_safety"])
        summary["safe_fraction"] = sum(r["gold_safe"] for r in rows) / len(rows)
        if cfg.baseline_samples:
            baseline = _baseline_rows(cfg, base, tokenizer, prompts, prompt_ids, devices)
            results = cd_results(cfg, rows, baseline, summary)
            summary["baseline"] = {
                "gold_reward": _mean_se([r["gold_reward"] for r in baseline]),
                "safe_fraction": sum(r["gold_safe"] for r in baseline) / len(baseline),
                "gold_win_rate": results[1]["helpful_win"][0],
                "gold_harmless_win_rate": results[1]["harmless_win"][0],
            }
    _write_outputs(Path(cfg.output_dir), rows, summary, to_yaml(cfg), baseline, results)
    return summary


def _baseline_rows(
    cfg: CDConfig,
    base: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    prompt_ids: list[list[int]],
    devices: list[int],
) -> list[dict[str, Any]]:
    """n_samples plain ancestral samples per prompt (prompt-major, seed + 1), scored by the gold oracle."""
    from sacpo.models.generate import sample

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 1)
        seqs = sample(
            base, prompt_ids, eos, pad, n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
            batch_size=max(1, cfg.batch_size // cfg.n_samples),
        )  # fmt: skip
    texts = [decode_response(tokenizer, s.input_ids[s.prompt_len :], eos)[0] for s in seqs]
    row_prompts = [prompts[i // cfg.n_samples] for i in range(len(seqs))]
    assert cfg.oracle is not None
    r_spec, g_spec = ORACLES[cfg.oracle]
    r = resolve_scorer(r_spec)(row_prompts, texts).float().double().tolist()
    g = resolve_scorer(g_spec)(row_prompts, texts).float().double().tolist()
    return [
        {
            "prompt": p if isinstance(p, str) else list(p),
            "response": y,
            "sample": i % cfg.n_samples,
            "prompt_index": i // cfg.n_samples,
            "response_tokens": s.response_len,
            "gold_reward": r[i],
            "gold_safety": g[i],
            "gold_safe": g[i] > 0,
        }
        for i, (p, y, s) in enumerate(zip(row_prompts, texts, seqs, strict=True))
    ]


def cd_family(cfg: CDConfig) -> tuple[str, float]:
    """(family, param) of a CD run in the report: cd-token (β), cd-block (K) or cd-bon (K; one full block)."""
    if cfg.mode == "token":
        return "cd-token", cfg.beta
    return ("cd-bon" if cfg.M >= cfg.max_new_tokens else "cd-block"), float(cfg.K)


def cd_name(cfg: CDConfig) -> str:
    lam = f" λ={cfg.lam:g}" if cfg.lam > 0 else ""
    if cfg.mode == "token":
        return f"cd-token β={cfg.beta:g} k={cfg.top_k}{lam}"
    return f"cd-block K={cfg.K} M={cfg.M}{lam}"


def cd_results(
    cfg: CDConfig, rows: list[dict[str, Any]], baseline: list[dict[str, Any]], summary: dict[str, Any]
) -> list[dict[str, Any]]:
    """results.json rows (ModelMetrics dicts): the baseline samples ("base", family sft, KL 0) and the CD run,
    judged by the gold oracle against the baseline (sample s vs base sample s of the same prompt; CIs over
    prompts). KL of the CD row: token-wise, the exact per-token sum (mean ± s.e. over prompts; extra kl_topk and
    the k1 estimate); blockwise, the mean upper bound Σ_blocks (log K − (K−1)/K) with no s.e. (extra kl_bound)."""
    from sacpo.evaluate.metrics import NAN, ModelMetrics, constraint_holds, mean_and_stderr, win_rate

    shape = (summary["n_prompts"], cfg.n_samples)

    def grid(items: list[dict[str, Any]], key: str) -> torch.Tensor:
        return torch.tensor([float(x[key]) for x in items], dtype=torch.float64).view(shape)

    r0, g0, s0 = grid(baseline, "gold_reward"), grid(baseline, "gold_safety"), grid(baseline, "gold_safe")
    r1, g1, s1 = grid(rows, "gold_reward"), grid(rows, "gold_safety"), grid(rows, "gold_safe")
    boot = {"n_boot": 1000, "seed": cfg.seed}
    cost = summary["cost"]["per_generated_token"]

    def metrics(name, family, param, r, g, safe, kl, extra) -> dict[str, Any]:
        mr, se_r = mean_and_stderr(r)
        mg, se_g = mean_and_stderr(g)
        return ModelMetrics(
            name=name, family=family, param=param, helpful_win=win_rate(r, r0, **boot),
            harmless_win=win_rate(g, g0, **boot), mean_reward=mr, mean_safety=mg, p_safe=float(safe.mean()),
            constraint_ok=constraint_holds(mg, 0.0), kl=kl[0], kl_se=kl[1], n=int(r.numel()),
            n_prompts=shape[0], reward_se=se_r, safety_se=se_g, extra=extra,
        ).to_dict()  # fmt: skip

    extra = {"sampled/token": cost["base_sampled"], "forward/token": cost["total_forward"]}
    if cfg.mode == "token":
        kl = mean_and_stderr(grid(rows, "kl"))
        extra |= {
            "kl_topk": mean_and_stderr(grid(rows, "kl_topk"))[0],
            "kl_k1": summary["kl_k1_estimate"]["mean"],
        }
    else:
        bound = grid(rows, "kl_bound")
        kl = (float(bound.mean()), NAN)
        extra["kl_bound"] = kl[0]
    family, param = cd_family(cfg)
    return [
        metrics("base", "sft", None, r0, g0, s0, (0.0, 0.0), {}),
        metrics(cd_name(cfg), family, param, r1, g1, s1, kl, extra),
    ]


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few plain-text lines (what `sacpo cd` prints)."""

    def f(x: Any, digits: int = 3) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    if summary["mode"] == "token":
        what = f"token-wise CD (β={summary['beta']:g}, top-k {summary['top_k']})"
    else:
        what = f"blockwise CD (K={summary['K']}, M={summary['M']})"
    if summary["lam"]:
        what += f", V = V_r {'−' if summary['combine'] == 'cost' else '+'} {summary['lam']:g}·V_2"
    kl, cost = summary["kl"], summary["cost"]
    per = cost["per_generated_token"]
    lines = [
        f"{what}: {summary['n_prompts']} prompts × {summary['n_samples']} samples, "
        f"{f(summary['mean_response_tokens'], 1)} tokens/response, finished {f(summary['finished_fraction'], 2)}",
        f"  value V {f(summary['value']['mean'])} ± {f(summary['value']['stderr'])}; KL {f(kl['mean'])} ± "
        f"{f(kl['stderr'])} ({kl['kind']})",
        f"  cost per generated token: {f(per['base_sampled'], 2)} sampled, {f(per['total_forward'], 2)} forward "
        f"tokens ({f(cost['cost_ratio_vs_sampling'], 2)}× plain sampling); {summary['seconds']:.0f} s",
    ]
    if "gold_reward" in summary:
        line = (
            f"  gold: E[r*] {f(summary['gold_reward']['mean'])} ± {f(summary['gold_reward']['stderr'])}, "
            f"P(safe) {f(summary['safe_fraction'])}"
        )
        if "baseline" in summary:
            b = summary["baseline"]
            line += (
                f"; base samples E[r*] {f(b['gold_reward']['mean'])}, P(safe) {f(b['safe_fraction'])}; win rate "
                f"vs base: helpful {f(b['gold_win_rate'])}, harmless {f(b['gold_harmless_win_rate'])}"
            )
        lines.append(line)
    return "\n".join(lines)


def _write_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    config_yaml: str,
    baseline: list[dict[str, Any]] | None = None,
    results: list[dict[str, Any]] | None = None,
) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / SAMPLES_FILE, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if baseline:
        with open(tmp / BASELINE_FILE, "w", encoding="utf-8") as f:
            for row in baseline:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if results is not None:
        (tmp / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (tmp / "config.yaml").write_text(config_yaml)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
