"""Small model-level helpers shared by every trainer and decoder: devices, dropout, activation checkpointing,
KV-cache argument names.

    device = resolve_device("auto")       # cuda when visible, else cpu
    disable_dropout(model)                # preference / BT losses compare log-probs: dropout noise biases them
    enable_checkpointing(model)           # activation checkpointing under the transformers 5.x or 4.x name
    out = model(ids, **cache_kwargs(model, cache)); cache = output_cache(out)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from sacpo.models.load import default_device


def resolve_device(name: str | torch.device | None) -> torch.device:
    """ "auto"/None → cuda when available, else cpu; anything else as given."""
    if name is None or name == "auto":
        return torch.device(default_device())
    return torch.device(name)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set p = 0 on every Dropout module (as TRL does for preference and reward training)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing (transformers ≥ 5.x: activation_checkpointing_enable)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """The KV-cache argument under the name the model's forward takes (`cache` in recent transformers 5.x,
    `past_key_values` before)."""
    return {_cache_name(type(module)): cache}


@functools.cache
def _cache_name(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output (field `cache`, or `past_key_values` in older transformers)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
