"""Sequence log-probabilities of responses under a causal LM (one forward pass per batch).

Two paths give the same numbers (fp32 log-softmax of the same logits):
- full: `model(...).logits` (N, T, V), then `token_logprobs` (gather − logsumexp, chunked over T);
- fused LM head: run the backbone only, keep the hidden states of response positions (prompt and padding need no
  log-prob) and project them through the output embedding in row chunks with a hand-written backward
  (`_FusedHeadLogps`), so no (N, T, V) tensor — nor its gradient — is ever built; each chunk's (c, V) logits
  live only inside its forward and, as one in-place buffer, inside its recomputation in backward. On
  SmolLM2-135M (V = 49 152) this is the difference between 93 MB of logits per copy at 4 × 118 tokens and one
  (c, V) chunk (benchmarks/RESULTS.md).
`sequence_logps` takes the fused path for vocabularies of at least `FUSED_MIN_VOCAB` tokens when the head is a
plain bias-free linear map (no logit scale or soft-capping, no adapter on the head) and the model is not inside a
parallel wrapper (DDP, FSDP/FSDP2, a DeepSpeed engine: the fused path calls the backbone directly, which would skip
the wrapper's forward — its gradient hooks, parameter gathering); small vocabularies are overhead-bound and keep the
full path. `head_path(model)` says which path a model gets, and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sacpo.data.tokenize import Encoded, pad_sequences
from sacpo.math.logprobs import IGNORE_INDEX, masked_mean, masked_sum, token_logprobs

FUSED_MIN_VOCAB = 4096


def _plain_lm_head(model: Any) -> torch.nn.Linear | None:
    """The output projection if logits are exactly backbone_hidden @ W.T, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft → the causal LM
    backbone = getattr(base, "base_model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or backbone is base or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    return head


# wrappers whose forward must run (DDP's gradient hooks, FSDP's parameter gathering, DeepSpeed's engine); matched by
# class name along the MRO, so that none of torch.distributed, FSDP2 or deepspeed needs importing to check
PARALLEL_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine")


def parallel_wrapper(model: Any) -> str | None:
    """The name of the parallel wrapper around (or applied to) `model` or its peft base model, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for m in (model, base):
        names = {c.__name__ for c in type(m).__mro__}
        for wrapper in PARALLEL_WRAPPERS:
            if wrapper in names:
                return wrapper
    return None


@dataclass(frozen=True)
class HeadPath:
    """Which log-prob path a model gets: fused LM head or full logits, and why."""

    fused: bool
    reason: str
    head: torch.nn.Linear | None = field(default=None, repr=False, compare=False)


def head_path(model: Any, fused: bool | None = None) -> HeadPath:
    """The path `sequence_logps(model, ..., fused=fused)` takes (see the module docstring)."""
    if fused is False:
        return HeadPath(False, "full logits requested (fused=False)")
    wrapper = parallel_wrapper(model)
    if wrapper is not None:
        return HeadPath(False, f"model inside {wrapper}: its forward must run, so full logits")
    head = _plain_lm_head(model)
    if head is None:
        return HeadPath(
            False, "the output layer is not a plain bias-free linear map of the backbone's states"
        )
    vocab = head.weight.shape[0]
    if not fused and vocab < FUSED_MIN_VOCAB:
        return HeadPath(False, f"vocabulary of {vocab} < {FUSED_MIN_VOCAB} tokens: full logits are cheaper")
    return HeadPath(True, f"plain linear head over {vocab} tokens", head)


class _FusedHeadLogps(torch.autograd.Function):
    """log softmax(h·Wᵀ)[label] for rows of h, in row chunks, without keeping any (c, V) tensor for backward.

    Forward, per chunk of c rows: logits = h_c·Wᵀ (c, V), out = logits[label] − logsumexp(logits), the
    logsumexp computed in place in the logits buffer; only h, W, labels and the (M,) logsumexp are saved.
    Backward recomputes each chunk's logits once and turns them in place into the logit gradient
    g_i·(onehot(label_i) − softmax_i): exp(logits − lse), then ×(−g), then +g at the label — one (c, V) buffer
    per chunk, where autograd through `checkpoint` holds the recomputed logits, the softmax, the scattered
    one-hot gradient and their difference. Then ∂h_c = G·W and ∂W += Gᵀ·h_c, the latter
    accumulated into one (V, H) buffer across chunks, the first chunk's product allocated without a zero fill (skipped
    when W needs no gradient: LoRA, frozen heads).
    """

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 logits for fp16/bf16/fp32 weights
        out = torch.empty(h.shape[0], dtype=acc, device=h.device)  # (M,)
        lse = torch.empty_like(out)  # (M,)
        for s in range(0, h.shape[0], chunk):
            logits = (h[s : s + chunk] @ weight.T).to(acc)  # (c, V)
            target = logits.gather(-1, labels[s : s + chunk, None]).squeeze(-1)  # (c,)
            top = logits.amax(-1)  # (c,)
            # logsumexp in place (one (c, V) buffer): top + log Σ exp(logits − top)
            lse[s : s + chunk] = top + logits.sub_(top[:, None]).exp_().sum(-1).log()
            out[s : s + chunk] = target - lse[s : s + chunk]
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None  # (M, H)
        grad_w = None  # (V, H): the first chunk's product, then accumulated (no zero-filled buffer)
        for s in range(0, h.shape[0], ctx.chunk):
            h_c, g = h[s : s + ctx.chunk], grad_out[s : s + ctx.chunk].to(lse.dtype)  # (c, H), (c,)
            logits = (h_c @ weight.T).to(lse.dtype)  # (c, V)
            grad = logits.sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g[:, None])  # −g·softmax, in place
            rows = torch.arange(h_c.shape[0], device=h.device)
            grad[rows, labels[s : s + ctx.chunk]] += g  # + g·onehot(label)
            grad = grad.to(weight.dtype)
            if need_h:
                grad_h[s : s + ctx.chunk] = grad @ weight  # (c, H)
            if need_w:
                if grad_w is None:
                    grad_w = grad.T @ h_c.to(weight.dtype)
                else:
                    grad_w.addmm_(grad.T, h_c.to(weight.dtype))
        return grad_h, grad_w, None, None


def _fused_token_logps(
    model: Any, head: torch.nn.Linear, batch: dict[str, torch.Tensor], chunk_size: int
) -> torch.Tensor:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (N, T, H)
    mask = batch["labels_mask"]  # (N, T−1)
    h = hidden[:, :-1][mask]  # (M, H): response positions only
    labels = batch["input_ids"][:, 1:][mask]  # (M,)
    flat = _FusedHeadLogps.apply(h, head.weight, labels, chunk_size)  # (M,)
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(
        mask, flat
    )  # (N, T−1)


def response_token_logps(
    model: Any, batch: dict[str, torch.Tensor], chunk_size: int = 256, fused: bool | None = None
) -> torch.Tensor:
    """log π(y_t | x, y_<t) for every position, 0 outside the response.

    batch: input_ids (N, T), attention_mask (N, T), labels_mask (N, T−1) from `pad_sequences`. Returns (N, T−1)
    float32. fused: None = automatic (see the module docstring), True = fused LM head when the head allows it,
    False = full logits. chunk_size bounds the logits temporary: sequence positions (full) or rows (fused).
    """
    path = head_path(model, fused)
    if path.fused:
        return _fused_token_logps(model, path.head, batch, chunk_size)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits  # (N, T, V)
    labels = batch["input_ids"][:, 1:].masked_fill(~batch["labels_mask"], IGNORE_INDEX)  # (N, T−1)
    return token_logprobs(logits[:, :-1], labels, chunk_size=chunk_size)  # (N, T−1)


def sequence_logps(
    model: Any,
    batch: dict[str, torch.Tensor],
    chunk_size: int = 256,
    average: bool = False,
    fused: bool | None = None,
) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over response tokens (or the per-token mean). Returns (N,)."""
    token_logps = response_token_logps(model, batch, chunk_size, fused)  # (N, T−1)
    reduce = masked_mean if average else masked_sum
    return reduce(token_logps, batch["labels_mask"])


def _unique_batches(
    seqs: Sequence[Encoded], batch_size: int, sort: bool, dedup: bool
) -> tuple[list[Encoded], list[int] | None, list[list[int]]]:
    """(sequences to score, position of each input among them or None, batches of their indices): identical
    (prompt length, token ids) once with dedup, batches of similar length with sort."""
    unique: dict[tuple[int, tuple[int, ...]], int] = {}
    if dedup:
        where = [unique.setdefault((s.prompt_len, s.input_ids), len(unique)) for s in seqs]
        todo = [Encoded(ids, prompt_len) for prompt_len, ids in unique]
    else:
        where, todo = None, list(seqs)
    order = sorted(range(len(todo)), key=lambda i: len(todo[i].input_ids)) if sort else list(range(len(todo)))
    return todo, where, [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def batched_sequence_logps(
    model: Any,
    seqs: Sequence[Encoded],
    pad_id: int,
    batch_size: int = 16,
    chunk_size: int = 256,
    sort: bool = True,
    dedup: bool = False,
    show_progress: bool = False,
    desc: str = "log-probs",
) -> torch.Tensor:
    """log π(response | prompt) (`sequence_logps`) of N encoded sequences, in batches of `batch_size`: (N,)
    float64 on the CPU, holding the model's float32 values exactly.

    sort: batches of similar length (longest padding is the batch's own), else the given order; dedup: identical
    (prompt length, token ids) scored once (best-of-n pools repeat responses)."""
    device = next(model.parameters()).device
    todo, where, batches = _unique_batches(seqs, batch_size, sort, dedup)
    values = torch.empty(len(todo), dtype=torch.float64)
    for idx in tqdm(batches, desc=desc, disable=not show_progress):
        batch = {k: v.to(device) for k, v in pad_sequences([todo[i] for i in idx], pad_id).items()}
        values[idx] = sequence_logps(model, batch, chunk_size).double().cpu()  # (b,)
    return values[torch.tensor(where, dtype=torch.long)] if where is not None else values  # (N,)


@torch.no_grad()
def batched_response_token_logps(
    model: Any, seqs: Sequence[Encoded], pad_id: int, batch_size: int = 16, chunk_size: int = 256
) -> list[torch.Tensor]:
    """log π(y_t | x, y_<t) of every response token of each sequence: a list of N float64 tensors (R_i,) on the
    CPU (R_i = response length), identical sequences computed once. Their sums are `batched_sequence_logps`."""
    device = next(model.parameters()).device
    todo, where, batches = _unique_batches(seqs, batch_size, True, True)
    out: list[torch.Tensor] = [torch.empty(0)] * len(todo)
    for idx in batches:
        batch = {k: v.to(device) for k, v in pad_sequences([todo[i] for i in idx], pad_id).items()}
        tok = response_token_logps(model, batch, chunk_size).double().cpu()  # (b, T−1)
        mask = batch["labels_mask"].cpu()  # (b, T−1)
        for row, i in enumerate(idx):
            out[i] = tok[row][mask[row]]
    assert where is not None
    return [out[i] for i in where]


def _attn_implementation(model: Any) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None)


def _custom_mask(model: Any, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, 1, T, T) attention pattern in the form the model's attention takes it as a prepared 4D mask:
    bool for SDPA (True = attend), additive float (0 / most negative) for eager attention."""
    impl = _attn_implementation(model)
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )
    raise ValueError(f"a shared-prompt forward needs sdpa or eager attention, not {impl!r}")


def packed_pair_logps(
    model: Any,
    packed: dict[str, torch.Tensor],
    chunk_size: int = 256,
    average: bool = False,
    fused: bool | None = None,
) -> torch.Tensor:
    """log π(y|x) of both responses of B pairs from one forward over rows prompt + a + b (`pack_pairs`).

    Same values as `sequence_logps` on the 2B padded sequences up to float rounding (each response attends to
    exactly its own prefix, at its own positions); returns (2B,): the B a-responses, then the B b-responses.
    """
    ids, src, seq = packed["input_ids"], packed["src"], packed["seq"]  # (B, T), (M,), (M,)
    labels = ids.reshape(-1)[packed["label"]]  # (M,)
    path = head_path(model, fused)
    weight = next(model.parameters())
    kwargs = {
        "input_ids": ids,
        "attention_mask": _custom_mask(model, packed["allowed"], weight.dtype),
        "position_ids": packed["position_ids"],
        "use_cache": False,
    }
    if path.fused:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.base_model(**kwargs).last_hidden_state  # (B, T, H)
        flat = _FusedHeadLogps.apply(
            hidden.reshape(-1, hidden.shape[-1])[src], path.head.weight, labels, chunk_size
        )
    else:
        logits = model(**kwargs).logits  # (B, T, V)
        rows = logits.reshape(-1, logits.shape[-1])[src]  # (M, V)
        flat = token_logprobs(rows[None], labels[None], chunk_size=chunk_size)[0]  # (M,)
    n_seqs = 2 * ids.shape[0]
    total = torch.zeros(n_seqs, dtype=flat.dtype, device=flat.device).index_add(0, seq, flat)  # (2B,)
    if average:
        count = torch.bincount(seq, minlength=n_seqs).clamp(min=1)
        total = total / count
    return total


def supports_packed_pairs(model: Any) -> bool:
    """Whether `packed_pair_logps` reproduces `sequence_logps` on this model: its attention takes a prepared 4D
    mask (sdpa or eager) and it places tokens by `position_ids` (models that derive positions from the 2D mask,
    or use none, fail the check). Probed on a 3-token prompt with 2- and 3-token responses (in eval mode, no
    gradient; the model's mode is restored). Nothing is stored on the model: a caller that probes often keeps the
    answer (sacpo.train.step.PackedPairsProbe)."""
    from sacpo.data.tokenize import pack_pairs

    ok = False
    if _attn_implementation(model) in ("sdpa", "eager"):
        weight = next(model.parameters())
        a, b = Encoded((3, 4, 5, 6, 7), 3), Encoded((3, 4, 5, 8, 9, 10), 3)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                padded = {k: v.to(weight.device) for k, v in pad_sequences([a, b], 0).items()}
                packed = {k: v.to(weight.device) for k, v in pack_pairs([(a, b)], 0).items()}
                ok = torch.allclose(
                    packed_pair_logps(model, packed), sequence_logps(model, padded), rtol=1e-3, atol=1e-3
                )
        except Exception:  # an architecture that refuses the 4D mask or position_ids
            ok = False
        finally:
            model.train(was_training)
    return bool(ok)
