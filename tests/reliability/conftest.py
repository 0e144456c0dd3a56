"""Fixtures of the reliability tests (helpers live in reliability_helpers.py)."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every reliability module runs with one intra-op thread (the fixture in tests/conftest.py)."""


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model is loaded or built (config errors must come first)."""
    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise AssertionError(f"a model was loaded: {a}")

    for target in (
        "sacpo.models.load.load_model",
        "sacpo.train.policy.load_model",
        "sacpo.train.heldout.load_model",
        "sacpo.train.ref_cache.load_model",
        "sacpo.train.loop.load_tokenizer",
        "sacpo.models.tiny.build_tiny_gpt2",
        "sacpo.merge.linear.read_source",
    ):
        monkeypatch.setattr(target, boom)
    return calls
