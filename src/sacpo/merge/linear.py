"""Merge two HF model directories: θ = (1−q)·θ_a + q·θ_b (P-SACPO and the naive-merge baseline).

Works on the safetensors files directly (no model instantiation); refuses different architectures, configs,
tensor keys/shapes or tokenizers. The merged directory gets a's config and tokenizer. The weights are read in the
dtype they are stored in, interpolated in float32 (float64 stays float64) and saved in `dtype` (default: a's
`checkpoint_dtype`); config.json's `dtype` is rewritten only when it does not already say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sacpo.fsutil import atomic_dir, atomic_save_file, atomic_write_bytes, atomic_write_json
from sacpo.math.merging import MergeError, _check_q, linear_merge
from sacpo.models.dtypes import checkpoint_dtype, config_dtype, dtype_name
from sacpo.models.load import check_model_dir, fingerprint_model, hash_files

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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory's safetensors file(s)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(check_model_dir(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _config(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in CONFIG_KEYS_IGNORED}


def check_mergeable(a: str | Path, b: str | Path) -> None:
    """Same architecture/config and same tokenizer files, or a MergeError saying what differs."""
    pa, pb = check_model_dir(a), check_model_dir(b)
    ca, cb = _config(pa), _config(pb)
    if ca != cb:
        diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        details = ", ".join(f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in diff[:5])
        raise MergeError(f"{pa} and {pb} have different configs ({details}); cannot merge")
    ta = [pa / n for n in TOKENIZER_FILES if (pa / n).is_file()]
    tb = [pb / n for n in TOKENIZER_FILES if (pb / n).is_file()]
    if [p.name for p in ta] != [p.name for p in tb] or hash_files(ta) != hash_files(tb):
        raise MergeError(f"{pa} and {pb} have different tokenizers; cannot merge")


MERGE_FILE = "merge.json"


def merge_dirs(
    a: str | Path, b: str | Path, q: float, out: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Write the merged model to `out` in `dtype` (None: a's; atomically: `sacpo.fsutil.atomic_dir`), with
    `merge.json` naming a, b, q, the dtype and the content fingerprints of a and b.

    The output is byte-for-byte deterministic (the safetensors header carries only {"format": "pt"}: a second
    metadata key would be serialised in hash-map order, so equal merges would hash differently and invalidate
    every cache keyed by the model's fingerprint). If `out` already holds this exact merge (same merge.json,
    weights present), nothing is rewritten.
    """
    _check_q(q)
    check_mergeable(a, b)
    dtype = dtype or checkpoint_dtype(a)
    record = {
        "a": str(a),
        "b": str(b),
        "q": q,
        "dtype": dtype_name(dtype),
        "a_fingerprint": fingerprint_model(a),
        "b_fingerprint": fingerprint_model(b),
    }
    out = Path(out)
    try:
        if json.loads((out / MERGE_FILE).read_text()) == record and (out / "model.safetensors").is_file():
            return out
    except (OSError, ValueError):
        pass
    merged = linear_merge(read_state_dict(a), read_state_dict(b), q, dtype)
    with atomic_dir(out) as tmp:
        atomic_save_file(
            {k: v.contiguous() for k, v in merged.items()},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            if (Path(a) / name).is_file():
                atomic_write_bytes(tmp / name, (Path(a) / name).read_bytes())
        config = json.loads((tmp / "config.json").read_text())
        if config_dtype(config) != dtype or "torch_dtype" in config:
            config.pop("torch_dtype", None)
            config["dtype"] = dtype_name(dtype)
            atomic_write_json(tmp / "config.json", config, indent=2, sort_keys=True)
        atomic_write_json(tmp / MERGE_FILE, record)
    return out
