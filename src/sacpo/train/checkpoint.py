"""Run directories: checkpoints for --resume, the final HF model written atomically, the DONE marker.

<output_dir>/
    config.yaml       resolved config
    metrics.jsonl     one JSON record per logged step
    checkpoints/step-N/   accelerate state (model, optimizer, scheduler, RNG), metrics-pending-<rank>.json
                          (metric values logged since the last metrics.jsonl record) and step.json (last)
    model/            final policy, HF format (safetensors), with its tokenizer
    adapter/          LoRA adapter (LoRA runs only)
    summary.json      steps, reference pass, seconds, final metrics
    DONE              written last (atomically): a directory without it is unfinished and is redone by the
                      pipeline

Resuming restores the weights, optimizer, scheduler, RNG states, the data position (the step) and the metrics not
yet logged, and cuts metrics.jsonl back to the checkpoint's step, so a resumed run writes the same weights and the
same metrics.jsonl as an uninterrupted one. A checkpoint records the run's settings; resuming with different
ones is refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sacpo.config import ConfigError
from sacpo.fsutil import replace_dir

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
    """Save accelerate state to checkpoints/step-N (step.json last, so a partial save is ignored).

    `run`: the settings the trajectory depends on (checked on resume); `pending`: this process's metric values
    not yet written to metrics.jsonl (lists of floats per key)."""
    path = out / CHECKPOINTS / f"step-{step}"
    (path / "step.json").unlink(missing_ok=True)  # a leftover of an interrupted save of the same step
    acc.save_state(str(path))
    _write_json(_pending_file(path, acc.process_index), pending or {})
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_json(path / "step.json", {"step": step, "run": run})
        ckpts = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


@dataclass(frozen=True)
class Restored:
    step: int
    pending: dict[str, list[float]]  # this process's metric values not yet logged at that step


def restore(acc: Any, out: Path, run: dict | None = None) -> Restored:
    """Load the newest checkpoint (step 0 when there is none) and cut metrics.jsonl back to its step.

    Raises ConfigError when the checkpoint was written with different `run` settings."""
    path = latest_checkpoint(out)
    meta = json.loads((path / "step.json").read_text()) if path is not None else {"step": 0}
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
        acc.load_state(str(path))
        pfile = _pending_file(path, acc.process_index)
        pending = json.loads(pfile.read_text()) if pfile.is_file() else {}
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


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
    with torch.no_grad():  # max |w| per tensor (one fused pass; inf or NaN iff the tensor has one)
        norms = torch.stack(torch._foreach_norm([p.detach() for p in params], math.inf)) if params else None
        bad = int((~torch.isfinite(norms)).sum()) if norms is not None else 0
    bad_total = acc.reduce(torch.tensor([bad], device=acc.device), reduction="sum").item()
    if bad_total:
        last = latest_checkpoint(out)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
        raise NonFiniteError(
            f"weights are non-finite after step {step} ({bad_total} tensors); not saving them — {where}. "
            "Lower lr."
        )


def _write_text(path: Path, text: str) -> None:
    """Write atomically and durably: temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2))


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def save_final(acc: Any, model: Any, tokenizer: Any, out: Path, lora: bool) -> Path:
    """Write the policy in HF format to model/ (LoRA merged into dense weights; adapter also saved to adapter/)."""
    model_dir = out / "model"
    acc.wait_for_everyone()
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        if lora:
            tmp = _atomic_dir(out / "adapter")
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            replace_dir(tmp, out / "adapter")
            import copy

            unwrapped = copy.deepcopy(unwrapped).merge_and_unload()
        use_cache, unwrapped.config.use_cache = unwrapped.config.use_cache, True  # saved for inference
        tmp = _atomic_dir(model_dir)
        try:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
        finally:  # the live model (a sweep workspace trains it again) keeps its training setting
            unwrapped.config.use_cache = use_cache
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, model_dir)
    acc.wait_for_everyone()
    return model_dir


def finish(out: Path, summary: dict) -> None:
    """summary.json, then the DONE marker: from here on the directory counts as finished."""
    _write_json(out / "summary.json", summary)
    _write_text(out / DONE, DONE_TEXT)


def is_finished(out: Path) -> bool:
    """DONE holds its text, summary.json parses, and model/ has a config and safetensors weights."""
    try:
        if (out / DONE).read_text() != DONE_TEXT:
            return False
        json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    model = out / "model"
    return (model / "config.json").is_file() and any(model.glob("*.safetensors"))
