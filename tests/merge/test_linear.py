"""Merging model directories: exact interpolation, refusal of incompatible models."""

import pytest
import torch
from safetensors.torch import load_file

from sacpo.math.merging import MergeError
from sacpo.merge.linear import merge_dirs
from sacpo.models.tiny import build_tiny_gpt2


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    return build_tiny_gpt2(root / "a", seed=1), build_tiny_gpt2(root / "b", seed=2)


@pytest.mark.parametrize("q", [0.0, 0.3, 1.0])
def test_merge_interpolates_every_tensor(two_models, tmp_path, q):
    a, b = two_models
    out = merge_dirs(a, b, q, tmp_path / "m")
    ta, tb, tm = (load_file(p / "model.safetensors") for p in (a, b, out))
    assert set(tm) == set(ta)
    for k in ta:
        torch.testing.assert_close(tm[k], (1 - q) * ta[k] + q * tb[k], rtol=1e-6, atol=1e-7)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert not (tmp_path / "m.tmp").exists()


def test_merge_refuses_different_architecture(two_models, tmp_path):
    a, _ = two_models
    wide = build_tiny_gpt2(tmp_path / "wide", n_embd=32)
    with pytest.raises(MergeError, match=r"different configs.*n_embd"):
        merge_dirs(a, wide, 0.5, tmp_path / "m")


def test_merge_refuses_different_tokenizer(two_models, tmp_path):
    a, b = two_models
    import shutil

    c = tmp_path / "c"
    shutil.copytree(b, c)
    (c / "tokenizer_config.json").write_text((c / "tokenizer_config.json").read_text().replace("1024", "512"))
    with pytest.raises(MergeError, match="different tokenizers"):
        merge_dirs(a, c, 0.5, tmp_path / "m")


def test_merge_refuses_pickle_only_model(two_models, tmp_path):
    a, _ = two_models
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((a / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"not really")
    from sacpo.models.load import ModelLoadError

    with pytest.raises(ModelLoadError, match="pickle"):
        merge_dirs(a, bad, 0.5, tmp_path / "m")
