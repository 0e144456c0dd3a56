"""`sacpo demo` / `make demo`: the whole SACPO story on the embedded toyworld, with gold oracles (the steps and the
settings: `sacpo.recipes.demo_config`).

    world → reward / cost models → pipeline (SACPO, baselines, merges, ablation arms) → evaluation against SFT
    → π*_λ from the gold oracles → results.json, report.md / report.html, ablations.md, demo.json

Everything is cached: a second run reuses the world, the reward models, finished stages and generated samples.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sacpo.config import to_yaml
from sacpo.data.records import Prompt
from sacpo.evaluate.findings import check_findings
from sacpo.evaluate.metrics import ModelMetrics
from sacpo.evaluate.optimum import estimate_optimum, sample_pool
from sacpo.evaluate.report import write_report
from sacpo.evaluate.run import RESULTS_FILE, ModelSpec, evaluate_models, save_results, specs_from_pipeline
from sacpo.fsutil import atomic_write_text
from sacpo.recipes.demo_arms import write_ablations
from sacpo.recipes.demo_config import ARM_PREFIX, DemoConfig, families, pipeline_config, with_lambda_params
from sacpo.recipes.pipeline import run_pipeline
from sacpo.scoring import Oracle, get_oracle
from sacpo.scoring.reward_model import RewardModelScorer
from sacpo.worlds.toyworld.build import World, build_world

log = logging.getLogger("sacpo.demo")


def run_demo(cfg: DemoConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run the demo end to end (cached); returns paths, timings and the findings (also written to demo.json)."""
    out = Path(cfg.out)
    atomic_write_text(out / "demo.yaml", to_yaml(cfg))
    times: dict[str, float] = {}
    with _timed(times, "world"):
        world = build_world(out / "world", cfg.world, show_progress)
    with _timed(times, "reward_models"):
        rms = _reward_models(cfg, world, show_progress)
    with _timed(times, "pipeline"):
        pipe = run_pipeline(pipeline_config(cfg, world, rms["cm"]["dir"]), show_progress=show_progress)
    with _timed(times, "evaluation"):
        sft_dir, specs = specs_from_pipeline(Path(cfg.out) / "pipeline", families())
        specs = with_lambda_params(specs)
        oracle = get_oracle("toyworld")
        prompts = world.test_prompts[: cfg.eval_prompts] if cfg.eval_prompts else world.test_prompts
        evaluated = _evaluate(cfg, specs, sft_dir, prompts, oracle, rms, show_progress)
    # the target: π*_λ from the gold oracles, pooled over SFT samples and the trained models as proposals
    with _timed(times, "optimum"):
        proposals = {k: v.dir for k, v in specs.items() if v.family in ("dpo-helpful", "dpo-safe", "sacpo")}
        optimum = _optimum(cfg, sft_dir, prompts, oracle, proposals, show_progress)

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
    notes = _notes(cfg, world, rms, pipe, len(prompts), len(proposals), times)
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
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=1))
    return summary


@contextlib.contextmanager
def _timed(times: dict[str, float], name: str) -> Iterator[None]:
    """times[name] = the wall time of the block (when it succeeds)."""
    t = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t


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
            max_length=24 + cfg.new_tokens,
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


def _evaluate(
    cfg: DemoConfig,
    specs: dict[str, ModelSpec],
    sft_dir: Path,
    prompts: Sequence[Prompt],
    oracle: Oracle,
    rms: dict[str, dict[str, Any]],
    show_progress: bool,
) -> list[ModelMetrics]:
    """Every trained model (and the arms) against SFT on the held-out prompts: gold r*, g* and the learned reward /
    cost models; eval/results.json is rewritten by the caller with the π* rows."""
    extra = {
        "rm": RewardModelScorer(rms["rm"]["dir"], aggregate="mean"),
        "cm": RewardModelScorer(rms["cm"]["dir"], aggregate="mean", view="cost"),
    }
    return evaluate_models(
        {k: v for k, v in specs.items() if v.family != "safety-first-step1"},
        sft_dir,
        prompts,
        oracle.reward,
        oracle.safety,
        cfg.b,
        Path(cfg.out) / "eval",
        n_samples=cfg.eval_samples,
        max_new_tokens=cfg.new_tokens,
        seed=cfg.seed,
        extra_scorers=extra,
        show_progress=show_progress,
        is_safe=oracle.is_safe,
        batch_size=64,
        clusters=oracle.cluster,
    )


def _optimum(
    cfg: DemoConfig,
    sft_dir: Path,
    prompts: Sequence[Prompt],
    oracle: Oracle,
    proposals: dict[str, Any],
    show_progress: bool,
) -> list[ModelMetrics]:
    """The π*_λ rows (family "optimum", one per λ) from a pool of SFT samples and 32 from each proposal model."""
    pool = sample_pool(
        sft_dir, prompts, oracle.reward, oracle.safety, Path(cfg.out) / "eval" / "optimum", proposals,
        n_sft=cfg.optimum_samples, n_proposal=32, max_new_tokens=cfg.new_tokens, seed=cfg.seed,
        is_safe=oracle.is_safe, show_progress=show_progress,
    )  # fmt: skip
    clusters = [oracle.cluster(p) for p in prompts]
    points = estimate_optimum(
        pool, cfg.lams, cfg.beta, cfg.world.bt_scale, len(prompts), b=cfg.b, seed=cfg.seed, clusters=clusters
    )
    return [pt.metrics for pt in points]


def _notes(
    cfg: DemoConfig,
    world: World,
    rms: dict[str, dict[str, Any]],
    pipe: dict[str, Any],
    n_prompts: int,
    n_proposals: int,
    times: dict[str, float],
) -> list[str]:
    """The report header's notes: the world, the learned judges, the alignment, π*, the constraint and timings."""
    s = world.stats
    return [
        f"toyworld: {len(world.train_prompts)} train / {n_prompts} evaluation prompts; SFT GPT-2 "
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
        f"{cfg.optimum_samples} SFT samples per prompt + 32 from each of {n_proposals} trained models "
        "(balance-heuristic mixture; sacpo.evaluate.optimum)",
        f"constraint: E[g*] ≥ b = {cfg.b}, judged on the one-sided 95% lower bound; wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
    ]
