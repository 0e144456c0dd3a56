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
