"""Seeding a stage without touching the caller's random state."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with accelerate's `set_seed(seed)` (python, numpy, torch and every CUDA device's global RNG),
    then give the caller back the states it had: the same numbers as seeding globally, no effect outside.

    A resumed run restores its checkpoint's RNG states inside the block; those are undone on exit too."""
    from accelerate.utils import set_seed

    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            set_seed(seed)
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
