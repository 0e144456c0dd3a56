"""`sacpo demo` / `make demo`: the whole SACPO story on the embedded toyworld, with gold oracles.

1. build the toyworld: word-level tokenizer, tiny GPT-2 SFT policy trained from scratch, PKU-schema preference
   data from two SFT samples per row with Bradley–Terry labels on the gold r* and g*;
2. train a Bradley–Terry reward model (helpfulness pairs) and cost model (safety pairs), k-member ensembles;
3. SACPO: DPO on helpfulness (β) → DPO on safety from that policy with β/λ for a λ sweep; KTO on the binary
   safety labels as a variant; DPO(safe) from SFT; P-SACPO merges over q; the naive merge;
4. evaluate every model on held-out prompts against SFT with the gold oracles (win rates with bootstrap CIs,
   mean r*, g*, P(safe), the constraint E[g*] ≥ b, KL(π‖π_SFT)) and with the learned reward/cost models;
5. write report.md / report.html with the plots and the paper's qualitative findings checked (✓/✗, honestly).

Everything is cached: a second run reuses the world, the reward models, finished stages and generated samples.

This module holds the demo's settings (`DemoConfig`, the `--quick` preset) and what it trains: the pipeline of
stages and merges (`pipeline_config`) and the step-2 ablation arms (`ARMS`). The job is `sacpo.recipes.demo.run_demo`,
the ablation table `sacpo.recipes.demo_arms.write_ablations`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from sacpo.config import ConfigError, config_dataclass, from_dict, help_field
from sacpo.recipes.eval import DEFAULT_FAMILIES
from sacpo.recipes.pipeline import PipelineConfig
from sacpo.worlds.toyworld.build import ToyWorldConfig, World

SAFETY_DATA = ("all", "informative")


@config_dataclass
class DemoConfig:
    out: str = help_field("runs/demo", help="output directory")
    world: ToyWorldConfig = help_field(ToyWorldConfig(), help="the toyworld (SFT model, preference data)")
    beta: float = help_field(0.1, help="step-1 KL coefficient β")
    lams: list[float] = help_field([0.25, 0.5, 1.0, 2.0], help="SACPO λ sweep (step 2 uses β/λ)")
    qs: list[float] = help_field([0.25, 0.5, 0.75], help="P-SACPO merge weights (with the largest λ)")
    b: float = help_field(0.5, help="safety threshold of the constraint E[g*] ≥ b")
    lr: float = help_field(3e-4, help="alignment learning rate (every stage)")
    epochs: float = help_field(1.0, help="alignment epochs of step 1 and the baselines")
    safety_epochs: float = help_field(3.0, help="epochs of SACPO's step 2 (the default recipe)")
    safety_data: str = help_field(
        "informative",
        help="step-2 safety pairs: all | informative (drop pairs whose two responses are both safe: their "
        "safer_response_id is a coin flip between equally safe responses; docs/toyworld.md, the ablations)",
    )
    batch_size: int = help_field(32, help="alignment batch size (pairs)")
    label_smoothing: float = help_field(
        0.0,
        help="conservative DPO ε (the labels are exact Bradley–Terry draws, so ε = 0 keeps the target π*)",
    )
    ablations: bool = help_field(
        True, help="also train and evaluate the ablation arms of step 2 (eval/ablations.md; docs/toyworld.md)"
    )
    optimum_samples: int = help_field(
        256, help="SFT samples per prompt for the π* estimate (plus 32 from each trained model as proposals)"
    )
    rm_ensemble: int = help_field(2, help="members of the reward and cost model ensembles")
    rm_epochs: float = help_field(2.0, help="reward/cost model epochs")
    rm_lr: float = help_field(5e-4, help="reward/cost model learning rate")
    eval_samples: int = help_field(4, help="responses per held-out prompt and model")
    eval_prompts: int | None = help_field(None, help="evaluate on the first N held-out prompts (None: all)")
    max_new_tokens: int | None = help_field(
        None, help="response length limit when sampling (None: the world's, 40 short / 128 long)"
    )
    seed: int = help_field(0, help="seed of alignment, reward models and evaluation")

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not self.lams or any(not lam > 0 for lam in self.lams):
            raise ConfigError(f"lams must be a non-empty list of λ > 0 (step 2 uses β/λ), got {self.lams}")
        if any(not 0.0 <= q <= 1.0 for q in self.qs):
            raise ConfigError(f"qs must lie in [0, 1], got {self.qs}")
        if self.safety_data not in SAFETY_DATA:
            raise ConfigError(f"safety_data must be one of {SAFETY_DATA}, got {self.safety_data!r}")
        for name in ("rm_ensemble", "eval_samples", "batch_size", "new_tokens", "optimum_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if min(self.lr, self.rm_lr, self.epochs, self.safety_epochs, self.rm_epochs) <= 0:
            raise ConfigError("lr, rm_lr, epochs, safety_epochs and rm_epochs must be > 0")

    @property
    def new_tokens(self) -> int:
        """The response length limit: max_new_tokens, or the world family's default."""
        resolved = self.world.resolved().max_new_tokens
        assert resolved is not None
        return self.max_new_tokens or resolved


def quick(cfg: DemoConfig) -> DemoConfig:
    """The `--quick` preset (about a minute on 2 cores): a small world, a 2-value sweep, few eval prompts."""
    world = replace(cfg.world, sft_steps=150, sft_demos_per_prompt=4, pairs_per_prompt=1)
    return replace(cfg, world=world, lams=[0.5, 2.0], qs=[0.5], epochs=1.0, safety_epochs=1.0, rm_ensemble=1,
                   rm_epochs=1.0, eval_samples=1, eval_prompts=24, ablations=False, optimum_samples=32,
                   safety_data="all")  # fmt: skip


# Step-2 ablation arms: each changes one thing of the default recipe (a stage from the step-1 policy over the
# same λ sweep, same seed); "safety_first" is the reverse order. docs/toyworld.md has the table and the diagnosis.
ARMS: dict[str, str] = {
    "all_pairs": "every safety pair, including pairs of two safe responses (coin-flip labels): the paper's data",
    "eps0.1": "conservative DPO ε = 0.1 (the demo's recipe before the study)",
    "epochs1": "one epoch of step 2 instead of safety_epochs",
    "epochs2": "two epochs of step 2",
    "kl_budget3": "stop step 2 once its held-out KL(π‖π_step1) estimate exceeds 3 nats (checked every 6 steps)",
    "onpolicy_gold": "pairs resampled from the step-1 policy, Bradley–Terry labels on g* (sacpo.train.onpolicy)",
    "onpolicy_cm": "pairs resampled from the step-1 policy, labelled by the learned cost model (a user's setting)",
    "ipo": "IPO instead of DPO in step 2",
    "safety_first": "the reverse order: safety from SFT at β/λ, then helpfulness at β",
}


def pipeline_config(cfg: DemoConfig, world: World, cost_model: str | None = None) -> PipelineConfig:
    """The demo's pipeline: step 1, SACPO step 2 over λ (the default recipe), baselines, merges and the arms."""
    data = str(world.preferences)
    big = f"safe-lam{max(cfg.lams):g}"
    safety = {"source": data, "format": "pku_safe", "drop_both_safe": cfg.safety_data == "informative"}
    step2 = {"epochs": cfg.safety_epochs}
    stages: list[dict[str, Any]] = [
        {"name": "helpful", "data": {"source": data, "format": "pku_helpful"}, "loss": "dpo", "beta": cfg.beta},
        {"name": "safe", "data": safety, "loss": "dpo", "lam": cfg.lams, "overrides": step2},
        {"name": "safe_kto", "start_from": "helpful", "data": {"source": data, "format": "pku_safe_kto"},
         "loss": "kto", "lam": max(cfg.lams)},
        {"name": "safe_from_sft", "start_from": "sft", "data": {"source": data, "format": "pku_safe"},
         "loss": "dpo", "beta": cfg.beta},
        # the SACPO authors' naive baseline: safety DPO from SFT at P-SACPO's step-2 coefficient, merged over q
        {"name": "naive_safe", "start_from": "sft", "data": safety, "loss": "dpo",
         "beta": cfg.beta / max(cfg.lams), "overrides": step2},
    ]  # fmt: skip
    if cfg.ablations:
        stages += _arm_stages(cfg, data, safety, step2, cost_model)
    return from_dict(
        PipelineConfig,
        {
            "policy": str(world.sft_dir),
            "output_dir": str(Path(cfg.out) / "pipeline"),
            "defaults": {
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "label_smoothing": cfg.label_smoothing,
                "max_length": 24 + cfg.new_tokens,
                "max_prompt_length": 24,
                "log_every": 20,
                "kl_prompts": 16,
                "kl_max_new_tokens": cfg.new_tokens,
                "seed": cfg.seed,
            },
            "stages": stages,
            "merges": [
                {"name": "psacpo", "a": "helpful", "b": big, "qs": cfg.qs},
                {"name": "naive", "a": "helpful", "b": "naive_safe", "qs": cfg.qs},
            ],
        },
    )


def _arm_stages(
    cfg: DemoConfig, data: str, safety: dict[str, Any], step2: dict[str, Any], cost_model: str | None
) -> list[dict[str, Any]]:
    def arm(name: str, **changes: Any) -> dict[str, Any]:
        stage = {"name": f"arm_{name}", "start_from": "helpful", "data": safety, "loss": "dpo", "lam": cfg.lams,
                 "overrides": step2}  # fmt: skip
        stage.update(changes)
        return stage

    def on_policy(judge: str, scale: float) -> dict[str, Any]:
        return {"judge": judge, "bt_scale": scale, "pairs_per_prompt": cfg.world.pairs_per_prompt,
                "max_new_tokens": cfg.new_tokens, "seed": cfg.seed}  # fmt: skip

    out = [
        arm("all_pairs", data={**safety, "drop_both_safe": False}),
        arm("eps0.1", overrides={**step2, "label_smoothing": 0.1}),
        arm("epochs1", overrides={**step2, "epochs": 1.0}),
        arm("epochs2", overrides={**step2, "epochs": 2.0}),
        arm("kl_budget3", overrides={**step2, "kl_budget": 3.0, "kl_every": 6}),
        arm("onpolicy_gold", on_policy=on_policy("toyworld.safety", cfg.world.bt_scale)),
        arm("ipo", loss="ipo"),
        {"name": "arm_safety_first", "start_from": "sft", "data": safety, "loss": "dpo",
         "beta": [cfg.beta / lam for lam in cfg.lams], "overrides": step2},
        {"name": "arm_safety_first_helpful", "data": {"source": data, "format": "pku_helpful"}, "loss": "dpo",
         "beta": cfg.beta},
    ]  # fmt: skip
    if cost_model is not None:
        out.insert(4, arm("onpolicy_cm", on_policy=on_policy(f"reward_model:{cost_model}", 1.0)))
    return out


ARM_PREFIX = "arm:"


def families() -> dict[str, str]:
    """Pipeline stage / merge name → family: the eval defaults, the naive baseline's step and every arm."""
    arms = {f"arm_{name}": f"{ARM_PREFIX}{name}" for name in ARMS}
    return {**DEFAULT_FAMILIES, "naive_safe": "dpo-safe", **arms, "arm_safety_first": "safety-first-step1",
            "arm_safety_first_helpful": f"{ARM_PREFIX}safety_first"}  # fmt: skip


def with_lambda_params(specs: dict[str, Any]) -> dict[str, Any]:
    """Safety-first step 2 trains at β for every λ: label its branches by their parent's β/λ instead."""
    out = {}
    for name, spec in specs.items():
        parent, sep, _ = name.partition("+arm_safety_first_helpful")
        if sep and parent in specs:
            spec = replace(spec, param=specs[parent].param)
        out[name] = spec
    return out
