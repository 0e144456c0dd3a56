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


@pytest.fixture(scope="module")
def two_bf16(two_models, tmp_path_factory):
    from sacpo.models.convert import import_model

    root = tmp_path_factory.mktemp("bf16")
    return tuple(import_model(m, root / m.name, dtype="bf16") for m in two_models)


def test_merge_keeps_the_dtype_and_can_change_it(two_bf16, tmp_path):
    """bf16 inputs: auto → bf16 output (lerp in float32, one rounding); dtype=float32 → float32 with the
    unrounded interpolation, config.json saying so."""
    import json

    from sacpo.models.dtypes import checkpoint_dtype

    a, b = two_bf16
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    kept = merge_dirs(a, b, 0.3, tmp_path / "auto")
    wide = merge_dirs(a, b, 0.3, tmp_path / "fp32", dtype=torch.float32)
    tk, tw = load_file(kept / "model.safetensors"), load_file(wide / "model.safetensors")
    for k in ta:
        exact = torch.lerp(ta[k].float(), tb[k].float(), 0.3)
        assert tk[k].dtype == torch.bfloat16 and torch.equal(tk[k], exact.to(torch.bfloat16))
        assert tw[k].dtype == torch.float32 and torch.equal(tw[k], exact)
    assert (kept / "config.json").read_bytes() == (a / "config.json").read_bytes()
    assert json.loads((wide / "config.json").read_text())["dtype"] == "float32"
    assert checkpoint_dtype(kept) == torch.bfloat16 and checkpoint_dtype(wide) == torch.float32
    assert json.loads((wide / "merge.json").read_text())["dtype"] == "float32"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(kept, dtype="auto").dtype == torch.bfloat16


def test_the_merge_command_takes_a_dtype(two_bf16, tmp_path):
    from sacpo.cli import main

    a, b = two_bf16
    args = [f"a={a}", f"b={b}", f"output_dir={tmp_path / 'out'}", "qs=[0.5]", "dtype=fp16"]
    assert main(["-q", "merge", *args]) == 0  # no config file: the overrides give every field
    merged = load_file(tmp_path / "out" / "q0.5" / "model.safetensors")
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {torch.float16}
