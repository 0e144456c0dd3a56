"""Plain LoRA adapters as factors: read an adapter directory's A and B per module, and merge a chain of them into a
loaded model in place.

A LoRA adapter module m with factors A (r, in), B (out, r) and scale s updates the base tensor `m.weight` by
s·B·A (transposed with fan_in_fan_out). Only plain LoRA is read here: no DoRA, no bias training, no per-module rank
or alpha patterns, no full module copies (modules_to_save) — anything else is refused with the reason (MergeError).

`merge_into` adds each adapter's s·B·A to its module's weight, in chain order, with the operations of peft's
merge_and_unload (`sacpo.math.merging.lora_delta`): the same weights bit for bit (tested), without peft's module
injection, which took ~1 s per adapter on SmolLM2-135M (`sacpo.models.adapters.apply_chain` uses it when it can).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sacpo.math.merging import MergeError, lora_delta, lora_scaling
from sacpo.models.adapters import ADAPTER_WEIGHTS, adapter_config, adapter_fingerprint

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Lora:
    """One plain LoRA adapter: module name (as in the base's state dict, without `.weight`) → (A, B)."""

    path: Path
    fingerprint: str
    config: dict[str, Any]
    scaling: float
    fan_in_fan_out: bool
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    def delta_shape(self, module: str) -> tuple[int, int]:
        """Shape of `delta(module)` without computing it: (out, in), or (in, out) with fan_in_fan_out."""
        a, b = self.modules[module]
        return (a.shape[1], b.shape[0]) if self.fan_in_fan_out else (b.shape[0], a.shape[1])

    def delta(self, module: str) -> torch.Tensor:
        """s·B·A of `module` (float32), in the base weight's layout."""
        a, b = self.modules[module]
        return lora_delta(a, b, self.scaling, self.fan_in_fan_out)


def _refuse_unless_plain(path: Path, cfg: dict[str, Any]) -> None:
    checks = {
        "peft_type": (cfg.get("peft_type"), "LORA"),
        "use_dora": (bool(cfg.get("use_dora")), False),
        "bias": (cfg.get("bias", "none"), "none"),
        "rank_pattern": (cfg.get("rank_pattern") or {}, {}),
        "alpha_pattern": (cfg.get("alpha_pattern") or {}, {}),
        "modules_to_save": (cfg.get("modules_to_save") or None, None),
        "lora_bias": (bool(cfg.get("lora_bias")), False),
    }
    bad = [f"{k}={got!r}" for k, (got, want) in checks.items() if got != want]
    if bad:
        raise MergeError(f"{path}: only plain LoRA adapters are merged here, this one has {', '.join(bad)}")


def read_lora(path: str | Path) -> Lora:
    """A plain LoRA adapter directory's factors, keyed by module name."""
    from safetensors.torch import load_file

    p = Path(path)
    cfg = adapter_config(p)
    _refuse_unless_plain(p, cfg)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(p / ADAPTER_WEIGHTS)).items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                modules.setdefault(name.removesuffix(suffix), {})[part] = tensor
                break
        else:
            raise MergeError(
                f"{p}: adapter tensor {key!r} is not a LoRA factor (lora_A / lora_B of a linear layer)"
            )
    incomplete = sorted(m for m, f in modules.items() if set(f) != {"lora_A", "lora_B"})
    if incomplete:
        raise MergeError(f"{p}: modules without both LoRA factors: {incomplete[:3]}")
    return Lora(
        p,
        adapter_fingerprint(p),
        cfg,
        lora_scaling(cfg["lora_alpha"], int(cfg["r"]), bool(cfg.get("use_rslora"))),
        bool(cfg.get("fan_in_fan_out")),
        {m: (f["lora_A"], f["lora_B"]) for m, f in sorted(modules.items())},
    )


@torch.no_grad()
def merge_into(model: Any, adapters: list[Lora]) -> Any:
    """W ← W + s·B·A for every module of every adapter, in order (peft's merge_and_unload on plain LoRA); returns
    `model`. MergeError, with `model` unchanged, when a module is missing or its weight has another shape."""
    targets = []
    for a in adapters:
        for module in a.modules:
            try:
                weight = model.get_submodule(module).weight
            except AttributeError:
                raise MergeError(f"{a.path}: LoRA module {module!r} is not in the model") from None
            if tuple(weight.shape) != a.delta_shape(module):
                raise MergeError(f"{a.path}: LoRA update of {module!r} is {a.delta_shape(module)}, its weight is "
                                 f"{tuple(weight.shape)}")  # fmt: skip
            targets.append((a, module, weight))
    for a, module, weight in targets:
        weight += a.delta(module).to(weight.device)
    return model
