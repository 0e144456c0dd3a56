"""Training state without pickle: state trees ↔ JSON + safetensors, RNG states, the pickle refusal.

A state tree is what `state_dict()` methods return: nested dicts, lists and tuples of None, bools, ints, floats,
strings and tensors. `save_tree(dir, name, tree)` writes the tensors to `<name>.safetensors` and the rest to
`<name>.json`, where each tensor is `{"$tensor": key}`, a tuple `{"$tuple": [...]}` and a dict whose keys are not
all plain strings (an optimizer's `state` is keyed by parameter index) `{"$items": [[key, value], ...]}`.
`load_tree` reads them back with `json.loads` and `safetensors.torch.load_file`: no file is ever unpickled, so a
checkpoint cannot run code when it is loaded. Floats round-trip exactly (JSON holds their shortest repr).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sacpo.config import ConfigError
from sacpo.fsutil import atomic_save_file, atomic_write_json

PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
_TENSOR, _TUPLE, _ITEMS = "$tensor", "$tuple", "$items"


def refuse_pickles(path: Path) -> None:
    """Raise ConfigError when the checkpoint directory `path` holds a pickle-based file (before anything is read)."""
    for f in sorted(path.rglob("*")):
        if f.suffix.lower() in PICKLE_SUFFIXES:
            raise ConfigError(
                f"cannot resume from {path}: it holds {f.relative_to(path)}, a pickle-based file ({f.suffix}), "
                "and unpickling a file can execute arbitrary code, so sacpo never loads one. Checkpoints written "
                "by earlier sacpo versions (accelerate's save_state: random_states_0.pkl, optimizer.bin, "
                "custom_checkpoint_0.pkl) have such files: start the stage over without --resume."
            )


def save_tree(directory: Path, name: str, tree: Any) -> None:
    """Write `tree` as `<name>.safetensors` (its tensors, on CPU) and then `<name>.json` (everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors, set(), name)
    atomic_save_file(tensors, directory / f"{name}.safetensors")
    atomic_write_json(directory / f"{name}.json", encoded)


def load_tree(directory: Path, name: str) -> Any:
    """The tree `save_tree(directory, name, ...)` wrote; ConfigError when its files are missing or damaged."""
    encoded = read_json(directory / f"{name}.json")
    return _decode(encoded, load_tensors(directory / f"{name}.safetensors"))


def read_json(path: Path) -> Any:
    """json.loads of a checkpoint file; ConfigError when it is missing or not JSON."""
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot resume: checkpoint file {path} is missing or damaged ({e})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file (CPU); ConfigError when the file is missing or not a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ConfigError(
            f"cannot resume: checkpoint file {path} is missing or not a safetensors file ({e})"
        ) from None


def _encode(x: Any, tensors: dict[str, torch.Tensor], storages: set, at: str) -> Any:
    if isinstance(x, torch.Tensor):
        if at in tensors:
            raise ValueError(f"two tensors of a checkpoint state are both named {at!r}")
        t = x.detach().cpu()
        ptr = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if not t.is_contiguous() or (t.numel() and ptr in storages):  # safetensors stores no shared memory
            t = t.clone(memory_format=torch.contiguous_format)
        storages.add(ptr)
        tensors[at] = t
        return {_TENSOR: at}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, tuple):
        return {_TUPLE: [_encode(v, tensors, storages, f"{at}.{i}") for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode(v, tensors, storages, f"{at}.{i}") for i, v in enumerate(x)]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _encode(v, tensors, storages, f"{at}.{k}") for k, v in x.items()}
        return {
            _ITEMS: [
                [_encode(k, tensors, storages, f"{at}.key{i}"), _encode(v, tensors, storages, f"{at}.{k}")]
                for i, (k, v) in enumerate(x.items())
            ]
        }
    raise TypeError(
        f"cannot store a {type(x).__name__} at {at} in a checkpoint: only numbers, strings, None, lists, tuples, "
        "dicts and tensors are stored (no pickle)"
    )


def _decode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    if set(x) == {_TENSOR}:
        if x[_TENSOR] not in tensors:
            raise ConfigError(f"cannot resume: the checkpoint's tensor {x[_TENSOR]!r} is missing")
        return tensors[x[_TENSOR]]
    if set(x) == {_TUPLE}:
        return tuple(_decode(v, tensors) for v in x[_TUPLE])
    if set(x) == {_ITEMS}:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in x[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in x.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        raise ConfigError(f"cannot resume: a checkpoint state has a list as a dict key ({key!r})")
    return key


# ------------------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """This process's global RNG states: Python `random`, NumPy's legacy global generator, torch CPU and (when
    available) every CUDA device — what accelerate's save_state kept in random_states_<rank>.pkl."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],  # keys: (624,) uint32
        "torch": torch.get_rng_state(),  # (5056,) uint8
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one (N,) uint8 per device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (the CUDA states only where CUDA is available)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- model state
def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes: the trainable parameters and the persistent buffers, by state_dict name.

    Frozen parameters (a LoRA run's base weights) are rebuilt identically from the policy on resume and are not
    stored; a parameter tied under two names (GPT-2's wte / lm_head) is stored once, under its first name."""
    seen: set[int] = set()
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    state = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in frozen or id(t) in seen:
            continue
        seen.add(id(t))
        state[name] = t.detach()
    return state


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy `tensors` (from `model_state` of the same architecture) into `model`, in place; ConfigError when
    the names, shapes or dtypes differ."""
    live = model_state(model)
    if set(live) != set(tensors):
        missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
        raise ConfigError(
            f"cannot resume from {where}: its model state does not match the model "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    with torch.no_grad():
        for name, target in live.items():
            saved = tensors[name]
            if saved.shape != target.shape or saved.dtype != target.dtype:
                raise ConfigError(
                    f"cannot resume from {where}: {name} is {saved.dtype} {tuple(saved.shape)} in the checkpoint "
                    f"but {target.dtype} {tuple(target.shape)} in the model"
                )
            target.copy_(saved)
