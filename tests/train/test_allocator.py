"""glibc malloc tuning: large blocks stay in the heap (no fresh pages per step), applied only when configured."""

import ctypes
import resource
import sys

import pytest

from sacpo.train import allocator
from sacpo.train.allocator import tune_malloc

GLIBC = allocator._glibc() is not None


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tuned_malloc_reuses_a_freed_64_mib_block_without_new_page_faults():
    # glibc's dynamic mmap threshold stops at 32 MiB: by default a 64 MiB block is mapped on malloc and unmapped on
    # free, so writing a second one faults in 16 384 fresh 4 KiB pages again
    assert tune_malloc()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size = 64 << 20
    first = libc.malloc(size)
    libc.memset(first, 1, size)
    libc.free(first)
    second = libc.malloc(size)
    before = _faults()
    libc.memset(second, 2, size)
    faults = _faults() - before
    libc.free(second)
    assert faults < size // 4096 // 10, faults  # reused heap pages, not 16 384 fresh ones


def test_tune_malloc_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator._glibc() is None
    assert tune_malloc() is False


@pytest.mark.parametrize("mmap, trim", [(0, 1 << 20), (1 << 20, -1), (1 << 31, 1 << 20)])
def test_thresholds_out_of_range_are_refused(mmap, trim):
    with pytest.raises(ValueError, match="thresholds"):
        tune_malloc(mmap, trim)


@pytest.mark.parametrize("enabled", [True, False])
def test_train_applies_the_tuning_only_when_configured(tiny_model, pku_tiny, tmp_path, monkeypatch, enabled):
    from sacpo.config import from_dict
    from sacpo.train.config import TrainConfig
    from sacpo.train.loop import train

    calls = []
    monkeypatch.setattr("sacpo.train.loop.tune_malloc", lambda: calls.append(1) or True)
    cfg = from_dict(
        TrainConfig,
        {
            "policy": str(tiny_model),
            "output_dir": str(tmp_path / "run"),
            "data": {"source": str(pku_tiny), "format": "pku_helpful"},
            "max_steps": 1,
            "batch_size": 4,
            "max_length": 64,
            "max_prompt_length": 32,
            "kl_prompts": 0,
            "malloc_tuning": enabled,
        },
    )
    train(cfg, show_progress=False)
    assert len(calls) == int(enabled)


def test_off_in_the_python_api_and_on_for_the_commands(tiny_model, pku_tiny, tmp_path):
    """TrainConfig leaves the process-wide thresholds alone; the commands' CommandTrainConfig (sacpo train, the
    stages of sacpo pipeline / demo) turns them on unless the config says otherwise."""
    from sacpo.config import from_dict
    from sacpo.recipes.pipeline import PipelineConfig, plan
    from sacpo.recipes.train import CommandTrainConfig
    from sacpo.train.config import TrainConfig

    fields = {"policy": str(tiny_model), "output_dir": str(tmp_path), "data": {"source": str(pku_tiny)}}
    assert from_dict(TrainConfig, fields).malloc_tuning is False
    assert from_dict(CommandTrainConfig, fields).malloc_tuning is True
    assert from_dict(CommandTrainConfig, {**fields, "malloc_tuning": False}).malloc_tuning is False
    stage = {"name": "a", "data": {"source": str(pku_tiny)}, "beta": 0.1}
    for defaults, expected in (({}, True), ({"malloc_tuning": False}, False)):
        cfg = from_dict(
            PipelineConfig,
            {"policy": str(tiny_model), "output_dir": str(tmp_path), "stages": [stage], "defaults": defaults},
        )
        assert plan(cfg, tiny_model)["a"][0].train.malloc_tuning is expected


def test_release_memory_returns_free_heap_pages():
    """gc + malloc_trim(0): True on glibc once a large freed block is in the heap (64 MiB, below the tuned mmap
    threshold), False where the C library is not glibc; it changes no setting either way."""
    if not GLIBC:
        assert allocator.release_memory() is False
        return
    assert tune_malloc()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    a, b = libc.malloc(64 << 20), libc.malloc(1 << 10)  # b keeps a's pages off the top of the heap
    libc.memset(a, 1, 64 << 20)
    libc.free(a)
    assert allocator.release_memory() is True
    libc.free(b)
    assert allocator._applied == (allocator.MMAP_THRESHOLD, allocator.TRIM_THRESHOLD)
