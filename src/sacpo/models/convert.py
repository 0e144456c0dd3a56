"""Import a model as an HF safetensors directory (`sacpo import`): from a GGUF file or another HF directory.

    import_model("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")            # de-quantised, float32
    import_model("downloads/my-sft", "models/my-sft-bf16", dtype="bf16")         # re-saved in bfloat16

The output holds config.json, generation_config.json, model.safetensors and the tokenizer (tokenizer.json, its
config and the chat template), written atomically (`sacpo.fsutil.atomic_dir`): a failed import leaves no output
and an older one in place. An HF source must hold safetensors weights (pickle `.bin` files are refused, as
everywhere in sacpo) and must not be quantised.

dtype `auto` is the source's own (`source_dtype`): an HF directory's `checkpoint_dtype`; for a GGUF file, the float
type when every tensor is stored as F32 / F16 / BF16 (BF16 if any tensor is, else F16 if any is, else F32: the F32
tensors of a half-precision file are its norms), and float32 for a quantised file (its de-quantised values are exact
in float32, not in half precision).

GGUF: transformers reads the file through the `gguf` package, de-quantised (`GgufConfig(dequantize=True)`) in the
output dtype. The model it returns is marked as quantised (`config.quantization_config` and an attached quantizer
that refuses to save), so its weights are moved, not copied, into a model built from the same config without that
mark (built on the meta device, then `load_state_dict(assign=True)`): the peak memory is about one copy of the model
in the output dtype.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sacpo.fsutil import atomic_dir, atomic_write_json
from sacpo.models.dtypes import DTYPES, checkpoint_dtype, save_pretrained_as
from sacpo.models.load import ModelLoadError, _quiet_transformers, check_model_dir
from sacpo.models.model_dir import one_line

GGUF_INSTALL_HINT = "pip install gguf"
_GGUF_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading GGUF files needs the `gguf` package: `{GGUF_INSTALL_HINT}`")


def gguf_dtype(path: str | Path) -> torch.dtype:
    """The float type a GGUF file stores its tensors in (rule in the module docstring); float32 when quantised."""
    _require_gguf()
    from gguf import GGUFReader

    try:
        types = {t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    except Exception as e:  # not a GGUF file, an unsupported version, a truncated file
        raise ModelLoadError(f"{path}: cannot import: {type(e).__name__}: {one_line(e)}") from e
    if not types <= set(_GGUF_FLOATS):
        return torch.float32
    for name in ("BF16", "F16"):
        if name in types:
            return _GGUF_FLOATS[name]
    return torch.float32


def source_dtype(src: str | Path) -> torch.dtype:
    """The dtype `auto` means for an import source (a .gguf file or an HF model directory)."""
    p = Path(src)
    return gguf_dtype(p) if p.is_file() else checkpoint_dtype(p)


def _resolve(dtype: str | torch.dtype, src: Path) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return source_dtype(src)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def import_model(
    src: str | Path,
    out: str | Path,
    dtype: str | torch.dtype = "auto",
    extra_json: Mapping[str, Any] | None = None,
) -> Path:
    """Write `src` (a .gguf file or an HF model directory) to `out` as an HF safetensors directory in `dtype`
    (auto | bf16 | fp16 | fp32 or a torch dtype); `extra_json`: more files written into `out` ({name: data}).
    Returns `out`. Raises ModelLoadError for a missing, pickle-only, quantised or unreadable source."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    src, out = Path(src), Path(out)
    if src.is_file():
        if src.suffix != ".gguf":
            raise ModelLoadError(f"{src}: not a .gguf file or a model directory")
        _require_gguf()
    elif not src.is_dir():
        raise ModelLoadError(f"{src}: no such GGUF file or model directory")
    else:
        check_model_dir(src)
    target = _resolve(dtype, src)
    with atomic_dir(out) as tmp:
        try:
            model = _load_gguf(src, target) if src.is_file() else _load_hf(src, target)
            gguf = {"gguf_file": src.name} if src.is_file() else {}
            tokenizer = AutoTokenizer.from_pretrained(src.parent if src.is_file() else src, **gguf)
        except ModelLoadError:
            raise
        except Exception as e:  # unknown architecture, corrupt file, ...
            raise ModelLoadError(f"{src}: cannot import: {type(e).__name__}: {one_line(e)}") from e
        model.config.use_cache = True
        save_pretrained_as(model, tmp, target)
        tokenizer.save_pretrained(tmp)
        for name, data in (extra_json or {}).items():
            atomic_write_json(tmp / name, data)
    return out


def _load_hf(src: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ModelLoadError(f"{src}: a quantised checkpoint ({method}); import the unquantised weights")
    return AutoModelForCausalLM.from_pretrained(src, dtype=dtype, use_safetensors=True)


def _load_gguf(src: Path, dtype: torch.dtype) -> Any:
    """The GGUF's weights, de-quantised in `dtype`, in a plain (unmarked) model of the GGUF's architecture: for
    saving only (buffers computed at init and never saved, such as rotary frequencies, stay on the meta device)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    loaded = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the mark that makes transformers treat the model as quantised
    config.dtype = dtype
    state = loaded.state_dict()
    del loaded
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(
            f"{src}: GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    if tied:
        model.tie_weights()
    model.generation_config = model.generation_config.__class__.from_model_config(config)
    return model.eval()
