"""Linear weight merging (P-SACPO, Wachi et al. 2024 §6): θ = (1−q)·θ_a + q·θ_b.

With θ_a the step-1 (reward-aligned) policy and θ_b the step-2 policy realigned with a conservatively large λ,
sweeping q ∈ [0, 1] approximates the SACPO policies for intermediate λ without retraining. With LoRA, θ_b = θ_a + Δ_b
(step 2 stacked on step 1), so the merge is θ_a + q·Δ_b: a dense update (`lora_delta`, `add_deltas`), or an adapter
again (`concat_lora`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """LoRA's scale s of ΔW = s·B·A: α/r (Hu et al. 2021), or α/√r with rank-stabilised LoRA (Kalajdzievski 2023)."""
    if r < 1:
        raise MergeError(f"LoRA rank must be >= 1, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """Dense update of one LoRA module: ΔW = scaling·B·A. lora_a: (r, in), lora_b: (out, r) → (out, in) in float32,
    or its transpose (in, out) with fan_in_fan_out (GPT-2's Conv1D stores its weight as (in, out)).

    The operations are peft's (`LoraLayer.get_delta_weight`: (B @ A), transposed, times the scale), so W + ΔW is the
    weight peft's merge_and_unload writes, bit for bit, for float32 factors."""
    if lora_a.shape[0] != lora_b.shape[1]:
        raise MergeError(f"LoRA ranks disagree: A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    delta = lora_b.float() @ lora_a.float()  # (out, in)
    return (delta.T if fan_in_fan_out else delta) * scaling


def add_deltas(weight: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """θ = ((W + ΔW_1) + ΔW_2) + … — adapters merged one after the other, in at least float32, cast back to W's
    dtype. A stack of adapters on one base (SACPO step 2 on a LoRA step 1) is this sum."""
    work = torch.promote_types(weight.dtype, torch.float32)
    out = weight.to(work)
    for delta in deltas:
        if delta.shape != weight.shape:
            raise MergeError(
                f"LoRA update of shape {tuple(delta.shape)} for a weight of {tuple(weight.shape)}"
            )
        out = out + delta.to(work)
    return out.to(weight.dtype)


def concat_lora(
    terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA module of rank Σr_i (scale 1) equal to a weighted sum of LoRA updates: terms (c_i, A_i, B_i) with
    A_i: (r_i, in), B_i: (out, r_i) →

        A = [A_1; A_2; …]  (Σr_i, in),   B = [c_1·B_1, c_2·B_2, …]  (out, Σr_i),   B·A = Σ_i c_i·B_i·A_i

    exactly (up to float rounding): a block matrix product. With c_i = w_i·s_i (merge weight × LoRA scale) this is a
    P-SACPO merge θ_1 + q·Δ_2 — or the naive merge (1−q)·Δ_a + q·Δ_b — written as an adapter (peft's
    add_weighted_adapter with combination_type="cat" does the same)."""
    if not terms:
        raise MergeError("no LoRA updates to combine")
    a = torch.cat([ta.float() for _, ta, _ in terms], dim=0)  # (Σr, in)
    b = torch.cat([c * tb.float() for c, _, tb in terms], dim=1)  # (out, Σr)
    if a.shape[0] != b.shape[1]:
        raise MergeError(f"LoRA ranks disagree: A {tuple(a.shape)}, B {tuple(b.shape)}")
    return a, b


def merge_lora_deltas(
    deltas_a: Mapping[str, torch.Tensor], deltas_b: Mapping[str, torch.Tensor], q: float
) -> dict[str, torch.Tensor]:
    """Merge two sets of dense LoRA updates over the same base: ΔW = (1−q)·ΔW_a + q·ΔW_b per module.

    Adapters must be merged as dense deltas, not factor by factor: (1−q)B_a·A_a + q·B_b·A_b ≠ B·A of the
    interpolated factors. With a shared base W₀, W₀ + ΔW equals `linear_merge` of the two merged models.
    """
    return linear_merge(deltas_a, deltas_b, q)
