"""LoRA adapter directories as models: one adapter, or a stack of adapters, on a shared full base model.

An adapter directory is what peft's `save_pretrained` writes (adapter_config.json, adapter_model.safetensors), with
the tokenizer files, and no config.json. It stands for the dense model

    θ = θ_base ⊕ Δ_1 ⊕ … ⊕ Δ_k,    Δ_i[W] = s_i·B_i·A_i  (s_i = α_i/r_i; transposed for GPT-2's Conv1D)

merged module by module in that order, the way peft's merge_and_unload merges one adapter after the other. Which
base and which adapters below it: `sacpo_adapter.json` (CHAIN_FILE) next to adapter_config.json,

    {"format": "sacpo-adapter-chain", "version": 1,
     "base": {"path": "/abs/sft", "relative": "../../../sft"},
     "parents": [{"path": "/abs/stages/helpful/model", "relative": "../../helpful/model",
                  "fingerprint": "<adapter_fingerprint of that directory>"}]}

lists the full base model directory and the adapters applied before this one (this directory is applied last): a
SACPO step-2 adapter trained on a LoRA step-1 adapter has the step-1 adapter as its one parent. Paths are absolute,
with a relative fallback (from this directory) for a run directory that was moved; a parent found either way must
still have the fingerprint recorded when this adapter was trained on it, so a retrained parent is refused instead of
silently giving another model (the base is not re-hashed at load, it is large: `fingerprint_model`, and so every
cache key, still covers its content). Without the file (an adapter written by another tool) the chain is peft's
own: base = adapter_config.json's `base_model_name_or_path` (a local directory; hub names are not loaded), no
parents. sacpo writes `base_model_name_or_path` = the base too, so peft and transformers load a one-adapter chain
the same way; a stacked adapter loaded by those tools alone lacks its parents.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sacpo.fsutil import atomic_write_json
from sacpo.models.model_dir import ModelLoadError, check_dense_model_dir, hash_files
from sacpo.rng import torch_untouched

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHAIN_FILE = "sacpo_adapter.json"
CHAIN_FORMAT = "sacpo-adapter-chain"
# adapter_config.json fields that name places or modes, not the update the adapter applies
_NOT_CONTENT = ("base_model_name_or_path", "inference_mode", "revision", "peft_version")


def is_adapter_dir(path: str | Path) -> bool:
    """A directory with adapter_config.json and no config.json."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of an adapter directory."""
    try:
        cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable {ADAPTER_CONFIG}: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: {ADAPTER_CONFIG} is not a JSON object")
    return cfg


def check_adapter_files(path: str | Path) -> Path:
    """The adapter directory's own files: its config and safetensors weights (pickle adapter_model.bin refused)."""
    p = Path(path)
    if not (p / ADAPTER_CONFIG).is_file():
        raise ModelLoadError(f"{p}: no {ADAPTER_CONFIG} — not an adapter directory")
    if not (p / ADAPTER_WEIGHTS).is_file():
        pickle = (
            " (it has the pickle adapter_model.bin, which sacpo refuses)"
            if (p / "adapter_model.bin").is_file()
            else ""
        )
        raise ModelLoadError(f"{p}: no {ADAPTER_WEIGHTS}{pickle}")
    return p


def adapter_fingerprint(path: str | Path) -> str:
    """sha256 of what an adapter applies: its config without paths and modes (`_NOT_CONTENT`), and its weights.
    The same adapter written to another directory has the same fingerprint."""
    p = check_adapter_files(path)
    cfg = {k: v for k, v in adapter_config(p).items() if k not in _NOT_CONTENT}
    h = hashlib.sha256(b"sacpo-adapter-v1\n")
    h.update(json.dumps(cfg, sort_keys=True).encode())
    h.update(hash_files([p / ADAPTER_WEIGHTS]).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class AdapterChain:
    """A full base model directory and the adapters merged onto it, in order (the adapter directory itself last)."""

    base: Path
    adapters: tuple[Path, ...]

    @property
    def parents(self) -> tuple[Path, ...]:
        return self.adapters[:-1]


def _locate(entry: Any, here: Path, what: str) -> Path:
    """A path of the chain file: absolute if it exists, else relative to the adapter directory."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ModelLoadError(f"{here}: {CHAIN_FILE}: {what} must be an object with a 'path'")
    absolute = Path(entry["path"])
    if absolute.exists():
        return absolute
    relative = entry.get("relative")
    if isinstance(relative, str) and (here / relative).exists():
        return (here / relative).resolve()
    raise ModelLoadError(f"{here}: {CHAIN_FILE}: {what} {absolute} not found (moved or deleted?)")


def read_chain(path: str | Path) -> AdapterChain:
    """The chain an adapter directory stands for (see the module docstring), checked: the base is a full model
    directory, every adapter has its files, and every parent still has the fingerprint recorded for it."""
    p = check_adapter_files(path)
    chain_file = p / CHAIN_FILE
    if not chain_file.is_file():
        base = adapter_config(p).get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(
                f"{p}: {ADAPTER_CONFIG} names no base_model_name_or_path and there is no {CHAIN_FILE}"
            )
        if not Path(base).is_dir():
            raise ModelLoadError(
                f"{p}: base model {base!r} is not a local directory (hub names are not loaded)"
            )
        return AdapterChain(check_dense_model_dir(base), (p,))
    try:
        record = json.loads(chain_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{p}: unreadable {CHAIN_FILE}: {e}") from e
    if not isinstance(record, dict) or record.get("format") != CHAIN_FORMAT or record.get("version") != 1:
        raise ModelLoadError(f"{p}: {CHAIN_FILE} is not a version-1 {CHAIN_FORMAT} record")
    base = check_dense_model_dir(_locate(record.get("base"), p, "base"))
    parents = []
    for i, entry in enumerate(record.get("parents") or []):
        parent = check_adapter_files(_locate(entry, p, f"parent {i}"))
        if adapter_fingerprint(parent) != entry.get("fingerprint"):
            raise ModelLoadError(
                f"{p}: parent adapter {parent} changed after this adapter was trained on it (fingerprint "
                "mismatch); retrain this stage"
            )
        parents.append(parent)
    return AdapterChain(base, (*parents, p))


def chain_below(policy: str | Path) -> tuple[Path, tuple[Path, ...]]:
    """(base, adapters) that a new adapter trained on `policy` stacks on: a full model is the base with no
    adapters; an adapter directory contributes its whole chain."""
    if is_adapter_dir(policy):
        chain = read_chain(policy)
        return chain.base, chain.adapters
    return check_dense_model_dir(policy), ()


def _entry(target: Path, final_dir: Path) -> dict[str, str]:
    target = target.resolve()
    return {"path": str(target), "relative": os.path.relpath(target, final_dir.resolve())}


def write_chain(tmp_dir: Path, final_dir: Path, base: Path, parents: tuple[Path, ...]) -> None:
    """Complete an adapter written by peft into `tmp_dir` (to be renamed to `final_dir`): CHAIN_FILE with the base
    and the parents' paths and fingerprints, and `base_model_name_or_path` = the base in adapter_config.json."""
    record = {
        "format": CHAIN_FORMAT,
        "version": 1,
        "base": _entry(base, final_dir),
        "parents": [{**_entry(a, final_dir), "fingerprint": adapter_fingerprint(a)} for a in parents],
    }
    atomic_write_json(tmp_dir / CHAIN_FILE, record)
    cfg = adapter_config(tmp_dir)
    cfg["base_model_name_or_path"] = str(base.resolve())
    atomic_write_json(tmp_dir / ADAPTER_CONFIG, cfg)


def save_adapter(
    peft_model: Any, tokenizer: Any, directory: Path, final_dir: Path, below: str | Path
) -> None:
    """Write a peft model's adapter into `directory` (which becomes `final_dir`, for the chain's relative paths):
    adapter_config.json + adapter_model.safetensors, the tokenizer, and CHAIN_FILE stacking it on `below` (the model
    it was trained from: its base and, for an adapter directory, its adapters). Tokenizer files byte-identical to
    the base's are not kept (3.5 MB for SmolLM2; `load_tokenizer` reads the base's); peft's template README is
    dropped."""
    base, parents = chain_below(below)
    config = peft_model.peft_config["default"]
    named, config.base_model_name_or_path = config.base_model_name_or_path, str(base.resolve())
    try:  # peft reads the base's config.json there (and would look a non-directory up on the hub)
        peft_model.save_pretrained(directory, safe_serialization=True)
    finally:
        config.base_model_name_or_path = named
    (directory / "README.md").unlink(missing_ok=True)
    saved = [Path(f) for f in tokenizer.save_pretrained(directory) if Path(f).is_file()]
    if all((base / f.name).is_file() and filecmp.cmp(f, base / f.name, shallow=False) for f in saved):
        for f in saved:  # the base's own tokenizer files: `load_tokenizer` reads them there
            f.unlink()
    write_chain(directory, final_dir, base, parents)


def chain_files(chain: AdapterChain) -> list[Path]:
    """Every file the chain's weights depend on: the base's config and safetensors, each adapter's files."""
    files = [chain.base / "config.json", *sorted(chain.base.glob("*.safetensors"))]
    for a in chain.adapters:
        files += [a / ADAPTER_CONFIG, a / ADAPTER_WEIGHTS] + (
            [a / CHAIN_FILE] if (a / CHAIN_FILE).is_file() else []
        )
    return files


def chain_fingerprint(base_fingerprint: str, chain: AdapterChain) -> str:
    """sha256 of the chain's content: the base's fingerprint and every adapter's, in order."""
    h = hashlib.sha256(b"sacpo-adapter-chain-v1\n")
    h.update(base_fingerprint.encode())
    for a in chain.adapters:
        h.update(adapter_fingerprint(a).encode())
    return h.hexdigest()


def task_types(chain: AdapterChain) -> list[str | None]:
    """peft task_type of every adapter of the chain (CAUSAL_LM for policies, SEQ_CLS for reward models)."""
    return [adapter_config(a).get("task_type") for a in chain.adapters]


def apply_chain(model: Any, adapters: tuple[Path, ...]) -> Any:
    """Merge the adapters into `model` one after the other (peft: load, merge_and_unload); returns the plain model.

    A causal-LM adapter applied to another head (a reward model on a LoRA policy's backbone) is loaded without its
    task type: only its LoRA modules are used, which are the backbone's. peft initialises each adapter from torch's
    global RNG before loading its weights: those draws are undone (`torch_untouched`), so loading a model does not
    change what a seeded caller draws next (a stage's fresh LoRA initialisation).

    Plain LoRA chains (`sacpo.models.lora_factors`) skip peft: their updates are added to the weights directly,
    with peft's own operations (the same weights, bit for bit; ~1 s less per adapter on SmolLM2-135M)."""
    from sacpo.math.merging import MergeError
    from sacpo.models.lora_factors import merge_into, read_lora

    try:
        return merge_into(model, [read_lora(a) for a in adapters])
    except MergeError:
        pass  # not plain LoRA, or modules the model lacks: peft decides (model unchanged)
    from peft import PeftConfig, PeftModel

    causal = hasattr(model, "prepare_inputs_for_generation")
    for a in adapters:
        config = PeftConfig.from_pretrained(str(a))
        if config.task_type == "CAUSAL_LM" and not causal:
            config.task_type = None
        try:
            with torch_untouched():
                model = PeftModel.from_pretrained(model, str(a), config=config, is_trainable=False)
            model = model.merge_and_unload()
        except Exception as e:
            raise ModelLoadError(f"{a}: cannot apply the adapter: {type(e).__name__}: {e}") from e
    return model
