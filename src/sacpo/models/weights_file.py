"""Tensors read straight from safetensors files into existing CPU tensors: no mapping, no temporary copy.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
and the raw bytes. `file_source` finds, for named CPU tensors, the file region holding exactly their bytes (same
name, dtype, shape and content: checked byte for byte, in 4 MiB blocks); `read_into` then overwrites the tensors
with those bytes. The sweep workspace (`sacpo.train.workspace`) uses them to restore a policy's initial weights
from its parent directory instead of keeping a copy of every weight in memory. Reading into the tensors with
`readinto` keeps the resident set unchanged: loading the file again (`load_model` memory-maps it) would add its
pages to the process's resident set until the copy is freed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
BLOCK = 4 << 20


@dataclass(frozen=True)
class Region:
    path: Path
    offset: int  # first byte of the tensor in the file
    nbytes: int


def read_header(f: Any) -> tuple[dict, int]:
    """(the header without __metadata__, the offset of the data section) of a safetensors file open for binary
    reading at its start: 8 bytes (little-endian u64) header size N, then N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}}, offsets into the data that follows."""
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        return read_header(f)


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a contiguous CPU tensor's storage."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def file_source(files: list[Path], tensors: dict[str, torch.Tensor]) -> dict[str, Region] | None:
    """The file region of every tensor, or None unless each one is a contiguous CPU tensor stored under its name
    in one of the safetensors `files` with its dtype and shape and exactly its current bytes."""
    entries: dict[str, Region] = {}
    for path in files:
        if path.suffix != ".safetensors":
            continue
        header, start = _header(path)
        for name, e in header.items():
            if name in tensors:
                t = tensors[name]
                begin, end = e["data_offsets"]
                if DTYPES.get(e["dtype"]) != t.dtype or list(e["shape"]) != list(t.shape):
                    return None
                entries[name] = Region(path, start + begin, end - begin)
    if set(entries) != set(tensors):
        return None
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous() or not _same_bytes(entries[name], _bytes(t)):
            return None
    return entries


def _same_bytes(region: Region, want: np.ndarray) -> bool:
    if region.nbytes != want.size:
        return False
    buf = np.empty(min(BLOCK, max(region.nbytes, 1)), dtype=np.uint8)
    with open(region.path, "rb", buffering=0) as f:
        f.seek(region.offset)
        for off in range(0, region.nbytes, BLOCK):
            n = min(BLOCK, region.nbytes - off)
            if f.readinto(memoryview(buf)[:n]) != n or not np.array_equal(buf[:n], want[off : off + n]):
                return False
    return True


@torch.no_grad()
def read_into(source: dict[str, Region], tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite every tensor with its region's bytes (`file_source`); OSError if a file is shorter now."""
    for name, t in tensors.items():
        region, view = source[name], memoryview(_bytes(t))
        with open(region.path, "rb", buffering=0) as f:
            f.seek(region.offset)
            done = 0
            while done < region.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{region.path}: ends before tensor {name!r}")
                done += n
