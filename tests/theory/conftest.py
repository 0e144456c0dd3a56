"""The theory tests run many tiny float64 tensor ops; one intra-op thread keeps them fast on a loaded machine."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
