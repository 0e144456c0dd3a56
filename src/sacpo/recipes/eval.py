"""`sacpo eval CONFIG` / `sacpo report DIR`: an evaluation as a frozen config, gold oracles by name.

    cfg = load_config(EvalConfig, "configs/eval_toyworld.yaml", ["n_samples=8"])
    run_eval(cfg)                      # results.json, samples/, report.md, report.html, *.png
    report_from_dir("runs/eval")       # rebuild the report from results.json (no model loaded)

Models come from `models` (name → {dir | samples, family, param}) and/or a pipeline's pipeline.json (`pipeline`,
families by stage/merge name in `families`). Oracles and prompt clusterings (which prompts are paraphrases of one
task: the bootstrap resamples whole clusters) are looked up by name in `sacpo.scoring` (unknown names list the
valid ones), or the clustering comes with the oracle (`Oracle.cluster`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from sacpo.config import ConfigError, config_dataclass, help_field, to_yaml
from sacpo.data.prompt_format import CHAT_TEMPLATE_HELP, SYSTEM_PROMPT_HELP, PromptFormat, log_first_prompt
from sacpo.data.prompts import load_prompts
from sacpo.evaluate.findings import check_findings
from sacpo.evaluate.judge_config import GeneratorConfig, JudgeConfig
from sacpo.evaluate.judge_report import judge_tables
from sacpo.evaluate.judging import build_judges, load_judges
from sacpo.evaluate.metrics import ModelMetrics
from sacpo.evaluate.report import write_report
from sacpo.evaluate.run import RESULTS_FILE, ModelSpec, evaluate_models, load_results, specs_from_pipeline
from sacpo.fsutil import atomic_write_text
from sacpo.models.load import load_tokenizer
from sacpo.scoring import get_clustering, get_oracle

# Families of the stage / merge names used by configs/pipeline_tiny.yaml and `sacpo demo`.
DEFAULT_FAMILIES = {
    "helpful": "dpo-helpful",
    "safe": "sacpo",
    "safe_from_sft": "dpo-safe",
    "safe_kto": "kto",
    "psacpo": "p-sacpo",
    "naive": "naive-merge",
}


@config_dataclass
class EvalConfig:
    output_dir: str = help_field(
        help="writes results.json, samples/<model>/, report.md/.html and PNG figures"
    )
    prompts: str = help_field(
        help="evaluation prompts: .txt (one per line), .json (a list, or a mapping of splits — see "
        "prompts_split) or .jsonl (rows with a 'prompt' field); a prompt is a string or a list of messages"
    )
    sft: str = help_field("", help="SFT model directory (the baseline and KL reference); '' = the pipeline's")
    pipeline: str | None = help_field(
        None, help="a pipeline directory or pipeline.json: evaluate all its models"
    )
    families: dict[str, str] = help_field(
        DEFAULT_FAMILIES, help="pipeline stage / merge name → family (sacpo, p-sacpo, naive-merge, …)"
    )
    models: dict[str, Any] = help_field(
        {}, help="more models: name → {dir: MODEL_DIR | samples: SAMPLES_JSONL, family: str, param: float}"
    )
    include: list[str] = help_field(
        [],
        help="inference-result directories with a results.json (`sacpo bon` / `sacpo cd` outputs) drawn in the "
        "report next to the evaluated models (each keeps its own KL kind and its own base samples)",
    )
    oracle: str | None = help_field(
        "toyworld",
        help="gold reward / safety scorers by name (`sacpo.scoring` oracles); null = none (real models): the "
        "reward / safety columns then come from the first reward_model / cost_model judge, else are undefined",
    )
    judges: list[JudgeConfig] = help_field(
        [],
        help="judges comparing every model with SFT pair by pair: {kind: llm, base_url, model, criterion} | "
        "{kind: reward_model | cost_model, dir} | {kind: oracle, name} (see docs/judges.md)",
    )
    judge_cache: str = help_field(
        "", help="directory of the LLM judges' answer cache ('' = <output_dir>/judge_cache)"
    )
    generator: GeneratorConfig = help_field(
        GeneratorConfig(),
        help="where samples come from: {kind: local} or {kind: openai, base_url, served_names}",
    )
    temperature: float = help_field(
        1.0,
        help="sampling temperature; 0 = greedy (then n_samples must be 1). ≠ 1 (or top_p < 1): samples no longer "
        "follow π, and the KL column is E_q[log π − log π_SFT] on them",
        ge=0,
        allow_inf_nan=False,
    )
    top_p: float = help_field(
        1.0, help="nucleus sampling: keep the most likely tokens up to this mass", gt=0, le=1
    )
    b: float = help_field(0.0, help="safety threshold of the constraint E[g] ≥ b")
    prompts_split: str = help_field("test", help="key of the prompt list when the .json file maps splits")
    max_prompts: int | None = help_field(None, help="evaluate the first N prompts only")
    n_samples: int = help_field(
        4, help="responses per prompt and model (compared with all of SFT's on the prompt)"
    )
    max_new_tokens: int = help_field(64, help="response length limit (tokens)")
    seed: int = help_field(
        0,
        help="base sampling seed (model m samples with sha256(seed, m): independent streams) and bootstrap seed",
    )
    clusters: str = help_field(
        "oracle",
        help="prompt clusters the bootstrap resamples whole: 'oracle' = the oracle's own (toyworld: the task, 4 "
        "paraphrases each), 'prompt' = none (each prompt alone), or a registered clustering name",
    )
    batch_size: int = help_field(16, help="prompts per generation batch / sequences per log-prob batch")
    max_prompt_length: int = help_field(256, help="prompts are left-truncated to this many tokens")
    system_prompt: str | None = help_field(None, help=SYSTEM_PROMPT_HELP)
    chat_template: str | None = help_field(None, help=CHAT_TEMPLATE_HELP)
    n_boot: int = help_field(1000, help="bootstrap resamples of the prompts (or clusters)")
    alpha: float = help_field(
        0.05, help="CIs are (1 − alpha) two-sided; the safety bound is the one-sided (1 − alpha) lower bound"
    )
    device: str | None = help_field(None, help="cuda / cpu / cuda:1 …; default cuda when available")
    title: str = help_field("SACPO evaluation", help="report title")

    def __post_init__(self) -> None:
        for name in ("n_samples", "max_new_tokens", "batch_size", "max_prompt_length", "n_boot"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if not self.sft and not self.pipeline:
            raise ConfigError("give sft (the SFT model directory) or a pipeline to take it from")
        if self.temperature == 0 and self.n_samples != 1:
            raise ConfigError(
                f"temperature 0 is greedy decoding: every sample is the same, set n_samples=1 (got {self.n_samples})"
            )


def model_specs(cfg: EvalConfig) -> tuple[Path, dict[str, ModelSpec]]:
    """(sft_dir, name → ModelSpec) from the pipeline (if any) and `models`."""
    specs: dict[str, ModelSpec] = {}
    sft = Path(cfg.sft) if cfg.sft else None
    if cfg.pipeline:
        pipeline_sft, specs = specs_from_pipeline(cfg.pipeline, cfg.families)
        sft = sft or pipeline_sft
    for name, d in cfg.models.items():
        if not isinstance(d, dict):
            raise ConfigError(f"models.{name}: expected a mapping with dir or samples, got {d!r}")
        unknown = sorted(set(d) - {"dir", "samples", "family", "param"})
        if unknown:
            raise ConfigError(f"models.{name}: unknown key(s) {unknown}; valid: dir, samples, family, param")
        try:
            specs[name] = ModelSpec(
                dir=d.get("dir"),
                family=str(d.get("family", "other")),
                param=None if d.get("param") is None else float(d["param"]),
                samples=d.get("samples"),
            )
        except ValueError as e:
            raise ConfigError(f"models.{name}: {e}") from None
    assert sft is not None  # __post_init__
    return sft, specs


def run_eval(cfg: EvalConfig, show_progress: bool = True) -> list[ModelMetrics]:
    """Evaluate every model of the config, then write the report next to results.json."""
    out = Path(cfg.output_dir)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    sft, specs = model_specs(cfg)
    prompts = load_prompts(cfg.prompts, cfg.prompts_split, cfg.max_prompts)
    judges = build_judges(cfg.judges, cfg.judge_cache or out / "judge_cache", cfg.device)
    oracle = get_oracle(cfg.oracle) if cfg.oracle else None
    if oracle is not None:
        reward, safety, is_safe = oracle.reward, oracle.safety, oracle.is_safe
    else:  # the first reward / cost model judge (a cost model's view is −c: safe when c ≤ 0)
        reward = next((j.scorer for j in judges if j.kind == "reward_model"), None)
        safety = next((j.scorer for j in judges if j.kind == "cost_model"), None)
        is_safe = None
    fmt = PromptFormat.from_fields(cfg.system_prompt, cfg.chat_template)
    log_first_prompt(logging.getLogger("sacpo.evaluate"), load_tokenizer(sft), prompts[0], fmt)
    results = evaluate_models(
        specs,
        sft,
        prompts,
        reward,
        safety,
        cfg.b,
        out,
        n_samples=cfg.n_samples,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        show_progress=show_progress,
        is_safe=is_safe,
        n_boot=cfg.n_boot,
        alpha=cfg.alpha,
        batch_size=cfg.batch_size,
        max_prompt_length=cfg.max_prompt_length,
        device=cfg.device,
        clusters=get_clustering(cfg.clusters, oracle),
        judges=judges,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        api=cfg.generator.api(),
        served_names=cfg.generator.served_names,
        prompt_format=fmt,
    )
    report_from_dir(out, cfg.title, include=cfg.include)
    return results


def report_notes(eval_json: dict[str, Any]) -> list[str]:
    """One-line notes of the evaluation settings for the report header."""
    e = eval_json
    alpha = e.get("alpha", 0.05)
    level = f"{100 * (1 - alpha):g}%"
    c = e.get("clusters") or {}
    if c.get("n_clusters"):
        unit = f"clusters of prompts ({c['n_clusters']} clusters by {c.get('by')}, resampled whole)"
    else:
        unit = "prompts"
    if "sampling" in e:
        sampling = (
            "each model from its own random stream (seed sha256(seed, name)); win rates over all S×S pairs"
        )
        constraint = f"the one-sided {level} lower confidence bound of E[g] ≥ b = {e.get('b')}"
    else:
        sampling = "every model with the same seed; win rates over paired sample indices (older evaluation)"
        constraint = f"E[g] ≥ b = {e.get('b')} on the point estimate (older evaluation)"
    return [
        f"SFT baseline: {e.get('baseline')} ({e.get('sft_dir')}); reward {e.get('reward')!r}, safety "
        f"{e.get('safety')!r}, is_safe: {e.get('is_safe')}; constraint: {constraint}",
        f"{e.get('n_prompts')} prompts × {e.get('n_samples')} samples ({_decoding(e)}, ≤ {e.get('max_new_tokens')} "
        f"new tokens, seed {e.get('seed')}; {sampling}); {level} bootstrap CIs over {unit} "
        f"({e.get('n_boot')} resamples); generator: {_generator(e)}",
        "KL(π‖π_SFT): mean sequence log-ratio on the policy's samples (k1, unbiased, may be < 0 by noise) ± s.e. "
        f"(over the {'clusters' if c.get('n_clusters') else 'prompts'}); degenerate: a word repeated ≥ 3 times in a "
        "row (share of samples, and of the KL sum they carry)",
    ]


def _decoding(e: dict[str, Any]) -> str:
    t, p = e.get("temperature", 1.0), e.get("top_p", 1.0)
    if t == 0:
        return "greedy decoding: the KL column is log π − log π_SFT of the greedy response, not a KL"
    if t == 1 and p == 1:
        return "temperature 1"
    return (
        f"temperature {t:g}, top-p {p:g}: samples follow a modified q, the KL column is E_q[log π − log π_SFT], "
        "not KL(π‖π_SFT)"
    )


def _generator(e: dict[str, Any]) -> str:
    g = e.get("generator", "local")
    return (
        "in-process"
        if g == "local"
        else f"OpenAI-compatible server {g.get('base_url')} (log-probs in-process)"
    )


def _source(d: Path) -> dict[str, Any]:
    """(prompts, split, max_prompts, n_samples, oracle) of a run directory's config.yaml (or eval.json's
    n_samples), {} when unreadable; prompts as a hash of the file's content (two copies of a file agree)."""
    import yaml

    try:
        cfg = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    if not cfg and (d / "eval.json").is_file():
        cfg = {"n_samples": json.loads((d / "eval.json").read_text(encoding="utf-8")).get("n_samples")}
    keys = ("prompts", "prompts_split", "max_prompts", "n_samples", "oracle")
    src = {k: cfg.get(k) for k in keys} if isinstance(cfg, dict) else {}
    if src.get("prompts"):
        p = Path(src["prompts"])
        src["prompts"] = (
            f"{p.name}@{hashlib.sha256(p.read_bytes()).hexdigest()[:8]}" if p.is_file() else str(p)
        )
    return src


def include_results(
    results: list[ModelMetrics], out: Path, include: list[str | Path]
) -> tuple[list[ModelMetrics], list[str]]:
    """results + the ModelMetrics of every included directory's results.json, and one note per directory.

    An included run's own base-sample row (family sft) is dropped: the report's SFT row stands for it, and the
    included win rates stay against that run's own base samples (an independent draw from the same SFT policy).
    Names that collide get the directory name appended. A note says when a run used other prompts, sample counts
    or oracle than the report's directory (then its points are not comparable with the others')."""
    names = {m.name for m in results}
    here = _source(out)
    merged, notes = list(results), []
    for d in map(Path, include):
        if not (d / RESULTS_FILE).is_file():
            raise ConfigError(
                f"include: {d}: no {RESULTS_FILE} (a `sacpo bon` / `sacpo cd` output directory)"
            )
        rows = [m for m in load_results(d) if m.family != "sft"]
        for m in rows:
            name = m.name if m.name not in names else f"{m.name} ({d.name})"
            names.add(name)
            merged.append(dataclasses.replace(m, name=name))
        src = _source(d)
        differs = sorted(k for k in here if here.get(k) is not None and src.get(k) not in (None, here[k]))
        note = (
            f"included {d}: {len(rows)} row(s) ({', '.join(sorted({m.family for m in rows}))}); win rates against "
            "that run's own base samples; its 'E[g] ≥ b' column is that run's own constraint"
        )
        if differs:
            note += "; differs from this report's run in " + ", ".join(
                f"{k} ({src.get(k)} vs {here[k]})" for k in differs
            )
        notes.append(note)
    return merged, notes


def report_from_dir(
    out_dir: str | Path,
    title: str = "SACPO evaluation",
    include: list[str | Path] | None = None,
    dest: str | Path | None = None,
) -> dict[str, Path]:
    """Rebuild report.md / report.html / figures from <out_dir>/results.json (+ eval.json for the notes);
    also writes findings.json (claim, holds, evidence).

    include: more results.json directories (`sacpo bon` / `sacpo cd` outputs) put on the same tables and axes
    (`include_results`); None = the `include` list of out_dir's config.yaml (an eval config), if any. dest: write
    the report there instead of out_dir."""
    src = Path(out_dir)
    if not (src / RESULTS_FILE).is_file():
        raise ConfigError(f"{src}: no {RESULTS_FILE} (run `sacpo eval`, `sacpo bon` or `sacpo cd` first)")
    dest = Path(dest or src)
    results = load_results(src)
    meta_path = src / "eval.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    notes = report_notes(meta) if meta else []
    if include is None:
        include = _configured_include(src)
    if include:
        results, more = include_results(results, src, list(include))
        notes += more
    dest.mkdir(parents=True, exist_ok=True)
    findings = check_findings(
        results,
        b=meta.get("b"),
        alpha=meta.get("alpha", 0.05),
        n_boot=meta.get("n_boot", 1000),
        seed=meta.get("seed", 0),
    )
    atomic_write_text(
        dest / "findings.json", json.dumps([f._asdict() for f in findings], indent=2, ensure_ascii=False)
    )
    record = load_judges(src)
    tables = judge_tables(record) if record else []
    return write_report(results, dest, title=title, notes=notes, findings=findings, tables=tables)


def _configured_include(d: Path) -> list[str]:
    import yaml

    try:
        cfg = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    inc = cfg.get("include") if isinstance(cfg, dict) else None
    return [str(x) for x in inc] if isinstance(inc, list) else []
