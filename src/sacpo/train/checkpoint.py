"""Run directories: checkpoints for --resume, the final HF model written atomically, the DONE marker.

<output_dir>/
    config.yaml       resolved config
    metrics.jsonl     one JSON record per logged step
    checkpoints/step-N/   the training state, as safetensors + JSON only (sacpo.train.state; no pickle):
        model.safetensors           trainable parameters and buffers of the (unwrapped) policy
        optimizer.{safetensors,json}  AdamW moments and steps | param_groups and the structure
        custom-0.{safetensors,json}   the LR scheduler (registered with accelerator.register_for_checkpointing)
        rng-<rank>.{safetensors,json} torch CPU/CUDA RNG states | Python and NumPy RNG states, per process
        metrics-pending-<rank>.json   metric values logged since the last metrics.jsonl record
        step.json                     the step and the run's settings, written last
    model/            final policy, HF format (safetensors, in the config's `dtype`), with its tokenizer; with LoRA
                      and lora.save=adapter (the default) only the adapter (peft format + sacpo_adapter.json,
                      sacpo.models.adapters)
    adapter/          LoRA adapter (lora.save=both only)
    summary.json      steps, reference pass, seconds, final metrics
    DONE              written last (atomically): a directory without it is unfinished and is redone by the
                      pipeline

Resuming restores the weights, optimizer, scheduler, RNG states, the data position (the step) and the metrics not
yet logged, and cuts metrics.jsonl back to the checkpoint's step, so a resumed run writes the same weights and the
same metrics.jsonl as an uninterrupted one. A checkpoint records the run's settings; resuming with different
ones is refused. Only .safetensors and .json files are read: a checkpoint directory holding a pickle-based file
(.pkl, .bin, .pt, ...; accelerate's save_state wrote such files in earlier versions) is refused before anything in
it is loaded. The main process writes the model, optimizer and scheduler (identical on every process under DDP);
each process writes its own RNG state and pending metrics. Under FSDP2 each process writes its own shards of the
model and optimizer instead (model-rank<r>, optimizer-rank<r>, plus sharding.json: sacpo.train.sharded_state),
and a checkpoint resumes only with the same number of processes. DeepSpeed states are not supported.

The final model/ is always a full model: under FSDP / DeepSpeed every process takes part in gathering the
full state dict, and the main process saves it through a plain copy of the policy (`save_final`).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sacpo.config import ConfigError
from sacpo.fsutil import atomic_save_file, atomic_write_json, atomic_write_text, replace_dir
from sacpo.models.adapters import ADAPTER_WEIGHTS, is_adapter_dir, save_adapter
from sacpo.models.dtypes import save_pretrained_as
from sacpo.train.sharded_state import check_layout, load_fsdp2, save_fsdp2
from sacpo.train.sharding import is_fsdp2, is_sharded, plain_loads
from sacpo.train.state import (
    load_model_state,
    load_tensors,
    load_tree,
    model_state,
    read_json,
    refuse_pickles,
    rng_state,
    save_tree,
    set_rng_state,
)

DONE = "DONE"
DONE_TEXT = "ok\n"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf: the stage stops, earlier checkpoints stay."""


def begin_run(out: Path, keep_checkpoints: bool) -> None:
    """Start (or restart) a run directory: clear outputs of a previous attempt; keep checkpoints on resume."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (DONE, "summary.json", "model", "adapter", "model.tmp", "adapter.tmp"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if not keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        (out / METRICS).unlink(missing_ok=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (one that has step.json), or None."""
    root = out / CHECKPOINTS
    done = [p for p in root.glob("step-*") if (p / "step.json").is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _pending_file(path: Path, rank: int) -> Path:
    return path / f"metrics-pending-{rank}.json"


def save(
    acc: Any, out: Path, step: int, keep: int = 2, run: dict | None = None, pending: dict | None = None
) -> None:
    """Save the training state to checkpoints/step-N (step.json last, so a partial save is ignored).

    `run`: the settings the trajectory depends on (checked on resume); `pending`: this process's metric values
    not yet written to metrics.jsonl (lists of floats per key)."""
    _check_supported(acc)
    path = out / CHECKPOINTS / f"step-{step}"
    if acc.is_main_process:
        shutil.rmtree(path, ignore_errors=True)  # a leftover of an interrupted save of the same step
        path.mkdir(parents=True)
    acc.wait_for_everyone()
    _save_state(acc, path)
    atomic_write_json(_pending_file(path, acc.process_index), pending or {})
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(path / "step.json", {"step": step, "run": run, "accelerator_step": acc.step})
        ckpts = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _name(kind: str, i: int) -> str:
    return kind if i == 0 else f"{kind}-{i}"


def _save_state(acc: Any, path: Path) -> None:
    """What accelerate's save_state kept, without pickle: the prepared models (main process), optimizers,
    schedulers, gradient scaler and registered objects (main process; the same on every process under DDP),
    and this process's RNG states. FSDP2: every process writes its model and optimizer shards."""
    fsdp2 = is_fsdp2(acc)
    if fsdp2:
        save_fsdp2(acc, path, _name)
    if acc.is_main_process:
        for i, model in enumerate([] if fsdp2 else acc._models):
            tensors = {k: v.cpu().contiguous() for k, v in model_state(acc.unwrap_model(model)).items()}
            atomic_save_file(tensors, path / f"{_name('model', i)}.safetensors")
        for i, opt in enumerate([] if fsdp2 else acc._optimizers):
            save_tree(path, _name("optimizer", i), opt.state_dict())
        for i, sched in enumerate(acc._schedulers):
            save_tree(path, _name("scheduler", i), sched.state_dict())
        if acc.scaler is not None:
            save_tree(path, "scaler", acc.scaler.state_dict())
        for i, obj in enumerate(acc._custom_objects):
            save_tree(path, f"custom-{i}", obj.state_dict())
    save_tree(path, f"rng-{acc.process_index}", rng_state())


def _load_state(acc: Any, path: Path) -> None:
    """Load what `_save_state` wrote into the prepared objects (on every process); ConfigError when the
    checkpoint's layout (FSDP2 shards of P processes, or unsharded) is not this run's."""
    fsdp2 = is_fsdp2(acc)
    check_layout(path, fsdp2, acc.num_processes)
    if fsdp2:
        load_fsdp2(acc, path, _name)
    for i, model in enumerate([] if fsdp2 else acc._models):
        tensors = load_tensors(path / f"{_name('model', i)}.safetensors")
        load_model_state(acc.unwrap_model(model), tensors, path)
    for i, opt in enumerate([] if fsdp2 else acc._optimizers):
        opt.load_state_dict(load_tree(path, _name("optimizer", i)))
    for i, sched in enumerate(acc._schedulers):
        sched.load_state_dict(load_tree(path, _name("scheduler", i)))
    if acc.scaler is not None:
        acc.scaler.load_state_dict(load_tree(path, "scaler"))
    for i, obj in enumerate(acc._custom_objects):
        obj.load_state_dict(load_tree(path, f"custom-{i}"))
    set_rng_state(load_tree(path, f"rng-{acc.process_index}"))


def _check_supported(acc: Any) -> None:
    """Checkpoints hold full states (single process, DDP) or FSDP2 shards; no prepared dataloaders (the loop's
    data order is a function of the step, not a sampler state)."""
    from accelerate.utils import DistributedType

    unsupported = (
        DistributedType.FSDP,
        DistributedType.DEEPSPEED,
        DistributedType.MEGATRON_LM,
        DistributedType.XLA,
    )
    if acc.distributed_type in unsupported and not is_fsdp2(acc):
        raise ConfigError(
            "checkpoints (save_every, --resume) support single-process, DDP and FSDP2 runs, not "
            f"{acc.distributed_type}"
        )
    if acc._dataloaders:
        raise RuntimeError("checkpoints do not save dataloader states; the training loop prepares none")


@dataclass(frozen=True)
class Restored:
    step: int
    pending: dict[str, list[float]]  # this process's metric values not yet logged at that step


def restore(acc: Any, out: Path, run: dict | None = None) -> Restored:
    """Load the newest checkpoint (step 0 when there is none) and cut metrics.jsonl back to its step.

    Raises ConfigError when the checkpoint was written with different `run` settings, holds a pickle-based file,
    or is damaged."""
    path = latest_checkpoint(out)
    if path is not None:
        refuse_pickles(path)  # before anything in it is read
    meta = read_json(path / "step.json") if path is not None else {"step": 0}
    saved = meta.get("run")
    if run is not None and saved is not None and saved != run:
        diff = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        details = "; ".join(f"{k}: {saved.get(k)!r} → {run.get(k)!r}" for k in diff[:5])
        raise ConfigError(
            f"cannot resume from {path}: it was written with different settings ({details}). "
            "Resume with the original settings, or start over without --resume."
        )
    pending: dict[str, list[float]] = {}
    if path is not None:
        _check_supported(acc)
        _load_state(acc, path)
        acc.step = int(meta.get("accelerator_step", 0))
        pfile = _pending_file(path, acc.process_index)
        pending = read_json(pfile) if pfile.is_file() else {}
    acc.wait_for_everyone()
    if acc.is_main_process:
        truncate_metrics(out / METRICS, meta["step"])
    acc.wait_for_everyone()
    return Restored(int(meta["step"]), pending)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (dropping later ones and a line cut short by a crash), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def check_finite(value: torch.Tensor, step: int, out: Path, what: str = "loss") -> None:
    """Stop with a clear message on NaN/inf, pointing at the last good checkpoint."""
    finite = torch.isfinite(value)
    if not finite.all():
        last = latest_checkpoint(out)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (set save_every)"
        first_bad = value[~finite].flatten()[0].item()
        raise NonFiniteError(
            f"{what} is {first_bad} at step {step + 1}; stopping — {where}. Lower lr or beta, or check the data."
        )


def check_weights_finite(acc: Any, params: list[torch.Tensor], step: int, out: Path) -> None:
    """Refuse to save non-finite weights (a checkpoint must stay a good one); collective over processes."""
    # this process's values: a ZeRO-3 partition lives in `ds_tensor` and the parameter itself is empty
    local = [t.detach() for t in (getattr(p, "ds_tensor", p) for p in params) if t.numel()]
    with torch.no_grad():  # max |w| per tensor (one fused pass; inf or NaN iff the tensor has one)
        norms = torch.stack(torch._foreach_norm(local, math.inf)) if local else None
        bad = int((~torch.isfinite(norms)).sum()) if norms is not None else 0
    bad_total = acc.reduce(torch.tensor([bad], device=acc.device), reduction="sum").item()
    if bad_total:
        last = latest_checkpoint(out)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
        raise NonFiniteError(
            f"weights are non-finite after step {step} ({bad_total} tensors); not saving them — {where}. "
            "Lower lr."
        )


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def save_final(
    acc: Any,
    model: Any,
    tokenizer: Any,
    out: Path,
    lora_save: str | None = None,
    policy: str | Path = "",
    dtype: torch.dtype = torch.float32,
    build: Callable[[], Any] | None = None,
) -> Path:
    """Write the trained policy to model/ and return that directory.

    Under FSDP / DeepSpeed the prepared model holds shards: every process takes part in gathering the full state
    dict (`acc.get_state_dict`, a collective) and the main process loads it into a plain copy made by `build`
    (the stage's policy builder: same architecture and LoRA wrapping), which the paths below save unchanged.

    lora_save (a LoRA run's `lora.save`; None for full fine-tuning): "adapter" writes only the adapter to model/ (peft
    format, the tokenizer, and `sacpo_adapter.json` naming the base and the adapters below it — those of `policy`,
    the stage's starting model, when that is itself an adapter; `sacpo.models.adapters`); "merged" writes the dense
    model with the adapter merged in; "both" writes the dense model to model/ and the adapter to adapter/. A dense
    model/ is saved in `dtype`; an adapter keeps the dtype it was trained in."""
    model_dir = out / "model"
    acc.wait_for_everyone()
    full = _gather_full(acc, model, build) if is_sharded(acc) else None
    if acc.is_main_process:
        unwrapped = full if full is not None else acc.unwrap_model(model)
        if lora_save in ("adapter", "both"):
            _save_adapter(
                unwrapped, tokenizer, model_dir if lora_save == "adapter" else out / "adapter", policy
            )
        if lora_save != "adapter":
            dense = copy.deepcopy(unwrapped).merge_and_unload() if lora_save else unwrapped
            _save_dense(dense, tokenizer, model_dir, dtype)
    acc.wait_for_everyone()
    return model_dir


def _gather_full(acc: Any, model: Any, build: Callable[[], Any] | None) -> Any:
    """A plain (unsharded) copy of the sharded `model` on the main process, None elsewhere; all processes call."""
    if build is None:
        raise ValueError("save_final of a sharded (FSDP / DeepSpeed) model needs `build`, the policy builder")
    state = acc.get_state_dict(model)  # collective; the full tensors (on CPU) land on the main process
    if not acc.is_main_process:
        return None
    with plain_loads(acc):
        plain = build()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or set(missing) - _tied_names(plain):
        raise RuntimeError(
            f"the gathered state dict does not fit the policy (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return plain


def _tied_names(model: Any) -> set[str]:
    """State-dict names of tensors that share their storage with an earlier name (GPT-2's lm_head / wte)."""
    seen: set[int] = set()
    tied = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied.add(name)
        seen.add(id(t))
    return tied


def _save_adapter(peft_model: Any, tokenizer: Any, final: Path, policy: str | Path) -> None:
    """The adapter, stacked on `policy`'s chain (its base, and its adapters if it is an adapter directory)."""
    tmp = _atomic_dir(final)
    tmp.mkdir(parents=True)
    save_adapter(peft_model, tokenizer, tmp, final, policy)
    replace_dir(tmp, final)


def _save_dense(model: Any, tokenizer: Any, final: Path, dtype: torch.dtype) -> None:
    """The dense policy in HF format with its weights in `dtype` (the live model keeps its float32 weights)."""
    use_cache, model.config.use_cache = model.config.use_cache, True  # saved for inference
    tmp = _atomic_dir(final)
    try:
        save_pretrained_as(model, tmp, dtype)
    finally:  # the live model (a sweep workspace trains it again) keeps its training setting
        model.config.use_cache = use_cache
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, final)


def finish(out: Path, summary: dict) -> None:
    """summary.json, then the DONE marker: from here on the directory counts as finished."""
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / DONE, DONE_TEXT)


def is_finished(out: Path) -> bool:
    """DONE holds its text, summary.json parses, and model/ has a config and safetensors weights (a full model) or
    an adapter config and safetensors adapter weights (an adapter-only output)."""
    try:
        if (out / DONE).read_text() != DONE_TEXT:
            return False
        json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    model = out / "model"
    if is_adapter_dir(model):
        return (model / ADAPTER_WEIGHTS).is_file()
    return (model / "config.json").is_file() and any(model.glob("*.safetensors"))
