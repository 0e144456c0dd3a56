"""Model fingerprints are memoised per file state, and a rewrite is always seen."""

import os
import shutil
import time

import pytest

from sacpo.models import load
from sacpo.models.load import fingerprint_model


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = load.hash_files
    monkeypatch.setattr(load, "hash_files", lambda files: calls.append(1) or real(files))
    return calls


def _later(monkeypatch, seconds=60):
    """Pretend the files were written `seconds` ago (ctime cannot be set back, so move the clock)."""
    now = time.time_ns
    monkeypatch.setattr(load.time, "time_ns", lambda: now() + seconds * 1_000_000_000)


def _flip_last_byte(path, keep_mtime=False):
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size, other content
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_memoised_for_settled_files_and_rehashed_after_a_rewrite(tiny_model, tmp_path, monkeypatch, counted):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    _later(monkeypatch)
    first = fingerprint_model(model)
    assert fingerprint_model(model) == first and len(counted) == 1  # memoised
    _flip_last_byte(next(model.glob("*.safetensors")))
    second = fingerprint_model(model)
    assert second != first and len(counted) == 2


def test_fresh_files_are_not_memoised(tiny_model, tmp_path, counted):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    weights = next(model.glob("*.safetensors"))
    os.utime(weights)  # changed just now
    fingerprint_model(model)
    fingerprint_model(model)
    assert len(counted) == 2


def test_a_rewrite_that_restores_the_mtime_is_not_missed(tiny_model, tmp_path, monkeypatch):
    """Same size, same inode, mtime set back: only the ctime (and the bytes) differ."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    _later(monkeypatch)
    first = fingerprint_model(model)
    _flip_last_byte(next(model.glob("*.safetensors")), keep_mtime=True)
    assert fingerprint_model(model) != first


# ------------------------------------------------------------------------------------------------- tokenizers
@pytest.fixture
def tokenizer_loads(monkeypatch):
    """Count real tokenizer loads, with an empty fingerprint memo."""
    calls = []
    real = load.load_tokenizer
    monkeypatch.setattr(load, "_TOKENIZER_FINGERPRINTS", {})
    monkeypatch.setattr(load, "load_tokenizer", lambda path, *a: calls.append(str(path)) or real(path, *a))
    return calls


def test_tokenizer_fingerprint_is_memoised_on_the_files_content(tiny_model, tmp_path, tokenizer_loads):
    want = load.fingerprint_tokenizer(load.load_tokenizer(tiny_model))
    tokenizer_loads.clear()
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model, a)
    shutil.copytree(tiny_model, b)
    assert load.tokenizer_fingerprint(a) == want and tokenizer_loads == [str(a)]
    # another directory with byte-identical tokenizer files (and other weights): no second load
    _flip_last_byte(b / "model.safetensors")
    assert load.tokenizer_fingerprint(b) == want and tokenizer_loads == [str(a)]
    # a changed tokenizer file is a new content: loaded again, and its fingerprint is its own
    (b / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert load.tokenizer_fingerprint(b) != want and tokenizer_loads == [str(a), str(b)]
    # files a tokenizer load does not read do not count: sacpo's merge record
    (a / "merge.json").write_text("{}")
    assert load.tokenizer_fingerprint(a) == want and len(tokenizer_loads) == 2
    # but any other file does (config.json is read by AutoTokenizer), so a byte change there loads again
    cfg = (a / "config.json").read_text()
    (a / "config.json").write_text(cfg + "\n")
    assert load.tokenizer_fingerprint(a) == want and len(tokenizer_loads) == 3


def test_load_tokenizer_with_fingerprint_fills_the_memo(tiny_model, tokenizer_loads):
    tok, fp = load.load_tokenizer_with_fingerprint(tiny_model)
    assert fp == load.fingerprint_tokenizer(tok) and tokenizer_loads == [str(tiny_model)]
    assert load.tokenizer_fingerprint(tiny_model) == fp and tokenizer_loads == [str(tiny_model)]
