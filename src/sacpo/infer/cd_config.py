"""`CDConfig`: the settings of a controlled-decoding run (`sacpo cd CONFIG`), validated before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sacpo.config import ConfigError, help_field
from sacpo.math.decoding import COMBINERS
from sacpo.scoring import oracle_names

MODES = ("token", "block")  # token-wise CD (`sacpo.infer.cd_token`), blockwise CD (`sacpo.infer.cd_block`)


@dataclass(frozen=True)
class CDConfig:
    model: str = help_field(help="base causal-LM directory (safetensors)")
    scorer: str = help_field(help="reward prefix scorer directory (train_prefix_scorer output)")
    prompts: str = help_field(
        help="prompts: .json (list or splits, e.g. toyworld prompts.json) / .jsonl / .txt"
    )
    output_dir: str = help_field(help="writes samples.jsonl, summary.json, config.yaml")
    mode: str = help_field(
        "token", help="token (token-wise CD) | block (blockwise CD; M ≥ max_new_tokens = BoN)"
    )
    beta: float = help_field(
        1.0, help="token-wise: q ∝ p·exp(V/β); larger = closer to the base model (inf ok)"
    )
    top_k: int = help_field(10, help="token-wise: candidates per step (the base model's top-k)")
    K: int = help_field(4, help="blockwise: candidate blocks per step (best-of-K)")
    M: int = help_field(4, help="blockwise: tokens per block")
    safety_scorer: str | None = help_field(
        None, help="second prefix scorer (safety g, or cost c with combine=cost); not loaded when lam = 0"
    )
    lam: float = help_field(0.0, help="λ of V = V_r + λ·V_g (or V_r − λ·V_c); > 0 needs safety_scorer")
    combine: str = help_field("safety", help="safety: V_r + λ·V_g | cost: V_r − λ·V_c")
    prompts_split: str = help_field("test", help="key of the prompt list when the .json maps splits")
    max_prompts: int | None = help_field(None, help="use the first N prompts only")
    n_samples: int = help_field(4, help="responses per prompt")
    max_new_tokens: int = help_field(40, help="max response tokens")
    max_prompt_length: int = help_field(128, help="prompts are left-truncated to this many tokens")
    batch_size: int = help_field(
        32, help="sequences decoded together (blockwise: prefixes per sampling call)"
    )
    oracle: str | None = help_field(None, help="gold oracle scoring the outputs (toyworld) or null")
    baseline_samples: bool = help_field(
        True,
        help="with an oracle: draw n_samples plain base samples per prompt (seed + 1) as win-rate opponents and "
        "write results.json (ModelMetrics rows for `sacpo report`)",
    )
    seed: int = help_field(0, help="sampling seed")
    device: str = help_field("auto", help="auto (cuda if available) | cpu | cuda | cuda:N")

    def __post_init__(self) -> None:
        validate_cd_config(self)


def validate_cd_config(cfg: CDConfig) -> None:
    """Reject impossible values before any model loads (ConfigError)."""
    checks = [
        (cfg.mode in MODES, f"unknown mode {cfg.mode!r}; valid: {', '.join(MODES)}"),
        (cfg.beta > 0, f"beta must be > 0 (inf = no tilt), got {cfg.beta}"),
        (cfg.top_k >= 1, f"top_k must be >= 1, got {cfg.top_k}"),
        (cfg.K >= 1, f"K must be >= 1, got {cfg.K}"),
        (cfg.M >= 1, f"M must be >= 1, got {cfg.M}"),
        (cfg.lam >= 0 and math.isfinite(cfg.lam), f"lam must be >= 0 and finite, got {cfg.lam}"),
        (cfg.combine in COMBINERS, f"unknown combine {cfg.combine!r}; valid: {', '.join(sorted(COMBINERS))}"),
        (cfg.lam == 0 or cfg.safety_scorer is not None, f"lam={cfg.lam} > 0 needs a safety_scorer"),
        (cfg.n_samples >= 1, f"n_samples must be >= 1, got {cfg.n_samples}"),
        (cfg.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
        (cfg.max_prompt_length >= 1, f"max_prompt_length must be >= 1, got {cfg.max_prompt_length}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.max_prompts is None or cfg.max_prompts >= 1, f"max_prompts must be >= 1, got {cfg.max_prompts}"),
        (
            cfg.oracle is None or cfg.oracle in oracle_names(),
            f"unknown oracle {cfg.oracle!r}; valid: {', '.join(oracle_names())} or null",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
