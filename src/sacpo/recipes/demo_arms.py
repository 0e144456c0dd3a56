"""eval/ablations.md of `sacpo demo`: the default recipe and every step-2 ablation arm at every λ, against π*_λ."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sacpo.evaluate.generate import read_samples
from sacpo.evaluate.metrics import ModelMetrics
from sacpo.evaluate.run import safe_name
from sacpo.fsutil import atomic_write_text
from sacpo.math.statistics import objective_gain
from sacpo.recipes.demo_config import ARM_PREFIX, ARMS, DemoConfig
from sacpo.worlds.toyworld.language import task_of
from sacpo.worlds.toyworld.oracle import parse


def garbage_share(responses: list[str]) -> float:
    """Share of the toyworld sentences in the responses that parse as nothing (garbled text)."""
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
    evaluated: list[ModelMetrics],
    optimum: list[ModelMetrics],
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
    return atomic_write_text(path, "\n".join(lines) + "\n")
