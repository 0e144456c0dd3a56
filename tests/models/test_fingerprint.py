"""Model fingerprints are memoised per file state, and a rewrite is always seen."""

import os
import shutil
import time

from sacpo.models import load
from sacpo.models.load import fingerprint_model


def _age(path, seconds):
    for f in path.iterdir():
        t = time.time() - seconds
        os.utime(f, (t, t))


def test_memoised_for_old_files_and_rehashed_after_a_rewrite(tiny_model, tmp_path, monkeypatch):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    _age(model, 60)
    calls = []
    real = load.hash_files
    monkeypatch.setattr(load, "hash_files", lambda files: calls.append(1) or real(files))
    first = fingerprint_model(model)
    assert fingerprint_model(model) == first and len(calls) == 1  # memoised
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, other content, fresh mtime
    weights.write_bytes(bytes(data))
    second = fingerprint_model(model)
    assert second != first and len(calls) == 2
    assert fingerprint_model(model) == second and len(calls) == 3  # fresh files are not memoised (racy)


def test_a_same_second_same_size_rewrite_is_not_missed(tiny_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    first = fingerprint_model(model)
    weights = next(model.glob("*.safetensors"))
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same stat as before: only the bytes differ
    assert fingerprint_model(model) != first
