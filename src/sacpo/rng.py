"""Seeded blocks that leave the caller's random state as it was: no library call reseeds a global RNG.

    with torch_seeded(0):          # torch's CPU and every CUDA device's global RNG seeded, restored on exit
        model = GPT2LMHeadModel(config)
    with seeded(0):                # python, numpy and torch (accelerate's set_seed), all restored on exit
        train_stage()
    with torch_untouched():        # torch's global RNG as it was on exit (draws inside are undone)
        model = PeftModel.from_pretrained(model, adapter_dir)

For upstream code that can only draw from the global RNG (HF module init, `sacpo.models.generate.sample`); our
own draws take an explicit `torch.Generator` instead. Inside the block the numbers are exactly those of seeding
globally.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def _cuda_devices() -> list[int]:
    """The CUDA devices whose RNG state a block must restore: those this process already uses. Reading another
    device's state would create a context there (every DDP rank on every GPU) and start CUDA in a CPU-only run.
    torch.manual_seed reseeds devices not yet initialised lazily, as a plain global seed would."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    return [torch.cuda.current_device()]


@contextlib.contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """`torch.manual_seed(seed)` for the block only (CPU and all CUDA devices forked and restored)."""
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def torch_untouched() -> Iterator[None]:
    """The block's draws from torch's global RNG (CPU and the CUDA device in use) are undone on exit: for upstream
    code that draws only to initialise what it then overwrites (peft initialises an adapter before loading it)."""
    with torch.random.fork_rng(devices=_cuda_devices()):
        yield


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """accelerate's `set_seed(seed)` (python, numpy, torch, CUDA) for the block only; the caller's states come
    back on exit. A resumed run restores its checkpoint's RNG states inside the block; those are undone too."""
    from accelerate.utils import set_seed

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=_cuda_devices()):
        try:
            set_seed(seed)
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
