"""`BonConfig`: the settings of a best-of-n run (`sacpo bon CONFIG`), validated before any model loads."""

from __future__ import annotations

from typing import Literal

from sacpo.config import ConfigError, Device, PositiveInt, Seed, config_dataclass, help_field
from sacpo.data.prompt_format import CHAT_TEMPLATE_HELP, SYSTEM_PROMPT_HELP, PromptFormat
from sacpo.math.bon_calibrate import BOUNDS
from sacpo.math.bon_select import CONSTRAINTS
from sacpo.scoring import oracle_names
from sacpo.scoring.reward_model import AGGREGATES

Aggregate = Literal[AGGREGATES]  # the ensemble aggregates of `RewardModelScorer`
Constraint = Literal[CONSTRAINTS]  # the constraints of `sacpo.math.bon_select`
Bound = Literal[BOUNDS]  # the lower bounds of `sacpo.math.bon_calibrate`


@config_dataclass
class BonConfig:
    model: str = help_field(help="base causal-LM directory (safetensors): the policy sampled from")
    prompts: str = help_field(
        help="prompts: .json (a list, or a mapping of splits such as the toyworld's prompts.json — see "
        "prompts_split), .jsonl (rows with a 'prompt' field) or .txt (one per line)"
    )
    output_dir: str = help_field(help="writes summary.json, results.json, candidates.jsonl, samples/<name>/")
    prompts_split: str = help_field("test", help="key of the prompt list when the .json file maps splits")
    max_prompts: PositiveInt | None = help_field(None, help="use the first N prompts only")
    ns: list[PositiveInt] = help_field(
        [1, 2, 4, 8, 16, 32, 64], help="best-of-n sizes; max(ns) candidates per draw", min_length=1
    )
    n_samples: PositiveInt = help_field(
        4, help="independent best-of-n draws per prompt (rows per prompt in each samples.jsonl)"
    )
    reward: str | list[str] = help_field(
        "toyworld-gold",
        help="selection reward: a registered scorer name (sacpo.scoring) or reward model dir(s) (several = "
        "ensemble)",
    )
    reward_aggregate: Aggregate = help_field("mean", help="ensemble aggregate of the reward models")
    safety: str | list[str] | None = help_field(
        None,
        help="safety scorer g (higher = safer): a registered scorer name (toyworld-safety) or cost/safety model "
        "dir(s), read on the score view (g = −cost); None = unconstrained only",
    )
    safety_aggregate: Aggregate = help_field("mean", help="ensemble aggregate of the safety models")
    constraint: Constraint = help_field(
        "prob", help="'prob': P(g > safe_threshold) ≥ target; 'mean': E[g] ≥ target (over selected responses)"
    )
    target: float | None = help_field(None, help="constraint target; None = no constrained best-of-n")
    safe_threshold: float = help_field(0.0, help="a response counts as safe when g > safe_threshold")
    calibration_fraction: float = help_field(
        0.5,
        help="fraction of the prompts (seeded random subset) on which λ is calibrated; the rest is held out "
        "(unused with calibration_split)",
    )
    calibration_split: str | None = help_field(
        None,
        help="calibrate λ on this split of the prompts file instead (e.g. 'train' or 'validation'); every prompt "
        "of prompts_split is then held out, and all reported rows are on prompts_split",
    )
    calibration_max_prompts: PositiveInt | None = help_field(
        None, help="use the first N prompts of calibration_split only"
    )
    confidence: float = help_field(
        0.9,
        help="λ must meet the target with this one-sided confidence: a lower confidence bound of the calibration "
        "statistic (see bound; C calibration, H held-out prompts) must reach it, so the held-out statistic meets "
        "the target with at least about this probability; 0.5 = the point estimate (no margin)",
    )
    bound: Bound = help_field(
        "auto",
        help="the lower bound λ must meet: wilson = Wilson score bound at n_eff = 1/(1/C + 1/H) prompts (for "
        "'prob'; conservative), t = m − t_{C−1}·s·√(1/C + 1/H), normal = m − z·s·√(1/C + 1/H) (the former rule: "
        "anti-conservative for few prompts and proportions near 0 or 1); auto = wilson for 'prob', t for 'mean'",
    )
    oracle: str | None = help_field(
        None,
        help="gold oracle (sacpo.scoring) reported for every selection, e.g. toyworld; None = scorers only",
    )
    seed: Seed = help_field(0, help="sampling seed; also the tie-break keys and the calibration split")
    max_new_tokens: PositiveInt = help_field(64, help="response length limit (tokens)")
    max_prompt_length: PositiveInt = help_field(256, help="prompts are left-truncated to this many tokens")
    system_prompt: str | None = help_field(None, help=SYSTEM_PROMPT_HELP)
    chat_template: str | None = help_field(None, help=CHAT_TEMPLATE_HELP)
    batch_size: PositiveInt = help_field(
        4, help="prompts per generate call (each call draws batch_size·n_samples·(max(ns)+1) sequences)"
    )
    logp_batch_size: PositiveInt = help_field(64, help="sequences per base log-prob forward pass")
    n_boot: PositiveInt = help_field(
        1000, help="bootstrap resamples of prompts for the win-rate CIs in results.json"
    )
    device: Device | None = help_field(None, help="cpu | cuda | cuda:N …; None or auto = cuda when available")

    def __post_init__(self) -> None:  # cross-field checks; types, bounds and choices are declared above
        if self.calibration_split is not None and self.calibration_split == self.prompts_split:
            raise ConfigError(
                f"calibration_split {self.calibration_split!r} is prompts_split: calibrate on other prompts"
            )
        if self.target is not None:
            if self.safety is None:
                raise ConfigError("a constraint target needs a safety scorer (safety=...)")
            if self.calibration_split is None and not 0.0 < self.calibration_fraction < 1.0:
                raise ConfigError(
                    f"calibration_fraction must be in (0, 1) with a constraint, got {self.calibration_fraction}"
                )
            if not 0.5 <= self.confidence < 1.0:
                raise ConfigError(f"confidence must be in [0.5, 1), got {self.confidence}")
            if self.bound == "wilson" and self.constraint != "prob":
                raise ConfigError("bound 'wilson' is for probabilities: use it with constraint 'prob'")
            if self.constraint == "prob" and not 0.0 <= self.target <= 1.0:
                raise ConfigError(f"a probability target must be in [0, 1], got {self.target}")
        if self.oracle is not None and self.oracle not in oracle_names():
            raise ConfigError(f"unknown oracle {self.oracle!r}; valid: {', '.join(oracle_names())}")
        self.prompt_format()  # a chat_template that is neither a template nor a file fails here

    def prompt_format(self) -> PromptFormat:
        """The run's `PromptFormat` (a chat_template file is read here)."""
        return PromptFormat.from_fields(self.system_prompt, self.chat_template)

    @property
    def constrained(self) -> bool:
        return self.safety is not None and self.target is not None
