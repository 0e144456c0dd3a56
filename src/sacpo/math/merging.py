"""Linear weight merging (P-SACPO, Wachi et al. 2024 §6): θ = (1−q)·θ_a + q·θ_b.

With θ_a the step-1 (reward-aligned) policy and θ_b the step-2 policy realigned with a conservatively large λ,
sweeping q ∈ [0, 1] approximates the SACPO policies for intermediate λ without retraining.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class MergeError(ValueError):
    """Two models cannot be merged (different keys, shapes or dtypes)."""


def _check_q(q: float) -> None:
    if not 0.0 <= q <= 1.0:
        raise MergeError(f"merge weight q must be in [0, 1], got {q}")


def check_compatible(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Raise MergeError naming the first differing keys or shapes (e.g. different vocabulary sizes)."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise MergeError(
            f"state dicts have different keys: only in a: {only_a[:5]}{'…' if len(only_a) > 5 else ''}; "
            f"only in b: {only_b[:5]}{'…' if len(only_b) > 5 else ''}"
        )
    for key in a:
        if a[key].shape != b[key].shape:
            raise MergeError(
                f"tensor {key!r} has shape {tuple(a[key].shape)} in a but {tuple(b[key].shape)} in b "
                "(different architecture or vocabulary size?)"
            )
        if a[key].dtype != b[key].dtype:
            raise MergeError(f"tensor {key!r} has dtype {a[key].dtype} in a but {b[key].dtype} in b")


def linear_merge(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    q: float,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """θ = (1−q)·θ_a + q·θ_b for every floating tensor, computed in at least float32 and cast once to `dtype`
    (None: a's dtype).

    Non-floating tensors (integer buffers such as position ids) must be equal in a and b and are copied.
    """
    _check_q(q)
    check_compatible(a, b)
    out: dict[str, torch.Tensor] = {}
    for key, ta in a.items():
        tb = b[key]
        if ta.is_floating_point():
            work = torch.promote_types(ta.dtype, torch.float32)  # fp16/bf16 → fp32, fp64 stays fp64
            merged = torch.lerp(ta.to(work), tb.to(work), q)  # (1−q)·a + q·b
            out[key] = merged.to(dtype or ta.dtype)
        else:
            if not torch.equal(ta, tb):
                raise MergeError(
                    f"non-floating tensor {key!r} differs between a and b; cannot interpolate it"
                )
            out[key] = ta.clone()
    return out


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Dense update of one LoRA module: ΔW = scaling·B·A. lora_a: (r, in), lora_b: (out, r) → (out, in)."""
    if lora_a.shape[0] != lora_b.shape[1]:
        raise MergeError(f"LoRA ranks disagree: A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    return scaling * (lora_b.float() @ lora_a.float())


def merge_lora_deltas(
    deltas_a: Mapping[str, torch.Tensor], deltas_b: Mapping[str, torch.Tensor], q: float
) -> dict[str, torch.Tensor]:
    """Merge two sets of dense LoRA updates over the same base: ΔW = (1−q)·ΔW_a + q·ΔW_b per module.

    Adapters must be merged as dense deltas, not factor by factor: (1−q)B_a·A_a + q·B_b·A_b ≠ B·A of the
    interpolated factors. With a shared base W₀, W₀ + ΔW equals `linear_merge` of the two merged models.
    """
    return linear_merge(deltas_a, deltas_b, q)
