"""A merge of two adapter chains on one base, written as an adapter again — exact up to float rounding.

With θ_a = θ_0 + ΣP + Σ_{i∈R_a} Δ_i and θ_b = θ_0 + ΣP + Σ_{j∈R_b} Δ_j (P: the adapters both chains start with,
compared by content fingerprint; R_a, R_b: the rest),

    θ = (1−q)·θ_a + q·θ_b = θ_0 + ΣP + Σ_{i∈R_a} (1−q)·Δ_i + Σ_{j∈R_b} q·Δ_j

and every Δ = s·B·A, so the sum over R_a ∪ R_b is one LoRA module per target of rank Σr with scale 1
(`sacpo.math.merging.concat_lora`): A = [A_i; …], B = [c_i·s_i·B_i, …]. The result is an adapter stacked on P.
P-SACPO (b = step 2 trained on a = step 1): R_a = ∅, R_b = {Δ_2}, so θ = θ_a + q·Δ_2 — the step-2 adapter with its
B scaled by q·s, same rank. The naive merge (both from SFT): rank r_a + r_b. A module that an adapter does not
target contributes a zero block. Requires plain LoRA (`sources.read_lora`) and one fan_in_fan_out convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sacpo.fsutil import atomic_save_file, atomic_write_json
from sacpo.math.merging import concat_lora
from sacpo.merge.sources import PEFT_PREFIX, Lora, Source
from sacpo.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_chain


def split_chains(a: Source, b: Source) -> tuple[int, tuple[Lora, ...], tuple[Lora, ...]]:
    """(length of the common prefix P, R_a, R_b): adapters compared by content fingerprint."""
    n = 0
    while (
        n < min(len(a.adapters), len(b.adapters)) and a.adapters[n].fingerprint == b.adapters[n].fingerprint
    ):
        n += 1
    return n, a.adapters[n:], b.adapters[n:]


def why_not_adapter(a: Source, b: Source) -> str | None:
    """None when the merge of a and b can be written as an adapter, else the reason it cannot."""
    if a.base_fingerprint != b.base_fingerprint:
        return f"{a.path} and {b.path} are not adapters on the same base model"
    _, rest_a, rest_b = split_chains(a, b)
    rest = rest_a + rest_b
    if not rest:
        return f"{a.path} and {b.path} are the same model (same base and adapters): nothing to merge"
    if len({lora.fan_in_fan_out for lora in rest}) > 1:
        return "the adapters disagree on fan_in_fan_out"
    return None


def _terms(module: str, weighted: list[tuple[float, Lora]]) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """(c·s, A, B) of every adapter for `module`; zero factors of its rank where an adapter does not target it."""
    a_ref, b_ref = next(lora.modules[module] for _, lora in weighted if module in lora.modules)
    terms = []
    for coef, lora in weighted:
        if module in lora.modules:
            a, b = lora.modules[module]
        else:
            a = torch.zeros(lora.rank, a_ref.shape[1], dtype=a_ref.dtype)
            b = torch.zeros(b_ref.shape[0], lora.rank, dtype=b_ref.dtype)
        terms.append((coef * lora.scaling, a, b))
    return terms


def merged_adapter(
    a: Source, b: Source, q: float
) -> tuple[dict[str, Any], dict[str, torch.Tensor], tuple[Path, ...]]:
    """(adapter_config, adapter tensors, parent adapter directories) of (1−q)·θ_a + q·θ_b (module docstring)."""
    n, rest_a, rest_b = split_chains(a, b)
    weighted = [(1.0 - q, lora) for lora in rest_a] + [(q, lora) for lora in rest_b]
    modules = sorted({m for _, lora in weighted for m in lora.modules})
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        lora_a, lora_b = concat_lora(_terms(module, weighted))  # (Σr, in), (out, Σr)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lora_b.contiguous()
    rank = sum(lora.rank for _, lora in weighted)
    config = dict(weighted[-1][1].config)
    config.update(
        r=rank,
        lora_alpha=rank,  # scale 1: the merge weights and the adapters' scales are in B
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=modules,  # full module names: peft matches a name equal to a target
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        inference_mode=True,
    )
    return config, tensors, tuple(lora.path for lora in a.adapters[:n])


def write_merged_adapter(a: Source, b: Source, q: float, tmp: Path, final: Path) -> None:
    """The merged adapter's files in `tmp` (to become `final`): config, weights, sacpo_adapter.json."""
    config, tensors, parents = merged_adapter(a, b, q)
    atomic_save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    atomic_write_json(tmp / ADAPTER_CONFIG, config)
    write_chain(tmp, final, a.base, parents)
