"""sacpo.fsutil: atomic, durable writes with normal modes; a directory replacement never leaves a window without
the old output, and a failed build leaves the old output untouched."""

import json
import os
import stat
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from sacpo import fsutil


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_text_json_jsonl_round_trip_and_no_temp_left(tmp_path):
    fsutil.atomic_write_text(tmp_path / "a" / "x.txt", "héllo")
    fsutil.atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    fsutil.atomic_write_jsonl(tmp_path / "x.jsonl", [{"p": "é"}, {"p": 2}])
    assert (tmp_path / "a" / "x.txt").read_text("utf-8") == "héllo"
    assert (tmp_path / "x.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    assert (tmp_path / "x.jsonl").read_text("utf-8") == '{"p": "é"}\n{"p": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "x.json", "x.jsonl"]  # no .tmp files


def test_file_modes_follow_the_umask(tmp_path, umask022):
    p = fsutil.atomic_write_text(tmp_path / "x.txt", "x")
    assert _mode(p) == 0o644
    t = fsutil.atomic_save_file({"w": torch.arange(3.0)}, tmp_path / "w.safetensors", metadata={"k": "v"})
    assert _mode(t) == 0o644  # safetensors' own save_file leaves 0600
    assert torch.equal(load_file(t)["w"], torch.arange(3.0))


def test_replace_dir_without_exchange_keeps_old_until_new_is_in_place(tmp_path, umask022, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new = fsutil.temp_dir_for(final)
    (new / "new.txt").write_text("new")
    os.chmod(new / "new.txt", 0o600)
    seen = []
    real_replace = os.replace

    def spy(src, dst):  # at every rename, the final name holds a complete tree (old or new) or is mid-swap
        seen.append(sorted(p.name for p in final.iterdir()) if final.exists() else None)
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", spy)
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)  # the fallback path (no renameat2)
    fsutil.replace_dir(new, final)
    assert seen[0] == ["old.txt"]  # the old tree is renamed aside, not deleted, before the swap
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert _mode(final / "new.txt") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # neither the aside copy nor the temp dir is left


def test_atomic_dir_failure_leaves_old_output(tmp_path):
    final = tmp_path / "out"
    with fsutil.atomic_dir(final) as tmp:
        (tmp / "a.json").write_text(json.dumps(1))
    with pytest.raises(RuntimeError), fsutil.atomic_dir(final) as tmp:
        (tmp / "b.json").write_text("partial")
        raise RuntimeError("crash while building")
    assert sorted(p.name for p in final.iterdir()) == ["a.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_replace_dir_swaps_atomically_a_reader_never_sees_the_output_missing(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "v").write_text("0")
    misses, reads, stop = [0], [0], threading.Event()

    def reader():
        while not stop.is_set():
            reads[0] += 1
            if not (final / "v").is_file():
                misses[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 101):
            new = fsutil.temp_dir_for(final)
            (new / "v").write_text(str(i))
            fsutil.replace_dir(new, final)
    finally:
        stop.set()
        thread.join()
    assert (final / "v").read_text() == "100"
    assert reads[0] > 0 and misses[0] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
