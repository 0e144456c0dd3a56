"""Resolve a policy spec to a model directory: a local path, or `builtin:tiny-gpt2` (built locally, seeded)."""

from __future__ import annotations

from pathlib import Path

from sacpo.models.load import check_model_dir

BUILTINS = {"builtin:tiny-gpt2"}


def resolve_policy(spec: str, workdir: str | Path) -> Path:
    """`builtin:tiny-gpt2` → <workdir>/sft (built once, deterministic); anything else must be a model directory."""
    if spec.startswith("builtin:"):
        if spec not in BUILTINS:
            raise ValueError(f"unknown builtin model {spec!r}; valid: {', '.join(sorted(BUILTINS))}")
        from sacpo.models.tiny import build_tiny_gpt2

        target = Path(workdir) / "sft"
        if not (target / "model.safetensors").is_file():
            build_tiny_gpt2(target)
        return target
    return check_model_dir(spec)
