"""A gated-SiLU MLP product that keeps two activations for backward instead of three.

The MLP of Llama-family models (Llama, Mistral, Qwen2, SmolLM2, …) computes

    MLP(x) = W_down · (silu(W_gate·x) ⊙ W_up·x),      silu(a) = a·σ(a)        (Shazeer 2020, GLU variants)

and autograd keeps a = W_gate·x, b = W_up·x *and* silu(a) — three (N, T, I) tensors per layer — to differentiate
the product. `SwiGLUProduct` keeps a and b only and recomputes σ(a) in backward:

    ∂a = g ⊙ b ⊙ σ(a)·(1 + a·(1 − σ(a))),      ∂b = g ⊙ silu(a)

The forward value is the same expression (bit-identical); the gradients agree with autograd's to rounding. On
SmolLM2-135M at 4 × 118 tokens this is 30 layers × 2.9 MB less at the start of backward (benchmarks/RESULTS.md).
`fuse_swiglu(model)` swaps it into every MLP module that has exactly this structure (gate_proj, up_proj,
down_proj and a SiLU act_fn), including ones whose projections carry LoRA adapters; anything else is left alone.
It returns a `SwiGLUPatch` whose `undo()` gives every patched module its own forward back (the trainer undoes it
before it returns, so a caller's model is left as it came).
"""

from __future__ import annotations

from typing import Any

import torch

_ABSENT = object()  # a module without an instance-level forward (it uses its class's)

SILU_NAMES = frozenset({"SiLU", "SiLUActivation"})  # torch.nn.SiLU, transformers' ACT2FN["silu"]


class SwiGLUProduct(torch.autograd.Function):
    """silu(a) ⊙ b for a, b of the same shape (..., I); saves a and b only (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return torch.nn.functional.silu(a) * b

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        sig = torch.sigmoid(a)  # (..., I)
        grad_b = grad * (a * sig) if ctx.needs_input_grad[1] else None
        grad_a = None
        if ctx.needs_input_grad[0]:
            # σ(a)·(1 + a·(1 − σ(a))) = σ(a) + a·σ(a)·(1 − σ(a)), the derivative of silu
            grad_a = grad * b * (sig * (1.0 + a * (1.0 - sig)))
        return grad_a, grad_b


def _swiglu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SwiGLUProduct.apply(self.gate_proj(x), self.up_proj(x)))


def is_swiglu_mlp(module: torch.nn.Module) -> bool:
    """True for an MLP whose forward is down_proj(silu(gate_proj(x)) * up_proj(x)): it has those projections and a
    SiLU act_fn, and its own forward gives the same output as the fused one on a random probe input (so a
    subclass that adds anything — dropout, clamping, another activation — is not touched). The probe runs in eval
    mode (dropout of an adapter off, no draw from the global RNG) and restores every submodule's mode."""
    parts = [getattr(module, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    if not all(isinstance(p, torch.nn.Module) for p in parts) or type(act).__name__ not in SILU_NAMES:
        return False
    width = getattr(parts[0], "in_features", None)
    weight = next(module.parameters(), None)
    if not isinstance(width, int) or weight is None:
        return False
    g = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(1, 3, width, generator=g, device=weight.device).to(weight.dtype)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    with torch.no_grad():
        try:
            same = torch.allclose(module(x), _swiglu_forward(module, x), rtol=1e-4, atol=1e-5)
        except Exception:  # a forward with another signature or shapes: not ours to change
            return False
        finally:
            for m, training in modes:
                m.training = training
    return bool(same)


class SwiGLUPatch:
    """The MLP modules `fuse_swiglu` routed through `SwiGLUProduct`, with the forward each had before.

    len(patch) = how many were changed; `undo()` restores them (idempotent; the last patch applied is undone first
    when patches are stacked)."""

    def __init__(self, saved: list[tuple[torch.nn.Module, Any]]) -> None:
        self._saved = saved  # (module, its previous instance-level forward or _ABSENT)

    def __len__(self) -> int:
        return len(self._saved)

    def undo(self) -> None:
        for module, previous in reversed(self._saved):
            if previous is _ABSENT:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._saved = []


def fuse_swiglu(model: torch.nn.Module) -> SwiGLUPatch:
    """Route every SwiGLU MLP of `model` through `SwiGLUProduct` (in place); `.undo()` on the result reverts it."""
    saved = []
    for module in model.modules():
        if is_swiglu_mlp(module):
            saved.append((module, module.__dict__.get("forward", _ABSENT)))
            module.forward = _swiglu_forward.__get__(module)
    return SwiGLUPatch(saved)
