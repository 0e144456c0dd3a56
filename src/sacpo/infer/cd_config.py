"""`CDConfig`: the settings of a controlled-decoding run (`sacpo cd CONFIG`), validated before any model loads."""

from __future__ import annotations

from typing import Literal

from sacpo.config import (
    ConfigError,
    Device,
    NonNegativeFloat,
    PositiveInt,
    Seed,
    config_dataclass,
    help_field,
)
from sacpo.data.prompt_format import CHAT_TEMPLATE_HELP, SYSTEM_PROMPT_HELP, PromptFormat
from sacpo.math.decoding import COMBINERS
from sacpo.scoring import oracle_names

Combine = Literal[tuple(COMBINERS)]  # the value combinations of `sacpo.math.decoding`


@config_dataclass
class CDConfig:
    model: str = help_field(help="base causal-LM directory (safetensors)")
    scorer: str = help_field(help="reward prefix scorer directory (train_prefix_scorer output)")
    prompts: str = help_field(
        help="prompts: .json (list or splits, e.g. toyworld prompts.json) / .jsonl / .txt"
    )
    output_dir: str = help_field(help="writes samples.jsonl, summary.json, config.yaml")
    mode: Literal["token", "block"] = help_field(
        "token", help="token (token-wise CD) | block (blockwise CD; M ≥ max_new_tokens = BoN)"
    )
    beta: float = help_field(
        1.0, help="token-wise: q ∝ p·exp(V/β); larger = closer to the base model (inf = no tilt)", gt=0
    )
    top_k: PositiveInt = help_field(10, help="token-wise: candidates per step (the base model's top-k)")
    K: PositiveInt = help_field(4, help="blockwise: candidate blocks per step (best-of-K)")
    M: PositiveInt = help_field(4, help="blockwise: tokens per block")
    safety_scorer: str | None = help_field(
        None, help="second prefix scorer (safety g, or cost c with combine=cost); not loaded when lam = 0"
    )
    lam: NonNegativeFloat = help_field(
        0.0, help="λ of V = V_r + λ·V_g (or V_r − λ·V_c); > 0 needs safety_scorer"
    )
    combine: Combine = help_field("safety", help="safety: V_r + λ·V_g | cost: V_r − λ·V_c")
    prompts_split: str = help_field("test", help="key of the prompt list when the .json maps splits")
    max_prompts: PositiveInt | None = help_field(None, help="use the first N prompts only")
    n_samples: PositiveInt = help_field(4, help="responses per prompt")
    max_new_tokens: PositiveInt = help_field(40, help="max response tokens")
    max_prompt_length: PositiveInt = help_field(128, help="prompts are left-truncated to this many tokens")
    system_prompt: str | None = help_field(None, help=SYSTEM_PROMPT_HELP)
    chat_template: str | None = help_field(None, help=CHAT_TEMPLATE_HELP)
    batch_size: PositiveInt = help_field(
        32, help="sequences decoded together (blockwise: prefixes per sampling call)"
    )
    oracle: str | None = help_field(None, help="gold oracle scoring the outputs (toyworld) or null")
    baseline_samples: bool = help_field(
        True,
        help="with an oracle: draw n_samples plain base samples per prompt (seed + 1) as win-rate opponents and "
        "write results.json (ModelMetrics rows for `sacpo report`)",
    )
    seed: Seed = help_field(0, help="sampling seed")
    device: Device = help_field("auto", help="auto (cuda if available) | cpu | cuda | cuda:N")

    def __post_init__(self) -> None:  # cross-field checks; types, bounds and choices are declared above
        if self.lam > 0 and self.safety_scorer is None:
            raise ConfigError(f"lam={self.lam} > 0 needs a safety_scorer")
        if self.oracle is not None and self.oracle not in oracle_names():
            raise ConfigError(f"unknown oracle {self.oracle!r}; valid: {', '.join(oracle_names())} or null")
        self.prompt_format()  # a chat_template that is neither a template nor a file fails here

    def prompt_format(self) -> PromptFormat:
        """The run's `PromptFormat` (a chat_template file is read here)."""
        return PromptFormat.from_fields(self.system_prompt, self.chat_template)
