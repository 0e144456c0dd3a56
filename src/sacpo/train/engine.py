"""The training engine of the auxiliary trainers (reward/cost models, prefix scorers, the toyworld SFT).

One place for what every small training loop needs: AdamW with gradient clipping, the LR schedule, the NaN/Inf
stop, the precision set-up, seeding without touching the caller's global RNG, and the progress bar with a logged
loss history. The trainer supplies only `loss_fn(step) -> (loss, metrics)`: pick the batch, run the forward.

    stepper = Stepper(params, lr=1e-3, schedule=warmup_linear_decay(warmup, total), name="reward model")
    with seeded(seed):                                   # e.g. HF module init, which draws from the global RNG
        model = build(...)
    run = fit(stepper, total, loss_fn, desc="reward model", log_every=10, log_lr=True)
    run.history    # [{"step": 10, "lr": ..., "loss": mean over the window, ...}, ...] (metrics.json)
    run.values     # every step's metrics

Schedules are multipliers of the base LR, lr(s) = lr · f(s) at optimizer step s = 0, 1, … (`LambdaLR`), with w
warmup steps (w = 0: none) and n steps in all; the warmup is the same in all three, (s + 1) / w, so the first step
(s = 0) runs at lr / w, never at 0 (transformers' schedules start at s / w = 0, an update that does nothing):

    warmup_linear_decay(w, n):  f(s) = (s + 1) / w for s < w, then (n − s) / (n − w)    (> 0 for s < n)
    warmup_constant(w):         f(s) = (s + 1) / w for s < w, then 1
    warmup_cosine(w, n):        f(s) = (s + 1) / w for s < w, then ½ (1 + cos(π (s − w) / (n − w)))

The training loops log the LR each update actually used (read from the optimizer's param group just before
`optimizer.step()`), not the one the scheduler set for the next update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sacpo.train.checkpoint import NonFiniteError

Schedule = Callable[[int], float]
LossFn = Callable[[int], tuple[torch.Tensor, dict[str, float] | None]]  # step -> (loss, metrics to log)


# --------------------------------------------------------------------------------------------------- schedules
def _warmup(step: int, warmup: int) -> float | None:
    """(step + 1) / warmup during the warmup (step < warmup), else None."""
    return (step + 1) / warmup if step < warmup else None


def warmup_linear_decay(warmup: int, total: int) -> Schedule:
    """Linear warmup reaching the full LR at step warmup − 1, then linear decay towards 0 at `total`."""

    def f(step: int) -> float:
        w = _warmup(step, warmup)
        return w if w is not None else max(0.0, float(total - step) / float(max(1, total - warmup)))

    return f


def warmup_constant(warmup: int) -> Schedule:
    """Linear warmup reaching the full LR at step warmup − 1, constant after."""

    def f(step: int) -> float:
        w = _warmup(step, warmup)
        return w if w is not None else 1.0

    return f


def warmup_cosine(warmup: int, total: int) -> Schedule:
    """Linear warmup reaching the full LR at step warmup − 1, then cosine decay to 0 at `total`."""

    def f(step: int) -> float:
        w = _warmup(step, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return w if w is not None else 0.5 * (1 + math.cos(math.pi * progress))

    return f


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {
    "linear": warmup_linear_decay,
    "cosine": warmup_cosine,
    "constant": lambda warmup, total: warmup_constant(warmup),
}


# ---------------------------------------------------------------------------------------------------- stepper
class Stepper:
    """AdamW + `LambdaLR(schedule)`; `step(loss, i)` checks the loss, backpropagates, clips, steps, zeroes grads.

    A non-finite loss raises `NonFiniteError` ("<name>: loss is nan at step i+1; <hint>") before any update.
    `max_grad_norm` = 0 disables clipping.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float,
        schedule: Schedule,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        name: str = "training",
        hint: str = "lower lr",
    ) -> None:
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.max_grad_norm = max_grad_norm
        self.name, self.hint = name, hint

        self.applied_lr: float | None = None  # the LR the last update used (None before the first)

    @property
    def lr(self) -> float:
        """The LR of the next step (after `step`: the one the schedule set for the following update)."""
        return self.scheduler.get_last_lr()[0]

    def step(self, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteError(f"{self.name}: loss is {loss.item()} at step {step + 1}; {self.hint}")
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.applied_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------------- loop
@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one record per log_every steps (and last)
    values: list[dict[str, float]] = field(default_factory=list)  # every step's metrics


def fit(
    stepper: Stepper,
    steps: int,
    loss_fn: LossFn,
    desc: str,
    log_every: int,
    show_progress: bool = True,
    log_lr: bool = False,
    leave: bool = True,
) -> FitResult:
    """Run `steps` optimizer steps of `loss_fn(step) -> (loss, metrics)`.

    `metrics` (python floats; None means {"loss": loss.item()}) are averaged over each window of `log_every`
    steps (and the final, possibly shorter one) into `history` records {"step", ["lr",] **means}, `lr` being
    the LR the window's last update used; the progress bar shows the last record.
    """
    run = FitResult()
    window: list[dict[str, float]] = []
    bar = tqdm(total=steps, desc=desc, disable=not show_progress, leave=leave)
    for step in range(steps):
        loss, metrics = loss_fn(step)
        stepper.step(loss, step)
        metrics = {"loss": loss.item()} if metrics is None else metrics
        run.values.append(metrics)
        window.append(metrics)
        bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            means = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
            run.history.append({"step": step + 1, **({"lr": stepper.applied_lr} if log_lr else {}), **means})
            window.clear()
            bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
    bar.close()
    return run


# ---------------------------------------------------------------------------------------- precision / seeding
def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """ "auto" → "bf16" on a CUDA device that supports it, else "no"; any other setting as given."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def autocast(mixed_precision: str, device: torch.device) -> Any:
    """The forward's autocast context: "bf16" → bfloat16, "no" → off, "auto" → `resolve_precision`."""
    enabled = resolve_precision(mixed_precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
