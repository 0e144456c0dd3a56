"""Load models and tokenizers from HF directories (safetensors only) and fingerprint them for caches."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch


class ModelLoadError(ValueError):
    """A model directory cannot be loaded safely."""


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def check_model_dir(path: str | Path) -> Path:
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


def default_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu" — where inference-only work (sampling, scoring) runs by default."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> Any:
    """AutoModelForCausalLM from a local directory with safetensors weights only."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    p = check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # unknown architecture, custom code refused, corrupt safetensors, ...
        raise ModelLoadError(f"{p}: cannot load the model: {type(e).__name__}: {_one_line(e)}") from e
    return model


def _one_line(e: Exception, n: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer from a local directory; pad token defaults to EOS; right padding."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    p = Path(path)
    if not p.is_dir():  # a missing path would otherwise be looked up as a hub repository name
        raise ModelLoadError(f"{p}: model directory not found (hub names are not loaded at run time)")
    try:
        tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"{p}: cannot load the tokenizer: {type(e).__name__}: {_one_line(e)}") from e
    if tok.eos_token_id is None:
        raise ModelLoadError(f"{path}: tokenizer has no EOS token; sacpo ends every response with EOS")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def hash_files(paths: list[Path], chunk: int = 1 << 22) -> str:
    """sha256 over the names and bytes of files, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def model_files(path: str | Path) -> tuple[Path, list[Path], tuple[tuple, ...]]:
    """A model directory, its config and safetensors files, and each file's identity (name, inode, size, mtime_ns,
    ctime_ns): any write changes the ctime, and sacpo rewrites a model by renaming a new directory into place."""
    p = check_model_dir(path)
    files = [p / "config.json", *sorted(p.glob("*.safetensors"))]
    stats = [(f.name, f.stat()) for f in files]
    return (
        p,
        files,
        tuple((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for name, st in stats),
    )


_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint_model(path: str | Path) -> str:
    """Content hash of a model directory's weights and config (what the reference log-probs depend on).

    Memoised within the process on (resolved path, and per file: name, inode, size, mtime, ctime): a λ sweep
    hashes its parent once, not once per branch. Any write changes the ctime (which `utime` cannot set back);
    files changed less than 2 s ago are not memoised, since timestamps are only as fine as a kernel tick ("racy"
    entries, as git's index handles them).
    """
    p, files, state = model_files(path)
    key = (str(p.resolve()), *state)
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    digest = hash_files(files)
    if all(time.time_ns() - max(mtime, ctime) > 2_000_000_000 for *_, mtime, ctime in state):
        _FINGERPRINTS[key] = digest
    return digest


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """Content hash of a tokenizer: vocabulary/merges/normaliser (tokenizer.json), special tokens, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        (backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode()
    )
    h.update(repr((tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token)).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()
