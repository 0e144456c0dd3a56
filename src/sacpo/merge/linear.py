"""Merge two model directories: θ = (1−q)·θ_a + q·θ_b (P-SACPO and the naive-merge baseline).

Either side may be a full HF model directory or a LoRA adapter directory (a base plus a chain of adapters,
`sacpo.models.adapters`). The output is

- an **adapter** (output="adapter", or "auto" when possible): when a and b are adapter chains on the same base,
  the merge is exactly an adapter stacked on their common adapters (`adapter_merge`; P-SACPO's θ_1 + q·Δ_2 is
  the step-2 adapter with B scaled by q) — a few MB instead of a full copy, equal to the dense merge up to float
  rounding;
- a **full model** (output="dense", or "auto" otherwise): tensor by tensor, θ_x[W] = W_base + Σ Δ (each side's
  adapters applied to its base in order, as merge_and_unload would), then lerp. Safetensors are read one tensor
  at a time (no model instantiation); the output gets a's base config and a's tokenizer.

Refuses different architectures, configs, tensor keys/shapes or tokenizers. A full model's weights are read in the
dtype they are stored in, interpolated in float32 (float64 stays float64) and saved in `dtype` (default: the dtype
a's base is stored in, `checkpoint_dtype`); config.json's `dtype` is rewritten only when it does not already say
so. An adapter output keeps the adapters' own dtype.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Literal

import torch

from sacpo.fsutil import atomic_dir, atomic_save_file, atomic_write_bytes, atomic_write_json
from sacpo.math.merging import MergeError, _check_q, linear_merge
from sacpo.merge.adapter_merge import why_not_adapter, write_merged_adapter
from sacpo.merge.sources import Source, TensorReader, check_targets, read_source
from sacpo.models.adapters import ADAPTER_WEIGHTS
from sacpo.models.dtypes import checkpoint_dtype, config_dtype, dtype_name
from sacpo.models.load import (
    ModelLoadError,
    fingerprint_model,
    fingerprint_tokenizer,
    hash_files,
    load_tokenizer,
)

MergeOutput = Literal["auto", "adapter", "dense"]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)
CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}
MERGE_FILE = "merge.json"


def _config(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in CONFIG_KEYS_IGNORED}


def _tokenizer_dir(src: Source) -> Path:
    """Where a side's tokenizer files are: its own directory, or (an adapter saved without them) its base."""
    return src.path if (src.path / "tokenizer_config.json").is_file() else src.base


def _tokenizer_files(d: Path) -> list[Path]:
    return [d / n for n in TOKENIZER_FILES if (d / n).is_file()]


def _same_tokenizer(da: Path, db: Path) -> bool:
    """The same tokenizer files, or tokenizers equal in content (vocabulary, special tokens, chat template) with
    the same model_max_length: an SFT model's tokenizer and the one a training run re-saved (with its pad token)."""
    ta, tb = _tokenizer_files(da), _tokenizer_files(db)
    if [p.name for p in ta] != [p.name for p in tb]:
        return False
    if hash_files(ta) == hash_files(tb):
        return True
    try:
        tok_a, tok_b = load_tokenizer(da), load_tokenizer(db)
    except ModelLoadError:
        return False
    same_length = tok_a.model_max_length == tok_b.model_max_length
    return same_length and fingerprint_tokenizer(tok_a) == fingerprint_tokenizer(tok_b)


def check_mergeable(a: Source, b: Source) -> None:
    """Same architecture/config (of the bases) and the same tokenizer, or a MergeError saying what differs."""
    ca, cb = _config(a.base), _config(b.base)
    if ca != cb:
        diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        details = ", ".join(f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in diff[:5])
        raise MergeError(f"{a.path} and {b.path} have different configs ({details}); cannot merge")
    if not _same_tokenizer(_tokenizer_dir(a), _tokenizer_dir(b)):
        raise MergeError(f"{a.path} and {b.path} have different tokenizers; cannot merge")


def resolve_output(a: Source, b: Source, output: MergeOutput) -> str:
    """ "adapter" or "dense" for the requested output; "adapter" on sources that cannot give one is refused."""
    if output == "dense":
        return "dense"
    reason = why_not_adapter(a, b)
    if reason is None:
        return "adapter"
    if output == "adapter":
        raise MergeError(f"cannot write this merge as an adapter: {reason} (use output: dense)")
    return "dense"


def _check_same_tensors(ra: TensorReader, rb: TensorReader, a: Source, b: Source) -> None:
    """The same tensor keys, shapes and dtypes on both sides (read from the safetensors headers only)."""
    ka, kb = ra.keys(), rb.keys()
    if ka != kb:
        only_a, only_b = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
        raise MergeError(
            f"{a.path} and {b.path} have different keys: only in a: {only_a[:5]}; only in b: {only_b[:5]}"
        )
    for key in ka:
        (sha, dta), (shb, dtb) = ra.shape_dtype(key), rb.shape_dtype(key)
        if sha != shb:
            raise MergeError(
                f"tensor {key!r} has shape {sha} in {a.path} but {shb} in {b.path} "
                "(different architecture or vocabulary size?)"
            )
        if dta != dtb:
            raise MergeError(f"tensor {key!r} has dtype {dta} in {a.path} but {dtb} in {b.path}")


def dense_merge(a: Source, b: Source, q: float, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """θ = (1−q)·θ_a + q·θ_b for every tensor of the base(s), each side's adapters applied first (`Source.weight`),
    read one tensor at a time from the memory-mapped safetensors (a base shared by a and b is opened and read once):
    no full copy of either side is held, only the output."""
    same_base = a.base.resolve() == b.base.resolve()
    with TensorReader(a.base) as ra, contextlib.nullcontext(ra) if same_base else TensorReader(b.base) as rb:
        _check_same_tensors(ra, rb, a, b)
        check_targets(a, ra)
        check_targets(b, rb)
        out = {}
        for key in ra.keys():
            base_a = ra.get(key)
            base_b = base_a if same_base else rb.get(key)
            ta, tb = a.weight(key, base_a), b.weight(key, base_b)
            out[key] = linear_merge({key: ta}, {key: tb}, q, dtype)[key].contiguous()
    return out


def merge_dirs(
    a: str | Path,
    b: str | Path,
    q: float,
    out: str | Path,
    output: MergeOutput = "auto",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the merged model to `out` (atomically: `sacpo.fsutil.atomic_dir`) as an adapter or a full model (module
    docstring; a full model in `dtype`, None: a's base's), with `merge.json` naming a, b, q, the output kind, the
    dtype and the content fingerprints of a and b.

    The output is byte-for-byte deterministic (the safetensors header carries only {"format": "pt"}: a second
    metadata key would be serialised in hash-map order, so equal merges would hash differently and invalidate
    every cache keyed by the model's fingerprint). If `out` already holds this exact merge (same merge.json,
    weights present), nothing is rewritten.
    """
    _check_q(q)
    sa, sb = read_source(a), read_source(b)
    check_mergeable(sa, sb)
    kind = resolve_output(sa, sb, output)
    dtype = (dtype or checkpoint_dtype(sa.base)) if kind == "dense" else None
    record = {
        "a": str(a),
        "b": str(b),
        "q": q,
        "dtype": None if dtype is None else dtype_name(dtype),
        "output": kind,
        "a_fingerprint": fingerprint_model(a),
        "b_fingerprint": fingerprint_model(b),
    }
    out = Path(out)
    weights = ADAPTER_WEIGHTS if kind == "adapter" else "model.safetensors"
    try:
        if json.loads((out / MERGE_FILE).read_text()) == record and (out / weights).is_file():
            return out
    except (OSError, ValueError):
        pass
    merged = dense_merge(sa, sb, q, dtype) if kind == "dense" else None
    tokenizer_dir = _tokenizer_dir(sa)
    with atomic_dir(out) as tmp:
        if merged is not None:
            atomic_save_file(merged, tmp / "model.safetensors", metadata={"format": "pt"})
            for name in ("config.json", "generation_config.json"):
                if (sa.base / name).is_file():
                    atomic_write_bytes(tmp / name, (sa.base / name).read_bytes())
            config = json.loads((tmp / "config.json").read_text())
            if config_dtype(config) != dtype or "torch_dtype" in config:
                config.pop("torch_dtype", None)
                config["dtype"] = dtype_name(dtype)
                atomic_write_json(tmp / "config.json", config, indent=2, sort_keys=True)
        else:
            write_merged_adapter(sa, sb, q, tmp, out)
        if merged is not None or tokenizer_dir != sa.base:  # an adapter reads its base's tokenizer otherwise
            for f in _tokenizer_files(tokenizer_dir):
                atomic_write_bytes(tmp / f.name, f.read_bytes())
        atomic_write_json(tmp / MERGE_FILE, record)
    return out
