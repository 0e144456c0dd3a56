"""FSDP2 training state in sacpo's pickle-free checkpoint format (safetensors + JSON, `sacpo.train.state`).

Under FSDP2 every parameter is a DTensor sharded over the processes, so each process writes its own shards:

    model-rank<r>.{safetensors,json}      this process's local shards (`DTensor.to_local()`) of the trainable
                                          parameters and buffers (`model_state`: a LoRA run stores its adapter)
    optimizer-rank<r>.{safetensors,json}  its local shards of AdamW's moments, param_groups, steps
    sharding.json                         {"kind": "fsdp2", "num_processes": P}, written by the main process

The scheduler (`custom-0`) and the RNG states are written as in a DDP checkpoint (`checkpoint._save_state`). A
checkpoint is resumed only with the same number of processes: the shards are not resharded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sacpo.config import ConfigError
from sacpo.fsutil import atomic_write_json
from sacpo.train.state import load_tree, model_state, read_json, save_tree

SHARDING = "sharding.json"


def _to_local(tree: Any) -> Any:
    """`tree` with every DTensor replaced by this process's local shard."""
    if hasattr(tree, "to_local"):
        return tree.to_local()
    if isinstance(tree, dict):
        return {k: _to_local(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_local(v) for v in tree)
    return tree


def save_fsdp2(acc: Any, path: Path, name: Any) -> None:
    """This process's model and optimizer shards into `path`; the main process adds sharding.json.
    `name(kind, i)`: the file stem of the i-th model / optimizer (checkpoint._name)."""
    r = acc.process_index
    for i, model in enumerate(acc._models):
        save_tree(path, f"{name('model', i)}-rank{r}", _to_local(model_state(model)))
    for i, opt in enumerate(acc._optimizers):
        save_tree(path, f"{name('optimizer', i)}-rank{r}", _to_local(opt.optimizer.state_dict()))
    if acc.is_main_process:
        atomic_write_json(path / SHARDING, {"kind": "fsdp2", "num_processes": acc.num_processes})


def check_layout(path: Path, fsdp2: bool, num_processes: int) -> None:
    """ConfigError unless the checkpoint at `path` was written by a run like this one: FSDP2 with the same number
    of processes, or unsharded (single process / DDP) when this run is."""
    meta = read_json(path / SHARDING) if (path / SHARDING).is_file() else None
    if meta is None and fsdp2:
        raise ConfigError(
            f"cannot resume from {path} under FSDP: it was written by an unsharded (single-process or DDP) run; "
            "resume it the way it was started"
        )
    if meta is not None and not fsdp2:
        raise ConfigError(
            f"cannot resume from {path}: it holds FSDP2 shards of {meta['num_processes']} processes; resume it "
            "with the same accelerate config and number of processes"
        )
    if meta is not None and meta["num_processes"] != num_processes:
        raise ConfigError(
            f"cannot resume from {path}: it holds FSDP2 shards of {meta['num_processes']} processes, but this run "
            f"has {num_processes}; resume with --num_processes {meta['num_processes']} (shards are not resharded)"
        )


def load_fsdp2(acc: Any, path: Path, name: Any) -> None:
    """Copy this process's shards into the prepared model (in place) and optimizer (moments re-wrapped as
    DTensors laid out like their parameters)."""
    from torch.distributed.tensor import DTensor

    r = acc.process_index
    with torch.no_grad():
        for i, model in enumerate(acc._models):
            saved, live = load_tree(path, f"{name('model', i)}-rank{r}"), model_state(model)
            if set(saved) != set(live):
                raise ConfigError(f"cannot resume from {path}: its model shards do not match the model")
            for k, t in live.items():
                local = t.to_local() if isinstance(t, DTensor) else t
                if saved[k].shape != local.shape:
                    raise ConfigError(
                        f"cannot resume from {path}: shard {k} is {tuple(saved[k].shape)}, the model's "
                        f"{tuple(local.shape)}"
                    )
                local.copy_(saved[k])
    for i, opt in enumerate(acc._optimizers):
        raw = opt.optimizer
        sd = load_tree(path, f"{name('optimizer', i)}-rank{r}")
        params = [p for g in raw.param_groups for p in g["params"]]
        for idx, st in sd["state"].items():
            p = params[idx]
            for k, v in st.items():
                if isinstance(p, DTensor) and v.dim() > 0:
                    st[k] = DTensor.from_local(
                        v.to(p.to_local().device),
                        p.device_mesh,
                        p.placements,
                        run_check=False,
                        shape=p.shape,
                        stride=p.stride(),
                    )
        raw.load_state_dict(sd)
