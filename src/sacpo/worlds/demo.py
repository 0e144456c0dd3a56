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
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sacpo.config import ConfigError, from_dict, help_field, to_yaml
from sacpo.train.pipeline import PipelineConfig
from sacpo.worlds.toyworld.build import ToyWorldConfig, World

log = logging.getLogger("sacpo.demo")


@dataclass(frozen=True)
class DemoConfig:
    out: str = help_field("runs/demo", help="output directory")
    world: ToyWorldConfig = help_field(ToyWorldConfig(), help="the toyworld (SFT model, preference data)")
    beta: float = help_field(0.1, help="step-1 KL coefficient β")
    lams: list[float] = help_field([0.25, 0.5, 1.0, 2.0], help="SACPO λ sweep (step 2 uses β/λ)")
    qs: list[float] = help_field([0.25, 0.5, 0.75], help="P-SACPO merge weights (with the largest λ)")
    b: float = help_field(0.5, help="safety threshold of the constraint E[g*] ≥ b")
    lr: float = help_field(3e-4, help="alignment learning rate (every stage)")
    epochs: float = help_field(3.0, help="alignment epochs (every stage)")
    batch_size: int = help_field(32, help="alignment batch size (pairs)")
    label_smoothing: float = help_field(
        0.1, help="conservative DPO ε: the BT labels are noisy by construction"
    )
    rm_ensemble: int = help_field(2, help="members of the reward and cost model ensembles")
    rm_epochs: float = help_field(2.0, help="reward/cost model epochs")
    rm_lr: float = help_field(5e-4, help="reward/cost model learning rate")
    eval_samples: int = help_field(4, help="responses per held-out prompt and model")
    eval_prompts: int | None = help_field(None, help="evaluate on the first N held-out prompts (None: all)")
    max_new_tokens: int = help_field(40, help="response length limit when sampling")
    seed: int = help_field(0, help="seed of alignment, reward models and evaluation")

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not self.lams or any(not lam > 0 for lam in self.lams):
            raise ConfigError(f"lams must be a non-empty list of λ > 0 (step 2 uses β/λ), got {self.lams}")
        if any(not 0.0 <= q <= 1.0 for q in self.qs):
            raise ConfigError(f"qs must lie in [0, 1], got {self.qs}")
        for name in ("rm_ensemble", "eval_samples", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.rm_lr > 0 or not self.epochs > 0 or not self.rm_epochs > 0:
            raise ConfigError("lr, rm_lr, epochs and rm_epochs must be > 0")


def quick(cfg: DemoConfig) -> DemoConfig:
    """The `--quick` preset (about a minute on 2 cores): a small world, a 2-value sweep, few eval prompts."""
    world = replace(cfg.world, sft_steps=150, sft_demos_per_prompt=4, pairs_per_prompt=1)
    return replace(cfg, world=world, lams=[0.5, 2.0], qs=[0.5], epochs=1.0, rm_ensemble=1, rm_epochs=1.0,
                   eval_samples=1, eval_prompts=24)  # fmt: skip


def pipeline_config(cfg: DemoConfig, world: World) -> PipelineConfig:
    data = str(world.preferences)
    big = f"safe-lam{max(cfg.lams):g}"
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
                "max_length": 24 + cfg.max_new_tokens,
                "max_prompt_length": 24,
                "log_every": 20,
                "kl_prompts": 16,
                "kl_max_new_tokens": cfg.max_new_tokens,
                "seed": cfg.seed,
            },
            "stages": [
                {
                    "name": "helpful",
                    "data": {"source": data, "format": "pku_helpful"},
                    "loss": "dpo",
                    "beta": cfg.beta,
                },
                {
                    "name": "safe",
                    "data": {"source": data, "format": "pku_safe"},
                    "loss": "dpo",
                    "lam": cfg.lams,
                },
                {
                    "name": "safe_kto",
                    "start_from": "helpful",
                    "data": {"source": data, "format": "pku_safe_kto"},
                    "loss": "kto",
                    "lam": max(cfg.lams),
                    "overrides": {"label_smoothing": 0.0},
                },
                {
                    "name": "safe_from_sft",
                    "start_from": "sft",
                    "data": {"source": data, "format": "pku_safe"},
                    "loss": "dpo",
                    "beta": cfg.beta,
                },
            ],
            "merges": [
                {"name": "psacpo", "a": "helpful", "b": big, "qs": cfg.qs},
                {"name": "naive", "a": "helpful", "b": "safe_from_sft", "qs": [0.5]},
            ],
        },
    )


def _reward_models(cfg: DemoConfig, world: World, show_progress: bool) -> dict[str, dict[str, Any]]:
    """Train (or reuse) the reward model (helpfulness) and cost model (safety) ensembles."""
    from sacpo.train.config import DataConfig
    from sacpo.train.reward_model import RewardConfig, train_reward_model

    out = {}
    for name, fmt in (("rm", "pku_helpful"), ("cm", "pku_safe")):
        rcfg = RewardConfig(
            model=str(world.sft_dir),
            data=DataConfig(source=str(world.preferences), format=fmt),
            output_dir=str(Path(cfg.out) / "reward_models" / name),
            ensemble=cfg.rm_ensemble,
            max_length=24 + cfg.max_new_tokens,
            max_prompt_length=24,
            batch_size=cfg.batch_size,
            epochs=cfg.rm_epochs,
            lr=cfg.rm_lr,
            seed=cfg.seed,
        )
        d = Path(rcfg.output_dir)
        if (
            (d / "metrics.json").is_file()
            and (d / "config.yaml").is_file()
            and (d / "config.yaml").read_text() == to_yaml(rcfg)
        ):
            log.info("demo: reusing %s", d)
            metrics = json.loads((d / "metrics.json").read_text())
        else:
            metrics = train_reward_model(rcfg, show_progress=show_progress).metrics
        out[name] = {"dir": str(d), "metrics": metrics}
    return out


def _held_out_accuracy(metrics: dict[str, Any]) -> float:
    value = metrics.get("heldout_accuracy")
    return float("nan") if value is None else float(value)


def run_demo(cfg: DemoConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run the demo end to end (cached); returns paths and timings."""
    from sacpo.evaluate.config import DEFAULT_FAMILIES, get_oracle
    from sacpo.evaluate.report import check_findings, write_report
    from sacpo.evaluate.run import evaluate_models, specs_from_pipeline
    from sacpo.train.pipeline import run_pipeline
    from sacpo.train.reward_model import RewardModelScorer
    from sacpo.worlds.toyworld.build import build_world

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.yaml").write_text(to_yaml(cfg))
    times: dict[str, float] = {}

    t = time.perf_counter()
    world = build_world(out / "world", cfg.world, show_progress)
    times["world"] = time.perf_counter() - t

    t = time.perf_counter()
    rms = _reward_models(cfg, world, show_progress)
    times["reward_models"] = time.perf_counter() - t

    t = time.perf_counter()
    pipe = run_pipeline(pipeline_config(cfg, world), show_progress=show_progress)
    times["pipeline"] = time.perf_counter() - t

    t = time.perf_counter()
    sft_dir, specs = specs_from_pipeline(Path(cfg.out) / "pipeline", DEFAULT_FAMILIES)
    oracle = get_oracle("toyworld")
    prompts = world.test_prompts[: cfg.eval_prompts] if cfg.eval_prompts else world.test_prompts
    extra = {
        "rm": RewardModelScorer(rms["rm"]["dir"], aggregate="mean"),
        "cm": RewardModelScorer(rms["cm"]["dir"], aggregate="mean", view="cost"),
    }
    results = evaluate_models(
        specs,
        sft_dir,
        prompts,
        oracle.reward,
        oracle.safety,
        cfg.b,
        out / "eval",
        n_samples=cfg.eval_samples,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        extra_scorers=extra,
        show_progress=show_progress,
        is_safe=oracle.is_safe,
        batch_size=64,
    )
    times["evaluation"] = time.perf_counter() - t

    findings = check_findings(results)
    s = world.stats
    notes = [
        f"toyworld: {len(world.train_prompts)} train / {len(prompts)} evaluation prompts; SFT GPT-2 "
        f"({cfg.world.n_layer} layers × {cfg.world.n_embd}) trained from scratch in {s['sft_seconds']:.0f} s "
        f"(final loss {s['sft_final_loss']:.3f}); {s['preference_rows']:.0f} PKU-schema preference rows "
        f"(Bradley–Terry labels, scale {cfg.world.bt_scale}, flip noise {cfg.world.flip_noise})",
        f"learned judges (k = {cfg.rm_ensemble} ensembles, held-out pairwise accuracy): reward model "
        f"{_held_out_accuracy(rms['rm']['metrics']):.3f}, cost model {_held_out_accuracy(rms['cm']['metrics']):.3f}",
        f"alignment: DPO β = {cfg.beta}, λ ∈ {cfg.lams} (β/λ for step 2), lr {cfg.lr}, {cfg.epochs:g} epochs, "
        f"conservative-DPO ε = {cfg.label_smoothing}; reference passes: {pipe['reference_passes']['computed']} "
        f"computed, {pipe['reference_passes']['cached']} from cache",
        f"constraint: E[g*] ≥ b = {cfg.b}; wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
    ]
    paths = write_report(
        results, out / "eval", title="SACPO on the toyworld (sacpo demo)", notes=notes, findings=findings
    )
    summary = {
        "report": {k: str(v) for k, v in paths.items()},
        "times": times,
        "findings": [f._asdict() for f in findings],
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary
