"""The two sides of a merge as weights, read tensor by tensor: a full model directory, or a base model plus the LoRA
adapters of an adapter directory's chain (`sacpo.models.adapters`).

    src = read_source("runs/p/stages/safe-lam2/model")    # base + [Δ_helpful, Δ_safe]
    with TensorReader(src.base) as base:
        w = src.weight(key, base.get(key))              # W + Δ_helpful[W] + Δ_safe[W], as merge_and_unload does

A LoRA adapter module m with factors A (r, in), B (out, r) and scale s updates the base tensor `m.weight` by
s·B·A (transposed with fan_in_fan_out). Only plain LoRA is read (`sacpo.models.lora_factors`, re-exported here):
no DoRA, no bias training, no per-module rank or alpha patterns, no full module copies (modules_to_save) —
anything else is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sacpo.math.merging import MergeError, add_deltas
from sacpo.models.adapters import read_chain
from sacpo.models.load import check_model_dir, fingerprint_model, is_adapter_dir
from sacpo.models.lora_factors import PEFT_PREFIX, Lora, read_lora
from sacpo.models.weights_file import DTYPES, read_header

__all__ = ["PEFT_PREFIX", "Lora", "Source", "TensorReader", "check_targets", "read_lora", "read_source"]


@dataclass(frozen=True)
class Source:
    """A model directory as base + adapters: a full model is its own base with no adapters."""

    path: Path
    base: Path
    base_fingerprint: str
    adapters: tuple[Lora, ...] = field(default=())

    @property
    def is_adapter(self) -> bool:
        return bool(self.adapters)

    def weight(self, key: str, base_tensor: torch.Tensor) -> torch.Tensor:
        """The tensor `key` of this model: the base's plus every adapter's update of it, in chain order."""
        module = key.removesuffix(".weight")
        deltas = [a.delta(module) for a in self.adapters if key.endswith(".weight") and module in a.modules]
        return add_deltas(base_tensor, deltas) if deltas else base_tensor


def read_source(path: str | Path) -> Source:
    """`path` as base + adapters (`sacpo.models.adapters.read_chain` for an adapter directory)."""
    p = check_model_dir(path)
    if not is_adapter_dir(p):
        return Source(p, p, fingerprint_model(p))
    chain = read_chain(p)
    return Source(p, chain.base, fingerprint_model(chain.base), tuple(read_lora(a) for a in chain.adapters))


class TensorReader:
    """The tensors of a full model directory's safetensors file(s), read one at a time with plain reads.

    The safetensors layout: 8 bytes (little-endian u64) header size N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (offsets into the data after the header), then the data. Plain reads instead of a
    memory map: a mapped file's pages stay in the process's resident set once touched (two 540 MB models read
    through mmap add 1.1 GB to the peak RSS of a merge), read pages only go to the page cache."""

    def __init__(self, model_dir: str | Path) -> None:
        self._handles: list[Any] = []
        self._where: dict[str, tuple[Any, int, dict[str, Any]]] = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            f = open(path, "rb")  # closed in __exit__
            self._handles.append(f)
            header, start = read_header(f)
            for key, info in header.items():
                self._where[key] = (f, start, info)

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        info = self._where[key][2]
        return tuple(info["shape"]), info["dtype"]

    def get(self, key: str) -> torch.Tensor:
        f, start, info = self._where[key]
        begin, end = info["data_offsets"]
        if info["dtype"] not in DTYPES:
            raise MergeError(f"tensor {key!r} has dtype {info['dtype']}, which the merge does not read")
        buf = bytearray(end - begin)
        f.seek(start + begin)
        if f.readinto(buf) != len(buf):
            raise MergeError(f"tensor {key!r}: the safetensors file is truncated")
        if not buf:
            return torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        return torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._handles:
            f.close()
        self._handles, self._where = [], {}


def check_targets(src: Source, reader: TensorReader) -> None:
    """Every adapter module updates a tensor `<module>.weight` of the base, of the shape its update has."""
    keys = set(reader.keys())
    for a in src.adapters:
        for module in a.modules:
            key = f"{module}.weight"
            if key not in keys:
                raise MergeError(
                    f"{a.path}: LoRA module {module!r} has no tensor {key!r} in the base {src.base} "
                    "(a tied or renamed weight?)"
                )
            shape = reader.shape_dtype(key)[0]
            got = a.delta_shape(module)
            if got != shape:
                raise MergeError(f"{a.path}: LoRA update of {key!r} is {got}, the base's tensor is {shape}")
