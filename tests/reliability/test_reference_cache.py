"""The reference log-prob cache is keyed on everything the log-probs depend on — reference weights and config,
data, tokenizer, max_length, length-averaging — and a corrupt cache file (unreadable, truncated, wrong key, wrong
shape, non-finite, or a flipped bit in the tensor data) is detected and rebuilt, never used."""

import json
import shutil

import pytest
import torch
from reliability_helpers import copy_model
from safetensors import safe_open
from safetensors.torch import save_file

from sacpo.data.loaders import load_examples
from sacpo.data.tokenize import encode_paired
from sacpo.models.load import load_tokenizer
from sacpo.train import ref_cache
from sacpo.train.ref_cache import reference_logps


@pytest.fixture
def setup(tiny_model, pku_tiny, tmp_path):
    tok = load_tokenizer(tiny_model)
    examples = load_examples(str(pku_tiny), "pku_helpful")
    pairs = encode_paired(tok, examples, 80, 40)
    cache = tmp_path / "cache"
    first = reference_logps(tiny_model, tok, pairs, cache, 80, show_progress=False)
    assert first.computed
    return {"tok": tok, "examples": examples, "pairs": pairs, "cache": cache, "first": first}


def _again(model, s, max_length=80, average=False):
    return reference_logps(model, s["tok"], s["pairs"], s["cache"], max_length, average, show_progress=False)


def test_unchanged_inputs_hit_the_cache_without_loading_the_model(tiny_model, setup, monkeypatch):
    monkeypatch.setattr(ref_cache, "load_model", lambda *a, **k: pytest.fail("the reference was loaded"))
    hit = _again(tiny_model, setup)
    assert not hit.computed and hit.path == setup["first"].path
    assert torch.equal(hit.logps, setup["first"].logps)


def _edit_weights(sd):
    sd["transformer.h.0.mlp.c_fc.bias"][0] += 1e-3


def _edit_config(d):
    config = json.loads((d / "config.json").read_text())
    config["layer_norm_epsilon"] = 1e-4
    (d / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change",
    ["reference weights", "reference config", "data", "tokenizer", "max_length", "averaging"],
)
def test_any_input_change_misses_the_cache(tiny_model, tmp_path, setup, change):
    s, model, kw = dict(setup), tiny_model, {}
    if change == "reference weights":
        model = copy_model(tiny_model, tmp_path / "m", _edit_weights)
    elif change == "reference config":
        model = copy_model(tiny_model, tmp_path / "m")
        _edit_config(model)
    elif change == "data":
        ex = list(s["examples"])
        ex[5] = type(ex[5])(ex[5].prompt, ex[5].chosen + " Really.", ex[5].rejected)
        s["pairs"] = encode_paired(s["tok"], ex, 80, 40)
    elif change == "tokenizer":  # another tokenizer that gives the same ids for this data
        d = copy_model(tiny_model, tmp_path / "t")
        tok = json.loads((d / "tokenizer.json").read_text())
        tok["added_tokens"].append({**tok["added_tokens"][0], "id": 257, "content": "<|extra|>"})
        (d / "tokenizer.json").write_text(json.dumps(tok))
        s["tok"] = load_tokenizer(d)
        assert encode_paired(s["tok"], s["examples"], 80, 40) == s["pairs"]
    elif change == "max_length":  # the same encoded pairs, only the setting differs
        kw = {"max_length": 200}
    elif change == "averaging":
        kw = {"average": True}
    miss = _again(model, s, **kw)
    assert miss.computed and miss.path != setup["first"].path
    if change in ("tokenizer", "max_length"):  # same ids, same model: the same values under another key
        torch.testing.assert_close(miss.logps, setup["first"].logps)
    assert not _again(model, s, **kw).computed  # and the new entry is reused


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-7])


def _garbage(p):
    p.write_bytes(b"not a safetensors file at all")


def _empty(p):
    p.write_bytes(b"")


def _rewrite(p, logps=None, **meta_change):
    with safe_open(str(p), framework="pt") as f:
        meta, t = dict(f.metadata()), f.get_tensor("logps")
    meta.update(meta_change)
    save_file({"logps": t if logps is None else logps(t)}, str(p), metadata=meta)


def _flip_bit(p):
    """One flipped bit in the tensor data: the file still parses, key and shape match."""
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x10
    p.write_bytes(bytes(data))


def _nan_with_valid_checksum(p):
    with safe_open(str(p), framework="pt") as f:
        meta, t = dict(f.metadata()), f.get_tensor("logps")
    t[3, 1] = float("nan")
    meta["sha256"] = ref_cache._checksum(t)
    save_file({"logps": t}, str(p), metadata=meta)


CORRUPTIONS = {
    "truncated": _truncate,
    "garbage": _garbage,
    "empty": _empty,
    "flipped bit": _flip_bit,
    "wrong key": lambda p: _rewrite(p, key="0" * 64),
    "no checksum": lambda p: _rewrite(p, sha256=""),
    "wrong shape": lambda p: _rewrite(p, lambda t: t[:-1]),
    "wrong dtype": lambda p: _rewrite(p, lambda t: t.double()),
    "NaN (valid checksum)": _nan_with_valid_checksum,
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_cache_file_is_detected_and_rebuilt(tiny_model, setup, corruption, caplog):
    path = setup["first"].path
    CORRUPTIONS[corruption](path)
    rebuilt = _again(tiny_model, setup)
    assert rebuilt.computed and rebuilt.path == path
    assert torch.equal(rebuilt.logps, setup["first"].logps)
    assert any("recomputing" in r.getMessage() for r in caplog.records)
    assert not _again(tiny_model, setup).computed  # the rebuilt file is valid


def test_a_missing_cache_directory_is_created(tiny_model, setup, tmp_path):
    shutil.rmtree(setup["cache"])
    assert _again(tiny_model, setup).computed and setup["first"].path.is_file()
