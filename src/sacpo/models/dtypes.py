"""The dtype a model is stored in: `auto | bf16 | fp16 | fp32` resolved against a checkpoint, and saving in it.

    resolve_dtype("auto", "runs/sft")            → the checkpoint's own dtype (`checkpoint_dtype`)
    resolve_dtype("bf16", "runs/sft")            → torch.bfloat16
    save_pretrained_as(model, out, torch.bfloat16)   the live model is not changed (a cast copy is saved)

`checkpoint_dtype(dir)`: the floating dtype that holds the most parameters (by element count) in the directory's
safetensors files, read from their headers (no tensor data); config.json's `dtype` (or the older `torch_dtype`) only
when no file has a floating tensor; float32 when neither says. The tensors decide because they are what is on disk:
a config can be stale after a hand-made cast.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sacpo.fsutil import atomic_write_json
from sacpo.models.adapters import is_adapter_dir, read_chain
from sacpo.models.load import check_model_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAFETENSORS_FLOATS = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_CONFIG_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → "bfloat16" (the spelling of config.json's `dtype`)."""
    return str(dtype).removeprefix("torch.")


def config_dtype(config: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype a config.json mapping declares (`dtype`, else `torch_dtype`), or None."""
    declared = config.get("dtype") or config.get("torch_dtype")
    return _CONFIG_NAMES.get(declared) if isinstance(declared, str) else None


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a model directory's weights are stored in (see the module docstring for the rule); for a LoRA
    adapter directory, its base model's."""
    from safetensors import safe_open

    if is_adapter_dir(path):
        path = read_chain(path).base
    p = check_model_dir(path)
    counts: Counter[torch.dtype] = Counter()
    for f in sorted(p.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                part = st.get_slice(key)
                dtype = _SAFETENSORS_FLOATS.get(part.get_dtype())
                if dtype is not None:
                    counts[dtype] += math.prod(part.get_shape())
    if counts:  # ties (never seen in practice) go to the wider dtype
        return max(counts, key=lambda d: (counts[d], torch.finfo(d).bits))
    return config_dtype(json.loads((p / "config.json").read_text())) or torch.float32


def resolve_dtype(spec: str, source: str | Path) -> torch.dtype:
    """`auto` → `checkpoint_dtype(source)`; bf16 / fp16 / fp32 → that torch dtype."""
    if spec == "auto":
        return checkpoint_dtype(source)
    if spec not in DTYPES:
        raise ValueError(f"unknown dtype {spec!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def cast_state_dict(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype` (others as they are). Tensors that share storage in `state` (tied weights,
    e.g. lm_head.weight = embed_tokens.weight) share it in the result too, so they are still saved once."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, t in state.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[key] = t
            continue
        alias = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if alias not in cast:
            cast[alias] = t.detach().to(dtype)
        out[key] = cast[alias]
    return out


def save_pretrained_as(model: Any, out: str | Path, dtype: torch.dtype) -> None:
    """`model.save_pretrained(out)` (safetensors) with the floating weights in `dtype` and config.json's `dtype`
    saying so. The live model keeps its own weights; a cast copy (of the size of the saved weights) is made only for
    the tensors whose dtype differs."""
    out = Path(out)
    model.save_pretrained(out, state_dict=cast_state_dict(model.state_dict(), dtype), safe_serialization=True)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("dtype") != dtype_name(dtype) or "torch_dtype" in config:
        config.pop("torch_dtype", None)
        config["dtype"] = dtype_name(dtype)
        atomic_write_json(config_file, config, indent=2, sort_keys=True)  # transformers' own layout
