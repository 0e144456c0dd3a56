"""Fixtures of the evaluation tests."""

import pytest
from eval_helpers import paper_results_list

from sacpo.evaluate.metrics import ModelMetrics


@pytest.fixture
def paper_results() -> list[ModelMetrics]:
    """Numbers with the SACPO paper's shape: every check_findings claim holds."""
    return paper_results_list()


@pytest.fixture(scope="session")
def other_model(tmp_path_factory):
    """A second tiny GPT-2 (another seed): same tokenizer as `tiny_model`, different weights."""
    from sacpo.models.tiny import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-other") / "gpt2", seed=1)
