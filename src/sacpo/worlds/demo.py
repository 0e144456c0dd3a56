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
from sacpo.recipes.pipeline import PipelineConfig
from sacpo.worlds.toyworld.build import ToyWorldConfig, World

log = logging.getLogger("sacpo.demo")

SAFETY_DATA = ("all", "informative")


@dataclass(frozen=True)
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
    max_new_tokens: int = help_field(40, help="response length limit when sampling")
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
        for name in ("rm_ensemble", "eval_samples", "batch_size", "max_new_tokens", "optimum_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if min(self.lr, self.rm_lr, self.epochs, self.safety_epochs, self.rm_epochs) <= 0:
            raise ConfigError("lr, rm_lr, epochs, safety_epochs and rm_epochs must be > 0")


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
                "max_length": 24 + cfg.max_new_tokens,
                "max_prompt_length": 24,
                "log_every": 20,
                "kl_prompts": 16,
                "kl_max_new_tokens": cfg.max_new_tokens,
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
                "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}  # fmt: skip

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


ARM_PREFIX = "arm:"


def _families() -> dict[str, str]:
    from sacpo.evaluate.config import DEFAULT_FAMILIES

    arms = {f"arm_{name}": f"{ARM_PREFIX}{name}" for name in ARMS}
    return {**DEFAULT_FAMILIES, "naive_safe": "dpo-safe", **arms, "arm_safety_first": "safety-first-step1",
            "arm_safety_first_helpful": f"{ARM_PREFIX}safety_first"}  # fmt: skip


def _with_lambda_params(specs: dict[str, Any]) -> dict[str, Any]:
    """Safety-first step 2 trains at β for every λ: label its branches by their parent's β/λ instead."""
    out = {}
    for name, spec in specs.items():
        parent, sep, _ = name.partition("+arm_safety_first_helpful")
        if sep and parent in specs:
            spec = replace(spec, param=specs[parent].param)
        out[name] = spec
    return out


def run_demo(cfg: DemoConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run the demo end to end (cached); returns paths and timings."""
    from sacpo.evaluate.optimum import estimate_optimum, sample_pool
    from sacpo.evaluate.report import check_findings, write_report
    from sacpo.evaluate.run import RESULTS_FILE, evaluate_models, save_results, specs_from_pipeline
    from sacpo.recipes.pipeline import run_pipeline
    from sacpo.scoring import get_oracle
    from sacpo.scoring.reward_model import RewardModelScorer
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
    pipe = run_pipeline(pipeline_config(cfg, world, rms["cm"]["dir"]), show_progress=show_progress)
    times["pipeline"] = time.perf_counter() - t

    t = time.perf_counter()
    sft_dir, specs = specs_from_pipeline(Path(cfg.out) / "pipeline", _families())
    specs = _with_lambda_params(specs)
    oracle = get_oracle("toyworld")
    prompts = world.test_prompts[: cfg.eval_prompts] if cfg.eval_prompts else world.test_prompts
    extra = {
        "rm": RewardModelScorer(rms["rm"]["dir"], aggregate="mean"),
        "cm": RewardModelScorer(rms["cm"]["dir"], aggregate="mean", view="cost"),
    }
    evaluated = evaluate_models(
        {k: v for k, v in specs.items() if v.family != "safety-first-step1"},
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
        clusters=oracle.cluster,
    )
    times["evaluation"] = time.perf_counter() - t

    # the target: π*_λ from the gold oracles, pooled over SFT samples and the trained models as proposals
    t = time.perf_counter()
    proposals = {k: v.dir for k, v in specs.items() if v.family in ("dpo-helpful", "dpo-safe", "sacpo")}
    pool = sample_pool(
        sft_dir, prompts, oracle.reward, oracle.safety, out / "eval" / "optimum", proposals,
        n_sft=cfg.optimum_samples, n_proposal=32, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
        is_safe=oracle.is_safe, show_progress=show_progress,
    )  # fmt: skip
    clusters = [oracle.cluster(p) for p in prompts]
    optimum = [
        pt.metrics
        for pt in estimate_optimum(
            pool,
            cfg.lams,
            cfg.beta,
            cfg.world.bt_scale,
            len(prompts),
            b=cfg.b,
            seed=cfg.seed,
            clusters=clusters,
        )
    ]
    times["optimum"] = time.perf_counter() - t

    main = [m for m in evaluated if not m.family.startswith(ARM_PREFIX)] + optimum
    # results.json holds what the report shows (so `sacpo report` rebuilds it, π* included); the arms go apart
    save_results(main, out / "eval" / RESULTS_FILE)
    if cfg.ablations:
        save_results(
            [m for m in evaluated if m.family.startswith(ARM_PREFIX)], out / "eval" / "ablations.json"
        )
    findings = check_findings(main, b=cfg.b)
    ablation_md = None
    if cfg.ablations:
        ablation_md = write_ablations(
            evaluated, optimum, specs, list(prompts), cfg, out / "eval" / "ablations.md"
        )
    s = world.stats
    notes = [
        f"toyworld: {len(world.train_prompts)} train / {len(prompts)} evaluation prompts; SFT GPT-2 "
        f"({cfg.world.n_layer} layers × {cfg.world.n_embd}) trained from scratch in {s['sft_seconds']:.0f} s "
        f"(final loss {s['sft_final_loss']:.3f}); {s['preference_rows']:.0f} PKU-schema preference rows "
        f"(Bradley–Terry labels, scale {cfg.world.bt_scale}, flip noise {cfg.world.flip_noise})",
        f"learned judges (k = {cfg.rm_ensemble} ensembles, held-out pairwise accuracy): reward model "
        f"{_held_out_accuracy(rms['rm']['metrics']):.3f}, cost model {_held_out_accuracy(rms['cm']['metrics']):.3f}",
        f"alignment: DPO β = {cfg.beta} ({cfg.epochs:g} epochs), λ ∈ {cfg.lams} (β/λ for step 2, "
        f"{cfg.safety_epochs:g} epochs on {cfg.safety_data} safety pairs), lr {cfg.lr}, conservative-DPO ε = "
        f"{cfg.label_smoothing}; naive merge: DPO(safe) from SFT at β/λ_max merged with step 1 over q ∈ {cfg.qs}; "
        f"reference passes: {pipe['reference_passes']['computed']} computed, {pipe['reference_passes']['cached']} "
        "from cache",
        f"π*_λ ∝ π_SFT·exp(s·(r* + λg*)/β), s = {cfg.world.bt_scale}: self-normalised importance sampling over "
        f"{cfg.optimum_samples} SFT samples per prompt + 32 from each of {len(proposals)} trained models "
        "(balance-heuristic mixture; sacpo.evaluate.optimum)",
        f"constraint: E[g*] ≥ b = {cfg.b}, judged on the one-sided 95% lower bound; wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
    ]
    if ablation_md is not None:
        notes.append(
            f"step-2 ablation arms (same seed, every λ): {ablation_md.name}; diagnosis in docs/toyworld.md"
        )
    paths = write_report(
        main, out / "eval", title="SACPO on the toyworld (sacpo demo)", notes=notes, findings=findings
    )
    summary = {
        "report": {k: str(v) for k, v in paths.items()},
        "times": times,
        "findings": [f._asdict() for f in findings],
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary


def garbage_share(responses: list[str]) -> float:
    """Share of the toyworld sentences in the responses that parse as nothing (garbled text)."""
    from sacpo.worlds.toyworld.oracle import parse

    kinds = [k for y in responses for k in parse(y).kinds]
    return sum(k == "garbage" for k in kinds) / len(kinds) if kinds else float("nan")


def _train_logratios(model_dir: str | Path | None) -> tuple[float, float, float]:
    """From a trained stage's summary.json: mean log π/π_ref of the chosen and rejected training responses (the
    DPO implicit rewards divided by β) and the held-out KL(π‖π_ref) on the policy's own samples."""
    nan = float("nan")
    summary = Path(model_dir).parent / "summary.json" if model_dir is not None else None
    if summary is None or not summary.is_file():
        return nan, nan, nan
    import yaml

    final = json.loads(summary.read_text()).get("final", {})
    config = Path(model_dir).parent / "config.yaml"
    beta = yaml.safe_load(config.read_text()).get("beta") if config.is_file() else None
    if not beta or "rewards/chosen" not in final:
        return nan, nan, final.get("eval/kl", nan)
    return final["rewards/chosen"] / beta, final["rewards/rejected"] / beta, final.get("eval/kl", nan)


def _by_kind(values: list[float] | None, harmful: list[bool], want: bool) -> float:
    if not values:
        return float("nan")
    picked = [v for v, h in zip(values, harmful, strict=True) if h == want]
    return sum(picked) / len(picked) if picked else float("nan")


def write_ablations(
    evaluated: list[Any],
    optimum: list[Any],
    specs: dict[str, Any],
    prompts: list[str],
    cfg: DemoConfig,
    path: Path,
) -> Path:
    """eval/ablations.md: the default recipe and every arm at every λ, against π*_λ (same seed, same prompts).

    Besides the gold scores: E[r*] and KL on the benign prompts alone (where every safe response has the same g*,
    so π*_λ equals the step-1 optimum and step 2 should change nothing), the mean log-ratio log π/π_ref of the
    chosen and rejected *training* responses next to the KL on the policy's *own* samples (how far the policy
    moved where the pairs do not look), and the share of garbled sentences.
    """
    from sacpo.evaluate.generate import read_samples
    from sacpo.evaluate.metrics import objective_gain
    from sacpo.evaluate.run import safe_name
    from sacpo.worlds.toyworld.language import task_of

    harmful = [task_of(p).harmful for p in prompts]
    sft = next(m for m in evaluated if m.family == "sft")
    opt = {round(cfg.beta / m.param, 6): m for m in optimum}
    header = (
        "| arm | λ | E[r*] | E[r*] benign | E[g*] (95% LCB) | P(safe) | KL(π‖π_SFT) | KL benign / harmful "
        "| train pairs log π/π_ref: chosen / rejected | KL(π‖π_ref) own samples | garbled | degenerate "
        "| J gain vs π* |"
    )
    lines = [
        "# Step-2 ablations (sacpo demo)",
        "",
        "Each arm changes one thing of the default recipe (SACPO step 2 from the same step-1 policy, same seed, "
        "every λ). J gain = (J(π) − J(SFT)) / (J(π*) − J(SFT)) with J = E[r*] + λE[g*] − (β/s)·KL. 'benign': the "
        "prompts of benign tasks, where π*_λ is the step-1 optimum for every λ (all safe responses have the same "
        "g*). 'train pairs': the mean log-ratio of the chosen / rejected training responses at the end of step 2; "
        "'own samples': the held-out KL to the step-1 reference on the policy's own samples (training log). "
        "'garbled': share of sentences that parse as nothing; 'degenerate': share of samples with a word repeated "
        "three times in a row.",
        "",
        *[f"- **{name}**: {text}" for name, text in ARMS.items()],
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for m in evaluated:
        if not (m.family == "sacpo" or m.family.startswith(ARM_PREFIX)) or m.param is None:
            continue
        arm = "default" if m.family == "sacpo" else m.family[len(ARM_PREFIX) :]
        lam = round(cfg.beta / m.param, 6)
        responses = [
            r.response for r in read_samples(path.parent / "samples" / safe_name(m.name) / "samples.jsonl")
        ]
        gain = float("nan")
        if lam in opt:
            o = opt[lam]
            gain = objective_gain(
                (m.mean_reward, m.mean_safety, m.kl), (sft.mean_reward, sft.mean_safety),
                (o.mean_reward, o.mean_safety, o.kl), lam, cfg.beta, cfg.world.bt_scale,
            ).fraction  # fmt: skip
        chosen, rejected, own = _train_logratios(specs[m.name].dir)
        per = m.per_prompt or {}
        lines.append(
            f"| {arm} | {lam:g} | {m.mean_reward:.3f} | {_by_kind(per.get('reward'), harmful, False):.3f} "
            f"| {m.mean_safety:.3f} ({m.safety_lcb:.3f}) | {m.p_safe:.3f} | {m.kl:.2f} "
            f"| {_by_kind(per.get('kl'), harmful, False):.2f} / {_by_kind(per.get('kl'), harmful, True):.2f} "
            f"| {chosen:+.2f} / {rejected:+.2f} | {own:.2f} | {garbage_share(responses):.3f} "
            f"| {m.degenerate_share:.3f} | {gain:.2f} |"
        )
    for o in optimum:
        per = o.per_prompt or {}
        lines.append(
            f"| π* (target) | {cfg.beta / o.param:g} | {o.mean_reward:.3f} "
            f"| {_by_kind(per.get('reward'), harmful, False):.3f} | {o.mean_safety:.3f} | {o.p_safe:.3f} "
            f"| {o.kl:.2f} | {_by_kind(per.get('kl'), harmful, False):.2f} / "
            f"{_by_kind(per.get('kl'), harmful, True):.2f} | – | – | – | – | 1 |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
