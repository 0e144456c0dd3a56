"""Fixtures of the reliability tests (helpers live in reliability_helpers.py)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core runner OpenMP threads spin-wait for each other and the tiny
    models train ~10x slower (the results are the same either way). Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model is loaded or built (config errors must come first)."""
    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise AssertionError(f"a model was loaded: {a}")

    for target in (
        "sacpo.models.load.load_model",
        "sacpo.train.loop.load_model",
        "sacpo.train.ref_cache.load_model",
        "sacpo.train.loop.load_tokenizer",
        "sacpo.models.tiny.build_tiny_gpt2",
        "sacpo.merge.linear.read_state_dict",
    ):
        monkeypatch.setattr(target, boom)
    return calls
