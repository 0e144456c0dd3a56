"""Batched ancestral sampling from a causal LM (by default no temperature or top-p change: samples follow π exactly).

Each prompt is prefilled once and its KV cache repeated n times: `generate(num_return_sequences=n)` repeats every
prompt n times *before* the prefill, which on a CPU costs as much as the whole decode for short responses
(benchmarks/RESULTS.md, best-of-n). The draws are the same ancestral process, y_t ~ softmax(z_t / T), each token
drawn by inversion of its cumulative distribution (`draw`). Optional decoding rules (`next_token_probs`):
temperature T (softmax(z/T)), nucleus top-p (keep the smallest set of most likely tokens whose mass reaches p),
and greedy decoding (temperature 0: the argmax) — their samples no longer follow π.

`sample_with_logps` also returns log π(y|x) of every sample, summed during the draw from the same logits the draw
uses (log π(y_t | x, y_<t) = z_t[y_t] − logsumexp(z_t) of the model's own, untempered logits): the value a second
forward pass over the sampled ids recomputes (`sacpo.models.logprobs.batched_sequence_logps`), to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from sacpo.data.tokenize import Encoded
from sacpo.math.logprobs import token_logprobs
from sacpo.models.modules import cache_kwargs, output_cache


def _inner(model: Any) -> Any:
    """The causal LM inside DistributedDataParallel-like (`.module`) and peft wrappers: its forward names the
    KV-cache argument (a wrapper passes keyword arguments through)."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, both (b, P) with P = the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (b, P)
    attn = torch.zeros_like(ids)  # (b, P)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[i, width - len(p) :] = 1
    return ids, attn


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (R, V) (unnormalised is fine), by inversion: z = the first v with
    F(v) > u·F(V), F the float64 cumulative sum, u ~ U[0, 1) — so P(z = v) = p_v / Σp (to float64 rounding;
    zero-probability tokens are never drawn). ValueError for a row that is NaN, infinite or all zero. One
    uniform per row from the global RNG: `torch.multinomial`, or a race of V exponentials, spends most of its
    time drawing V random numbers per row, which was a fifth of SmolLM2's batched sampling time on a CPU
    (benchmarks/RESULTS.md)."""
    cdf = probs.double().cumsum(-1)  # (R, V)
    total = cdf[:, -1]  # (R,)
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError(
            "cannot sample: a row of probabilities is NaN, infinite or all zero (non-finite logits?)"
        )
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * total[:, None]  # (R, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)  # (R,)


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution (R, V) of the next token from logits (R, V).

    temperature > 0: q = softmax(z / T); top_p < 1 then keeps the smallest prefix of tokens sorted by q whose mass
    reaches top_p (the most likely token always stays) and zeroes the rest (renormalised by `draw`).
    temperature == 0: greedy, a one-hot of the argmax. Example: q = [0.5, 0.3, 0.2], top_p = 0.6 → [0.5, 0.3, 0]."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (R, V)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (R, V)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


@torch.no_grad()
def sample_chunk(
    model: Any,
    prompts: list[list[int]],
    eos_id: int,
    pad_id: int,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    logps_out: list[float] | None = None,
) -> list[list[int]]:
    """New tokens of n samples for each prompt, prompt-major (len(prompts)·n lists), each cut after its first EOS.

    One prefill forward over the b distinct prompts (logits of the last position only), the cache repeated n
    times, then one forward per generated token over the b·n rows; finished rows are fed pad tokens until every
    row is done or max_new_tokens is reached. logps_out: a list to which log π(new tokens | prompt) of every row
    is appended (float64 sums of the float32 token log-probs of the untempered logits, EOS included).
    """
    device = next(model.parameters()).device
    ids, attn = (t.to(device) for t in left_pad(prompts, pad_id))  # (b, P)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (b, P)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    if n > 1:
        cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].repeat_interleave(n, 0)  # (b·n, V)
    attn = attn.repeat_interleave(n, 0)  # (b·n, P)
    next_pos = pos[:, -1].repeat_interleave(n) + 1  # (b·n,)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)  # (b·n,)
    total = torch.zeros(logits.shape[0], dtype=torch.float64, device=device)  # (b·n,) log π of the new tokens
    inner = _inner(model)
    steps: list[torch.Tensor] = []
    for t in range(max_new_tokens):
        z = draw(next_token_probs(logits, temperature, top_p))  # (b·n,)
        z = torch.where(done, torch.full_like(z, pad_id), z)
        if logps_out is not None:
            total += (
                token_logprobs(logits[:, None], z[:, None])[:, 0].masked_fill(done, 0.0).double()
            )  # (b·n,)
        steps.append(z)
        done |= z == eos_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)  # (b·n, P + t + 1)
        out = model(
            input_ids=z[:, None],
            attention_mask=attn,
            position_ids=next_pos[:, None],
            use_cache=True,
            **cache_kwargs(inner, cache),
        )
        cache = output_cache(out)
        logits, next_pos = out.logits[:, -1], next_pos + 1
    new = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(len(prompts) * n)]
    if logps_out is not None:
        logps_out.extend(total.cpu().tolist())
    return [toks[: toks.index(eos_id) + 1] if eos_id in toks else toks for toks in new]


@torch.no_grad()
def sample(
    model: Any,
    prompts: list[list[int]],
    eos_id: int,
    pad_id: int,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 16,
    top_p: float = 1.0,
    logps_out: list[float] | None = None,
) -> list[Encoded]:
    """Draw n responses per prompt, `batch_size` prompts (b·n rows) at a time.

    Returns len(prompts)·n sequences in prompt-major order, each prompt + response (ending at its first EOS,
    which is kept, or cut at max_new_tokens). temperature (0 = greedy) and top_p: `next_token_probs`.
    logps_out: receives log π(response | prompt) of every sequence, in the same order (`sample_chunk`).
    """
    if n < 1 or max_new_tokens < 1 or batch_size < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need n, max_new_tokens, batch_size >= 1, temperature >= 0 (0 = greedy) and top_p in (0, 1], got "
            f"n={n}, max_new_tokens={max_new_tokens}, batch_size={batch_size}, temperature={temperature}, "
            f"top_p={top_p}"
        )
    out: list[Encoded] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        for j, toks in enumerate(
            sample_chunk(model, chunk, eos_id, pad_id, n, max_new_tokens, temperature, top_p, logps_out)
        ):
            prompt = chunk[j // n]
            out.append(Encoded(tuple(prompt) + tuple(toks), len(prompt)))
    return out


def sample_with_logps(
    model: Any,
    prompts: list[list[int]],
    eos_id: int,
    pad_id: int,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 16,
    top_p: float = 1.0,
) -> tuple[list[Encoded], torch.Tensor]:
    """`sample`, and log π(response | prompt) of every sequence (N,) float64 on the CPU, taken from the logits
    each token was drawn from: log π of the untempered model whatever the decoding rule, the same draws (no extra
    random numbers) and the values `batched_sequence_logps` gives on the returned sequences, to float rounding."""
    logps: list[float] = []
    seqs = sample(model, prompts, eos_id, pad_id, n, max_new_tokens, temperature, batch_size, top_p, logps)
    return seqs, torch.tensor(logps, dtype=torch.float64)  # (N,)
