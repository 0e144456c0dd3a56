"""What `sacpo bon` writes and prints: the summary, the ModelMetrics rows, the sample sets and the output files.

config.yaml, summary.json        settings; per n: win rates, KL bound / estimate, scores, constraint status
results.json                     ModelMetrics rows (base, bon n, bon-safe n [held-out]) for `sacpo report DIR`
candidates.jsonl (+ .meta.json)  per prompt: all M responses, base log-probs, scores, selections; the meta key
                                 lets a later run with other scorers / targets reuse them without generating
samples/<name>/samples.jsonl     rows readable by `sacpo.evaluate.generate.read_samples` (S per prompt):
                                 base, bon-n<n>, bon-safe-n<n> — usable as `sacpo eval` artifact models
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sacpo.config import to_yaml
from sacpo.evaluate.metrics import NAN, ModelMetrics, constraint_holds, json_safe, mean_and_stderr, win_rate
from sacpo.fsutil import atomic_dir, atomic_write_jsonl, atomic_write_text
from sacpo.infer.bon_cache import CANDIDATES_FILE, CANDIDATES_META, candidate_records, candidates_meta
from sacpo.infer.bon_config import BonConfig
from sacpo.infer.bon_stats import base_stats, sample_rows, selection_score
from sacpo.infer.pool import CandidatePool, Scores
from sacpo.math.bon_calibrate import resolve_bound
from sacpo.math.bon_select import safety_statistic

if TYPE_CHECKING:
    from sacpo.recipes.bon import PromptSets, Selections

SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.json"
KL_NOTE = (
    "bound = log n − (n−1)/n; estimate = mean over selections of: the level estimate log(M̂/q̂), "
    "M̂ = F̂^n − (F̂ − q̂)^n, F̂/q̂ = fraction of the prompt's pooled responses scoring ≤/= the selected one, where "
    "the selection score ties another distinct response (discrete scores; fraction in kl.level_fraction), else "
    "the ε-estimator KL̂(ε), ε = p(y_sel|x) (Beirami et al. 2024, §4); rows carry logp_policy = None"
)

BOUND_RULES = {
    "wilson": "Wilson score lower bound of m at n_eff = 1/(1/C + 1/H), z = Φ⁻¹(confidence)",
    "t": "m − t_{C−1}(confidence)·s·√(1/C + 1/H), s = std of the per-prompt statistic",
    "normal": "m − z·s·√(1/C + 1/H), z = Φ⁻¹(confidence), s = std of the per-prompt statistic",
}  # m: the statistic over the C calibration prompts; H: held-out prompts


def bon_summary(
    cfg: BonConfig,
    pool: CandidatePool,
    scores: Scores,
    ns: list[int],
    sets: PromptSets,
    sel: Selections,
    cached: bool,
    names: tuple[str, str | None],
) -> dict[str, Any]:
    """summary.json (without its "seconds"): settings, the base samples' and every selection's statistics."""
    n_prompts = len(pool.prompts)
    summary: dict[str, Any] = {
        "model": cfg.model,
        "prompts": cfg.prompts,
        "n_prompts": int(sets.report_rows.numel()),
        "n_samples": cfg.n_samples,
        "ns": ns,
        "candidates_per_prompt": pool.width,
        "candidates_cached": cached,
        "reward": names[0],
        "safety": names[1],
        "oracle": cfg.oracle,
        "kl_note": KL_NOTE,
        "base": base_stats(pool, scores, cfg.safe_threshold, sets.report_rows),
        "bon": [sel.bon[n] for n in ns],
        "finished_fraction": pool.finished.double().mean().item(),
        "roundtrip_fraction": pool.roundtrip.double().mean().item(),
        "distinct_fraction": sum(len(set(ys)) for ys in pool.responses) / (n_prompts * pool.width),
    }
    if cfg.target is not None:
        summary["constraint"] = constraint_summary(cfg, sets)
        summary["constrained"] = [sel.safe[n] for n in ns]
    return summary


def constraint_summary(cfg: BonConfig, sets: PromptSets) -> dict[str, Any]:
    """The constraint, the calibration source and the confidence rule, as summary.json reports them."""
    return {
        "kind": cfg.constraint,
        "target": cfg.target,
        "safe_threshold": cfg.safe_threshold,
        "statistic": f"P(g > {cfg.safe_threshold:g})" if cfg.constraint == "prob" else "E[g]",
        "score": "r + λ·g",
        "calibration_prompts": int(sets.cal.numel()),
        "calibration_source": (
            f"split {cfg.calibration_split!r}"
            if sets.n_calib
            else f"random {cfg.calibration_fraction:g} of {cfg.prompts_split!r}"
        ),
        "heldout_prompts": int(sets.held.numel()),
        "confidence": cfg.confidence,
        "bound": resolve_bound(cfg.bound, cfg.constraint),
        "rule": "scan λ = ∞, then just above each jump point of the selection downward, then 0; λ = the last "
        "whose lower bound of the calibration statistic ≥ target. "
        + BOUND_RULES[resolve_bound(cfg.bound, cfg.constraint)],
    }


def sample_sets(
    cfg: BonConfig, pool: CandidatePool, scores: Scores, ns: list[int], sets: PromptSets, sel: Selections
) -> dict[str, list[dict[str, Any]]]:
    """samples/<name>/samples.jsonl rows: base, bon-n<n> and (constrained) bon-safe-n<n>, on the reported prompts."""
    rows, split = sets.report_rows, sets.split
    samples = {"base": sample_rows(pool, scores, pool.base_columns(), 1, {}, split, rows, True)}
    for n in ns:
        samples[f"bon-n{n}"] = sample_rows(
            pool, scores, pool.global_index(sel.chosen_bon[n]), n, {}, split, rows
        )
        if cfg.target is not None:
            c = sel.safe[n]
            extra = {"lam": c["lam"], "feasible": c["feasible"]}
            col = pool.global_index(sel.chosen_safe[n])
            score = selection_score(scores, math.inf if c["lam"] is None else c["lam"])
            samples[f"bon-safe-n{n}"] = sample_rows(pool, scores, col, n, extra, split, rows, score=score)
    return samples


def results_rows(
    cfg: BonConfig, pool: CandidatePool, scores: Scores, ns: list[int], sets: PromptSets, sel: Selections
) -> list[ModelMetrics]:
    """results.json rows: base (KL 0), bon-n<n> on the reported prompts, bon-safe-n<n> [held-out] on the held-out."""
    rows = sets.report_rows
    results = [metrics_row("base", "sft", None, pool, scores, pool.base_columns(), rows, (0.0, 0.0), cfg, {})]
    for n in ns:
        st = sel.bon[n]
        kl = (st["kl"]["estimate"], st["kl"]["estimate_se"])
        extra = {
            "kl_bound": st["kl"]["bound"],
            "kl_level_fraction": st["kl"]["level_fraction"],
            "win_rate_bound": st["win_rate_bound"],
        }
        col = pool.global_index(sel.chosen_bon[n])
        results.append(metrics_row(f"bon-n{n}", "bon", float(n), pool, scores, col, rows, kl, cfg, extra))
        if cfg.target is not None:
            c = sel.safe[n]
            lam = math.inf if c["lam"] is None else c["lam"]
            h = c["heldout"]
            kl = (h["kl"]["estimate"], h["kl"]["estimate_se"])
            extra = {
                "kl_bound": h["kl"]["bound"],
                "kl_level_fraction": h["kl"]["level_fraction"],
                "lambda": lam,
                "win_rate_bound": h["win_rate_bound"],
            }
            col = pool.global_index(sel.chosen_safe[n])
            name = f"bon-safe-n{n} [held-out]"
            results.append(
                metrics_row(name, "bon-safe", float(n), pool, scores, col, sets.held, kl, cfg, extra)
            )
    return results


def metrics_row(
    name: str,
    family: str,
    param: float | None,
    pool: CandidatePool,
    scores: Scores,
    col: torch.Tensor,
    rows: torch.Tensor,
    kl: tuple[float, float],
    cfg: BonConfig,
    extra: dict[str, float],
) -> ModelMetrics:
    """A ModelMetrics row (the evaluation's format) for `sacpo report`: judged by the oracle when there is one,
    else by the run's scorers; KL = the ε-estimator (its bound in extra). constraint_ok: the configured
    constraint (on the safety *scorer*, its statistic in extra) when there is one, else E[g] ≥ 0 (EvalConfig's
    default b), False without any safety score."""

    def sel(x: torch.Tensor) -> np.ndarray:
        return x[rows].gather(1, col[rows]).numpy()  # (p, S)

    def opp(x: torch.Tensor) -> np.ndarray:
        return pool.base(x)[rows].numpy()  # (p, S)

    gold = scores.gold_reward is not None
    r = scores.gold_reward if gold else scores.reward
    g = scores.gold_safety if gold else scores.safety
    assert r is not None
    boot = {"n_boot": cfg.n_boot, "seed": cfg.seed}
    if gold:
        assert scores.gold_safe is not None
        p_safe = float(sel(scores.gold_safe).mean())
    elif g is not None:
        p_safe = float((sel(g) > cfg.safe_threshold).mean())
    else:
        p_safe = NAN
    r_mean, r_se = mean_and_stderr(sel(r).mean(-1))
    g_mean, g_se = mean_and_stderr(sel(g).mean(-1)) if g is not None else (NAN, NAN)
    extra = dict(extra)
    if cfg.target is not None and scores.safety is not None:
        stat = safety_statistic(torch.from_numpy(sel(scores.safety)), cfg.constraint, cfg.safe_threshold)
        extra["constraint_statistic"] = stat
        constraint_ok = stat >= cfg.target
    else:
        constraint_ok = constraint_holds(g_mean, 0.0) if g is not None else False
    return ModelMetrics(
        name=name,
        family=family,
        param=param,
        helpful_win=win_rate(sel(r), opp(r), **boot),
        harmless_win=win_rate(sel(g), opp(g), **boot) if g is not None else (NAN, NAN, NAN),
        mean_reward=r_mean,
        mean_safety=g_mean,
        p_safe=p_safe,
        constraint_ok=constraint_ok,
        kl=kl[0],
        kl_se=kl[1],
        n=int(rows.numel() * pool.n_draws),
        n_prompts=int(rows.numel()),
        reward_se=r_se,
        safety_se=g_se,
        extra=extra,
    )


def write_bon_outputs(
    out: Path,
    cfg: BonConfig,
    key: str,
    pool: CandidatePool,
    scores: Scores,
    split: list[str] | None,
    selections: dict[str, dict[int, torch.Tensor]],
    samples: dict[str, list[dict[str, Any]]],
    summary: dict[str, Any],
    results: list[ModelMetrics],
) -> None:
    """Write every output file into a fresh directory that replaces `out` when complete."""
    with atomic_dir(out) as tmp:
        atomic_write_jsonl(tmp / CANDIDATES_FILE, candidate_records(pool, scores, split, selections))
        atomic_write_text(tmp / CANDIDATES_META, json.dumps(candidates_meta(key, cfg.model, pool), indent=2))
        for name, rows in samples.items():
            atomic_write_jsonl(tmp / "samples" / name / "samples.jsonl", rows)
        summary_text = json.dumps(json_safe(summary), indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(tmp / SUMMARY_FILE, summary_text)
        results_text = json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False)
        atomic_write_text(tmp / RESULTS_FILE, results_text)
        atomic_write_text(tmp / "config.yaml", to_yaml(cfg))


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as plain-text tables (what `sacpo bon` prints)."""
    gold = summary.get("oracle") is not None
    lines = [
        f"best-of-n: {summary['n_prompts']} prompts × {summary['n_samples']} draws, "
        f"{summary['candidates_per_prompt']} responses per prompt"
        f"{' (cached)' if summary['candidates_cached'] else ''}; reward {summary['reward']!r}",
        f"{'n':>4} {'win':>6} {'± se':>6} {'n/(n+1)':>8} "
        + (f"{'gold win':>9} {'P(safe)*':>9} " if gold else "")
        + f"{'KL bound':>9} {'KL est':>7} {'± se':>6} {'level':>6}",
    ]
    for st in summary["bon"]:
        lines.append(
            f"{st['n']:>4} {_f(st['win_rate']['mean']):>6} {_f(st['win_rate']['se']):>6} "
            f"{_f(st['win_rate_bound']):>8} "
            + (f"{_f(st['gold_win_rate']['mean']):>9} {_f(st['gold_p_safe']):>9} " if gold else "")
            + f"{_f(st['kl']['bound']):>9} {_f(st['kl']['estimate']):>7} {_f(st['kl']['estimate_se']):>6} "
            f"{_f(st['kl'].get('level_fraction'), 2):>6}"
        )
    if "constrained" in summary:
        lines += _constrained_lines(summary, gold)
    if gold:
        lines.append("* gold oracle")
    return "\n".join(lines)


def _constrained_lines(summary: dict[str, Any], gold: bool) -> list[str]:
    c = summary["constraint"]
    lines = [
        f"constrained best-of-n (score {c['score']}): {c['statistic']} ≥ {c['target']:g}, λ calibrated on "
        f"{c['calibration_prompts']} prompts ({c.get('bound', 'normal')} lower bound at confidence "
        f"{c['confidence']:g}), "
        f"{c['heldout_prompts']} held out",
        f"{'n':>4} {'λ':>9} {'stat cal':>9} {'bound cal':>10} {'ok':>3} {'stat held':>10} {'ok':>3} "
        f"{'win held':>9} " + (f"{'P(safe)* held':>14} " if gold else "") + f"{'KL est':>7}",
    ]
    for st in summary["constrained"]:
        cal, held = st["calibration"], st["heldout"]
        lam = "∞ (infeasible)" if st["lam"] is None else f"{st['lam']:.4g}"
        lines.append(
            f"{st['n']:>4} {lam:>9} {_f(cal['constraint_statistic']):>9} {_f(st['calibration_bound']):>10} "
            f"{'✓' if st['feasible'] else '✗':>3} {_f(held['constraint_statistic']):>10} "
            f"{'✓' if held['constraint_ok'] else '✗':>3} {_f(held['win_rate']['mean']):>9} "
            + (f"{_f(held['gold_p_safe']):>14} " if gold else "")
            + f"{_f(held['kl']['estimate']):>7}"
        )
    return lines
