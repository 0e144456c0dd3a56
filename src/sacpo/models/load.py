"""Load models and tokenizers from HF directories (safetensors only) and fingerprint them for caches.

A model directory is a full HF directory or a LoRA adapter directory (`sacpo.models.adapters`: a base plus a chain of
adapters): `load_model`, `load_tokenizer`, `model_files` and `fingerprint_model` take either, so every consumer
(training, evaluation, best-of-n, decoding) works unchanged on an adapter-only output."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from sacpo.models.adapters import (
    apply_chain,
    chain_files,
    chain_fingerprint,
    is_adapter_dir,
    read_chain,
    task_types,
)
from sacpo.models.model_dir import ModelLoadError, check_dense_model_dir, hash_files, one_line

__all__ = [
    "ModelLoadError",
    "check_model_dir",
    "default_device",
    "fingerprint_model",
    "fingerprint_tokenizer",
    "hash_files",
    "is_adapter_dir",
    "load_model",
    "load_tokenizer",
    "load_tokenizer_with_fingerprint",
    "model_files",
    "tokenizer_fingerprint",
]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def check_model_dir(path: str | Path) -> Path:
    """A loadable model directory: a full HF directory (config.json + safetensors weights; pickle .bin files are
    refused), or a LoRA adapter directory whose chain (base + adapters, `sacpo.models.adapters`) is complete."""
    if is_adapter_dir(path):
        read_chain(path)
        return Path(path)
    return check_dense_model_dir(path)


def default_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu" — where inference-only work (sampling, scoring) runs by default."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> Any:
    """AutoModelForCausalLM from a local directory with safetensors weights only.

    An adapter directory loads its base in float32, merges its chain of adapters into it in order (peft's
    merge_and_unload) and then casts to `dtype`: the same weights as the merged output of the same training, not
    a sum rounded in a lower precision."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    p = check_model_dir(path)
    chain = read_chain(p) if is_adapter_dir(p) else None
    if chain is not None:
        kinds = task_types(chain)
        if any(k not in (None, "CAUSAL_LM") for k in kinds):
            raise ModelLoadError(
                f"{p}: adapter task types {kinds}: not a causal-LM policy (a reward model? score it with "
                "sacpo.scoring.reward_model.RewardModelScorer)"
            )
    source = chain.base if chain is not None else p
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch.float32 if chain is not None else dtype or torch.float32,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as e:  # unknown architecture, custom code refused, corrupt safetensors, ...
        raise ModelLoadError(f"{source}: cannot load the model: {type(e).__name__}: {one_line(e)}") from e
    if chain is not None:
        model = apply_chain(model, chain.adapters)
        if dtype is not None and dtype != torch.float32:
            model = model.to(dtype)
    return model


def tokenizer_dir(path: str | Path) -> Path:
    """The directory `load_tokenizer(path)` reads: `path`, or the base of an adapter saved without a tokenizer."""
    p = Path(path)
    if not p.is_dir():  # a missing path would otherwise be looked up as a hub repository name
        raise ModelLoadError(f"{p}: model directory not found (hub names are not loaded at run time)")
    if is_adapter_dir(p) and not (p / "tokenizer_config.json").is_file():
        p = read_chain(p).base  # an adapter saved without its tokenizer uses the base's
    return p


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer from a local directory; pad token defaults to EOS; right padding."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    p = tokenizer_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"{p}: cannot load the tokenizer: {type(e).__name__}: {one_line(e)}") from e
    if tok.eos_token_id is None:
        raise ModelLoadError(f"{path}: tokenizer has no EOS token; sacpo ends every response with EOS")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def model_files(path: str | Path) -> tuple[Path, list[Path], tuple[tuple, ...]]:
    """A model directory, the files its weights depend on (config and safetensors; for an adapter directory those
    of its base and of every adapter of its chain), and each file's identity (name, inode, size, mtime_ns,
    ctime_ns): any write changes the ctime, and sacpo rewrites a model by renaming a new directory into place."""
    p = check_model_dir(path)
    if is_adapter_dir(p):
        files = chain_files(read_chain(p))
    else:
        files = [p / "config.json", *sorted(p.glob("*.safetensors"))]
    stats = [(f.name, f.stat()) for f in files]
    return (
        p,
        files,
        tuple((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for name, st in stats),
    )


_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint_model(path: str | Path) -> str:
    """Content hash of a model directory's weights and config (what the reference log-probs depend on). An adapter
    directory's is its chain's content (`sacpo.models.adapters.chain_fingerprint`: the base's fingerprint and every
    adapter's config and weights), not its path.

    Memoised within the process on (resolved path, and per file: name, inode, size, mtime, ctime): a λ sweep
    hashes its parent once, not once per branch. Any write changes the ctime (which `utime` cannot set back);
    files changed less than 2 s ago are not memoised, since timestamps are only as fine as a kernel tick ("racy"
    entries, as git's index handles them).
    """
    p, files, state = model_files(path)
    key = (str(p.resolve()), *state)
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    if is_adapter_dir(p):
        chain = read_chain(p)
        digest = chain_fingerprint(fingerprint_model(chain.base), chain)
    else:
        digest = hash_files(files)
    if all(time.time_ns() - max(mtime, ctime) > 2_000_000_000 for *_, mtime, ctime in state):
        _FINGERPRINTS[key] = digest
    return digest


# Files `AutoTokenizer.from_pretrained(dir)` cannot read: weights (by suffix) and sacpo's own records.
_NOT_TOKENIZER_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
)
_NOT_TOKENIZER_FILES = frozenset({"merge.json", "sacpo_adapter.json"})
_TOKENIZER_SUBDIRS = ("additional_chat_templates",)  # read by transformers 5.x
_MAX_TOKENIZER_FILE = 64 << 20
_TOKENIZER_FINGERPRINTS: dict[tuple[str, bool], str] = {}


def tokenizer_files_digest(path: str | Path) -> str | None:
    """sha256 of the names and bytes of every file a tokenizer load of `path` may read (`tokenizer_dir`): all its
    top-level files but weights and sacpo's merge / adapter-chain records (config.json and adapter_config.json
    included), and those of its additional_chat_templates/. None when one of them is over 64 MiB (not memoised)."""
    d = tokenizer_dir(path)
    files = sorted(f for f in d.iterdir() if f.is_file())
    for sub in _TOKENIZER_SUBDIRS:
        if (d / sub).is_dir():
            files += sorted(f for f in (d / sub).rglob("*") if f.is_file())
    files = [
        f
        for f in files
        if f.name not in _NOT_TOKENIZER_FILES and not f.name.endswith(_NOT_TOKENIZER_SUFFIXES)
    ]
    if any(f.stat().st_size > _MAX_TOKENIZER_FILE for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(d)}\0{f.stat().st_size}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def load_tokenizer_with_fingerprint(path: str | Path, trust_remote_code: bool = False) -> tuple[Any, str]:
    """(`load_tokenizer(path)`, its `fingerprint_tokenizer`), the fingerprint memoised for `tokenizer_fingerprint`
    when the directory's tokenizer files did not change during the load."""
    before = tokenizer_files_digest(path)
    tokenizer = load_tokenizer(path, trust_remote_code)
    fp = fingerprint_tokenizer(tokenizer)
    if before is not None and tokenizer_files_digest(path) == before:
        _TOKENIZER_FINGERPRINTS[(before, trust_remote_code)] = fp
    return tokenizer, fp


def tokenizer_fingerprint(path: str | Path, trust_remote_code: bool = False) -> str:
    """`fingerprint_tokenizer(load_tokenizer(path))`, memoised within the process on the content of the files the
    load reads (`tokenizer_files_digest`): directories whose tokenizer files are byte-identical are loaded once
    (the models of a pipeline all save the same tokenizer)."""
    digest = tokenizer_files_digest(path)
    if digest is not None and (digest, trust_remote_code) in _TOKENIZER_FINGERPRINTS:
        return _TOKENIZER_FINGERPRINTS[(digest, trust_remote_code)]
    return load_tokenizer_with_fingerprint(path, trust_remote_code)[1]


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
