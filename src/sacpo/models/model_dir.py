"""What a full (dense) Hugging Face model directory must hold, and content hashes of files.

The base layer of `sacpo.models.load` and `sacpo.models.adapters` (which both re-use it): a directory with
config.json and safetensors weights; pickle weights are refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class ModelLoadError(ValueError):
    """A model directory cannot be loaded safely."""


def check_dense_model_dir(path: str | Path) -> Path:
    """The directory must exist, hold a config.json and safetensors weights (pickle .bin files are refused)."""
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"{p}: model directory not found (hub names are not loaded at run time)")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p}: no config.json — not a Hugging Face model directory")
    if not any(p.glob("*.safetensors")):
        pickles = sorted(x.name for x in p.glob("*.bin")) + sorted(x.name for x in p.glob("*.pt"))
        hint = (
            f" It has pickle weights {pickles}: pickle files can execute code when loaded, so sacpo refuses "
            "them. Convert once in a trusted environment with `model.save_pretrained(dir, "
            "safe_serialization=True)`."
            if pickles
            else ""
        )
        raise ModelLoadError(f"{p}: no .safetensors weights.{hint}")
    return p


def hash_files(paths: list[Path], chunk: int = 1 << 22) -> str:
    """sha256 over the names and bytes of files, in the given order (read into one reused buffer: no allocation
    per block)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()


def one_line(e: Exception, n: int = 300) -> str:
    """An exception's message on one line, at most n characters."""
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."
