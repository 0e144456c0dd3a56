"""sacpo.rng: a seeded block draws the numbers of seeding globally and leaves the caller's states as they were."""

import random

import numpy as np
import torch

from sacpo.rng import seeded, torch_seeded


def test_torch_seeded_draws_manual_seed_numbers_and_restores_the_callers_state():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with torch_seeded(5):
        got = torch.rand(3)
    assert torch.equal(got, want)  # the numbers of a plain torch.manual_seed(5)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched


def test_seeded_restores_python_numpy_and_torch():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    with seeded(9):
        inside = random.random(), np.random.rand(), torch.rand(1).item()
    with seeded(9):
        again = random.random(), np.random.rand(), torch.rand(1).item()
    assert inside == again
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])


def test_an_exception_inside_still_restores():
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    try:
        with torch_seeded(0):
            torch.rand(2)
            raise RuntimeError
    except RuntimeError:
        pass
    assert torch.equal(torch.random.get_rng_state(), before)
