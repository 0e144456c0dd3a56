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


def test_the_merge_command_writes_config_metrics_and_one_model_per_q(two_models, tmp_path, capsys):
    import json

    import yaml

    from sacpo.cli import main

    a, b = two_models
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"a": str(a), "b": str(b), "output_dir": str(tmp_path / "out")}))
    assert main(["-q", "merge", str(cfg), "qs=[0.25,0.75]"]) == 0
    out = tmp_path / "out"
    assert yaml.safe_load((out / "config.yaml").read_text())["qs"] == [0.25, 0.75]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["q"] for r in records] == [0.25, 0.75] and all(r["seconds"] >= 0 for r in records)
    for r in records:
        merged = load_file(f"{r['model']}/model.safetensors")
        ta = load_file(a / "model.safetensors")
        tb = load_file(b / "model.safetensors")
        k = next(iter(ta))
        torch.testing.assert_close(merged[k], (1 - r["q"]) * ta[k] + r["q"] * tb[k], rtol=1e-6, atol=1e-7)


def test_merges_are_deterministic_and_not_redone(two_models, tmp_path):
    """Equal merges are equal bytes (caches key on the model's content hash); the same merge again rewrites
    nothing; another q or a changed source does."""
    import hashlib

    a, b = two_models

    def digest(d):
        return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()

    first, second = merge_dirs(a, b, 0.5, tmp_path / "x"), merge_dirs(a, b, 0.5, tmp_path / "y")
    assert digest(first) == digest(second)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    merge_dirs(a, b, 0.5, first)
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    merge_dirs(a, b, 0.25, first)
    assert digest(first) != digest(second)
