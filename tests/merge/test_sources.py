"""The merge's tensor reader: plain reads of safetensors files give the tensors safetensors itself loads."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from sacpo.math.merging import MergeError
from sacpo.merge.sources import TensorReader


def test_reader_returns_every_tensor_of_every_shard_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    shard_a = {
        "w.f32": torch.randn(3, 4, generator=g),
        "w.bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(2, 2, generator=g).half(),
        "ids": torch.arange(7),
        "scalar": torch.tensor(1.5),
    }
    shard_b = {"mask": torch.tensor([True, False, True]), "i8": torch.tensor([-3, 4], dtype=torch.int8)}
    save_file(shard_a, tmp_path / "model-00001.safetensors", metadata={"format": "pt"})
    save_file(shard_b, tmp_path / "model-00002.safetensors")
    want = {
        **load_file(tmp_path / "model-00001.safetensors"),
        **load_file(tmp_path / "model-00002.safetensors"),
    }
    with TensorReader(tmp_path) as r:
        assert r.keys() == sorted(want)
        for k, v in want.items():
            got = r.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
            assert r.shape_dtype(k)[0] == tuple(v.shape)
        assert r.shape_dtype("w.bf16") == ((5,), "BF16")


def test_reader_refuses_a_truncated_file(tmp_path):
    save_file({"w": torch.ones(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with TensorReader(tmp_path) as r, pytest.raises(MergeError, match="truncated"):
        r.get("w")
