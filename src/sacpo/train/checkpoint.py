"""Run directories: checkpoints for --resume, the final HF model written atomically, the DONE marker.

<output_dir>/
    config.yaml       resolved config
    metrics.jsonl     one JSON record per logged step
    checkpoints/step-N/   accelerate state (model, optimizer, scheduler, RNG) + step.json
    model/            final policy, HF format (safetensors), with its tokenizer
    adapter/          LoRA adapter (LoRA runs only)
    summary.json      steps, reference pass, seconds, final metrics
    DONE              written last: a directory without it is unfinished and is redone by the pipeline
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

DONE = "DONE"
CHECKPOINTS = "checkpoints"


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf: the stage stops, earlier checkpoints stay."""


def begin_run(out: Path, keep_checkpoints: bool) -> None:
    """Start (or restart) a run directory: clear outputs of a previous attempt; keep checkpoints on resume."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (DONE, "summary.json", "model", "adapter"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if not keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (one that has step.json), or None."""
    root = out / CHECKPOINTS
    done = [p for p in root.glob("step-*") if (p / "step.json").is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save(acc: Any, out: Path, step: int, keep: int = 2) -> None:
    """Save accelerate state to checkpoints/step-N (step.json last, so a partial save is ignored)."""
    path = out / CHECKPOINTS / f"step-{step}"
    acc.save_state(str(path))
    if acc.is_main_process:
        _write_json(path / "step.json", {"step": step})
        ckpts = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def restore(acc: Any, out: Path) -> int:
    """Load the newest checkpoint; return its step (0 when there is none)."""
    path = latest_checkpoint(out)
    if path is None:
        return 0
    acc.load_state(str(path))
    return int(json.loads((path / "step.json").read_text())["step"])


def check_finite(value: torch.Tensor, step: int, out: Path, what: str = "loss") -> None:
    """Stop with a clear message on NaN/inf, pointing at the last good checkpoint."""
    if not torch.isfinite(value).all():
        last = latest_checkpoint(out)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (set save_every)"
        raise NonFiniteError(
            f"{what} is {value.item() if value.numel() == 1 else 'non-finite'} at step {step + 1}; stopping — "
            f"{where}. Lower lr or beta, or check the data."
        )


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


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
            os.replace(tmp, out / "adapter")
            import copy

            unwrapped = copy.deepcopy(unwrapped).merge_and_unload()
        unwrapped.config.use_cache = True
        tmp = _atomic_dir(model_dir)
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
    acc.wait_for_everyone()
    return model_dir


def finish(out: Path, summary: dict) -> None:
    """summary.json, then the DONE marker: from here on the directory counts as finished."""
    _write_json(out / "summary.json", summary)
    (out / DONE).write_text("ok\n")
    with open(out / DONE, "rb+") as f:
        os.fsync(f.fileno())
