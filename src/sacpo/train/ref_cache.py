"""Reference log-probabilities are data, not a model: computed once, cached on disk by content hash.

The key hashes (reference weights + config, the tokenizer, the encoded token ids — which already depend on data,
tokenizer, prompt format, max_length and the truncation policy —, max_length, whether log-probs are length-averaged
and, when it is not the default, the prompt format (system prompt, chat template) itself).
Every stage and every β/λ of a sweep that shares (reference, data) reads the same file; the reference model is
never loaded when the file exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sacpo.data.prompt_format import DEFAULT_FORMAT, PromptFormat
from sacpo.data.tokenize import Encoded, pack_pairs, packed_length, pad_sequences, shares_prompt
from sacpo.fsutil import atomic_save_file
from sacpo.models.load import fingerprint_model, fingerprint_tokenizer, load_model
from sacpo.models.logprobs import packed_pair_logps, sequence_logps, supports_packed_pairs
from sacpo.models.row_cost import RowCost, packing_pays

log = logging.getLogger("sacpo.train")


@dataclass(frozen=True)
class RefLogps:
    """Reference log-probs of every encoded pair: (N, 2) — column 0 chosen/completion, 1 rejected/mismatched."""

    logps: torch.Tensor
    path: Path
    computed: bool  # False: read from the cache


def cache_key(
    reference: str | Path,
    tokenizer: Any,
    pairs: list[tuple[Encoded, Encoded]],
    max_length: int,
    average: bool,
    prompt_format: PromptFormat = DEFAULT_FORMAT,
) -> str:
    """sha256 of everything the reference log-probs depend on. The prompt format enters only when it is not the
    default, so that caches written before it existed stay valid (its effect is in the token ids either way)."""
    h = hashlib.sha256()
    h.update(b"sacpo-ref-v1")
    h.update(fingerprint_model(reference).encode())
    h.update(fingerprint_tokenizer(tokenizer).encode())
    h.update(json.dumps({"max_length": max_length, "average": average}).encode())
    if not prompt_format.is_default:
        h.update(f"prompt-format:{prompt_format.fingerprint()}".encode())
    for a, b in pairs:
        for e in (a, b):
            h.update(json.dumps([e.prompt_len, e.input_ids]).encode())
    return h.hexdigest()


def _read(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached tensor, or None when missing, corrupt, or for other data (then it is rebuilt)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            logps = f.get_tensor("logps")
    except Exception as e:  # a truncated or garbled file
        log.warning("reference cache %s is unreadable (%s); recomputing", path, e)
        return None
    if meta.get("key") != key or tuple(logps.shape) != (n, 2) or logps.dtype != torch.float32:
        log.warning("reference cache %s does not match this data; recomputing", path)
        return None
    if meta.get("sha256") != _checksum(logps) or not torch.isfinite(logps).all():
        log.warning("reference cache %s is corrupt (checksum mismatch); recomputing", path)
        return None
    return logps


def _checksum(logps: torch.Tensor) -> str:
    """sha256 of the tensor's bytes: safetensors has no checksum, so a flipped bit would go unnoticed."""
    return hashlib.sha256(logps.contiguous().numpy().tobytes()).hexdigest()


def _write(path: Path, key: str, logps: torch.Tensor) -> None:
    """Write atomically and durably (`sacpo.fsutil.atomic_save_file`)."""
    logps = logps.contiguous()
    atomic_save_file({"logps": logps}, path, metadata={"key": key, "sha256": _checksum(logps)})


@torch.no_grad()
def compute_ref_logps(
    model: Any,
    pairs: list[tuple[Encoded, Encoded]],
    pad_id: int,
    batch_size: int = 16,
    chunk_size: int = 256,
    average: bool = False,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    share_prompt: bool = True,
    supports_packed: Callable[[Any], bool] = supports_packed_pairs,
) -> torch.Tensor:
    """log π_ref of both sequences of every pair, batched by length to limit padding. Returns (N, 2).

    share_prompt: when every pair shares its prompt, the model allows it (`supports_packed`, by default a fresh
    `supports_packed_pairs` probe) and the pass costs fewer FLOPs that way (`row_cost.packing_pays`), each pair is one
    row prompt + a + b (`pack_pairs`), batch_size/2 pairs per batch — the computation the training step uses.
    """
    if (
        share_prompt
        and all(shares_prompt(a, b) for a, b in pairs)
        and supports_packed(model)
        and packing_pays(RowCost.of(model), pairs, batch_size)
    ):
        order = sorted(range(len(pairs)), key=lambda i: packed_length(*pairs[i]))
        out = torch.empty(len(pairs), 2, dtype=torch.float32)
        per_batch = max(1, batch_size // 2)
        for start in tqdm(
            range(0, len(order), per_batch), desc="reference pass", disable=not show_progress, leave=False
        ):
            idx = order[start : start + per_batch]
            packed = {k: v.to(device) for k, v in pack_pairs([pairs[i] for i in idx], pad_id).items()}
            out[idx] = packed_pair_logps(model, packed, chunk_size, average).float().cpu().view(2, -1).T
        return out
    seqs = [e for pair in pairs for e in pair]  # 2N sequences: (a0, b0, a1, b1, …)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    out = torch.empty(len(seqs), dtype=torch.float32)
    for start in tqdm(
        range(0, len(order), batch_size), desc="reference pass", disable=not show_progress, leave=False
    ):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in pad_sequences([seqs[i] for i in idx], pad_id).items()}
        out[idx] = sequence_logps(model, batch, chunk_size, average).float().cpu()
    return out.view(len(pairs), 2)


def reference_logps(
    reference: str | Path,
    tokenizer: Any,
    pairs: list[tuple[Encoded, Encoded]],
    cache_dir: str | Path,
    max_length: int,
    average: bool = False,
    batch_size: int = 16,
    chunk_size: int = 256,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    show_progress: bool = True,
    model: Any | None = None,
    share_prompt: bool = True,
    supports_packed: Callable[[Any], bool] = supports_packed_pairs,
    prompt_format: PromptFormat = DEFAULT_FORMAT,
) -> RefLogps:
    """Reference log-probs from the cache, or computed once and cached.

    model: an already-built model with the reference's weights (the policy before its first update, when the
    reference is the policy) to compute them with; by default the reference is loaded for the pass and freed.
    supports_packed: the shared-prompt probe (`compute_ref_logps`); the trainer passes its cached one.
    prompt_format: the format the pairs' prompts were rendered with (part of the cache key).
    """
    key = cache_key(reference, tokenizer, pairs, max_length, average, prompt_format)
    path = Path(cache_dir) / f"ref-{key[:24]}.safetensors"
    cached = _read(path, key, len(pairs))
    if cached is not None:
        log.info("reference log-probs: cache hit %s (reference model not loaded)", path.name)
        return RefLogps(cached, path, computed=False)
    log.info("reference log-probs: computing with %s for %d pairs", reference, len(pairs))
    if model is None:
        model = load_model(reference, trust_remote_code=trust_remote_code)
    was_training = model.training
    model = model.to(device).eval()
    logps = compute_ref_logps(
        model,
        pairs,
        tokenizer.pad_token_id,
        batch_size,
        chunk_size,
        average,
        device,
        show_progress,
        share_prompt,
        supports_packed,
    )
    model.train(was_training)
    del model
    bad = (~torch.isfinite(logps)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        from sacpo.train.checkpoint import NonFiniteError

        raise NonFiniteError(
            f"reference log-probs from {reference} are NaN/inf for {len(bad)} of {len(pairs)} pairs "
            f"(first: pair {bad[0]}); the reference model's weights are probably broken. Nothing was cached."
        )
    _write(path, key, logps)
    return RefLogps(logps, path, computed=True)
