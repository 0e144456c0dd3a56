"""What `sacpo cd` writes and prints: the summary, the results.json rows (ModelMetrics dicts), the output files.

results.json: ModelMetrics rows ("base", family sft; the CD run, family cd-token (param β), cd-block (param K) or
cd-bon (one block of M ≥ max_new_tokens: best-of-K by the scorer, param K)) judged by the gold oracle, for
`sacpo report`. Their KL is the exact per-token sum (token-wise) or the per-block ε-estimate (blockwise, with
the upper bound in extra kl_bound) — `sacpo.evaluate.plots.KL_KINDS` labels it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sacpo.evaluate.metrics import ModelMetrics, constraint_holds, mean_and_stderr, win_rate
from sacpo.fsutil import atomic_dir, atomic_write_jsonl, atomic_write_text
from sacpo.infer.cd_config import CDConfig
from sacpo.infer.cd_output import CDOutput

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
BASELINE_FILE = "baseline.jsonl"
RESULTS_FILE = "results.json"


def mean_se(xs: Sequence[float | None]) -> dict[str, float | None]:
    """{mean, stderr} of the values that are not None (stderr s/√n; None when undefined: < 2 values)."""
    vals = [x for x in xs if x is not None]
    if not vals:
        return {"mean": None, "stderr": None}
    t = torch.tensor(vals, dtype=torch.float64)
    se = (t.std() / math.sqrt(len(vals))).item() if len(vals) > 1 else None
    return {"mean": t.mean().item(), "stderr": se}


def cd_summary(
    cfg: CDConfig,
    out: CDOutput,
    rows: list[dict[str, Any]],
    scorer_dirs: list[str],
    n_prompts: int,
    decode_seconds: float,
) -> dict[str, Any]:
    """summary.json without the run's total seconds and gold scores: settings, values, KL and the cost."""
    token = cfg.mode == "token"
    return {
        "mode": cfg.mode,
        "beta": cfg.beta if token else None,
        "top_k": cfg.top_k if token else None,
        "K": cfg.K if not token else None,
        "M": cfg.M if not token else None,
        "lam": cfg.lam,
        "combine": cfg.combine if len(scorer_dirs) > 1 else None,
        "scorers": scorer_dirs,
        "n_prompts": n_prompts,
        "n_samples": cfg.n_samples,
        "n_rows": len(rows),
        "value": mean_se([r["value"] for r in rows]),
        "kl": {
            "kind": "exact per-token sum (KL to the full base distribution)"
            if token
            else "ε-estimate per block: Σ_blocks KL̂(p(block | prefix), K)",
            **mean_se(out.kl),
        },
        "kl_bound": None if token else mean_se(out.kl_bound),
        "kl_topk": mean_se(out.kl_topk) if token else None,
        "kl_k1_estimate": mean_se([r["logp_policy"] - r["logp_ref"] for r in rows]) if token else None,
        "cost": cost_summary(out),
        "mean_response_tokens": out.cost.generated_tokens / len(rows),
        "finished_fraction": sum(r["finished"] for r in rows) / len(rows),
        "decode_seconds": round(decode_seconds, 3),
    }


def cost_summary(out: CDOutput) -> dict[str, Any]:
    """Forward / sampled token counts, per generated token, and the ratio to plain ancestral sampling."""
    cost = out.cost
    plain = sum(len(s.input_ids) - 1 for s in out.seqs)  # ancestral sampling: prompt + response − last token
    total = cost.base_forward_tokens + cost.scorer_forward_tokens
    return {
        "base_forward_tokens": cost.base_forward_tokens,
        "scorer_forward_tokens": cost.scorer_forward_tokens,
        "base_sampled_tokens": cost.base_sampled_tokens,
        "generated_tokens": cost.generated_tokens,
        "scorer_calls": cost.scorer_calls,
        "per_generated_token": cost.per_generated_token(),
        "plain_sampling_tokens": plain,
        "cost_ratio_vs_sampling": total / plain if plain else None,
    }


def cd_family(cfg: CDConfig) -> tuple[str, float]:
    """(family, param) of a CD run in the report: cd-token (β), cd-block (K) or cd-bon (K; one full block)."""
    if cfg.mode == "token":
        return "cd-token", cfg.beta
    return ("cd-bon" if cfg.M >= cfg.max_new_tokens else "cd-block"), float(cfg.K)


def cd_name(cfg: CDConfig) -> str:
    lam = f" λ={cfg.lam:g}" if cfg.lam > 0 else ""
    if cfg.mode == "token":
        return f"cd-token β={cfg.beta:g} k={cfg.top_k}{lam}"
    return f"cd-block K={cfg.K} M={cfg.M}{lam}"


def cd_results(
    cfg: CDConfig, rows: list[dict[str, Any]], baseline: list[dict[str, Any]], summary: dict[str, Any]
) -> list[dict[str, Any]]:
    """results.json rows (ModelMetrics dicts): the baseline samples ("base", family sft, KL 0) and the CD run,
    judged by the gold oracle against the baseline (sample s vs base sample s of the same prompt; CIs over
    prompts). KL of the CD row: token-wise, the exact per-token sum (mean ± s.e. over prompts; extra kl_topk and
    the k1 estimate); blockwise, the per-block ε-estimate Σ_blocks KL̂(ε_b, K) (mean ± s.e.; extra kl_bound: the
    mean upper bound Σ_blocks (log K − (K−1)/K))."""
    shape = (summary["n_prompts"], cfg.n_samples)

    def grid(items: list[dict[str, Any]], key: str) -> torch.Tensor:
        return torch.tensor([float(x[key]) for x in items], dtype=torch.float64).view(shape)

    r0, g0, s0 = grid(baseline, "gold_reward"), grid(baseline, "gold_safety"), grid(baseline, "gold_safe")
    r1, g1, s1 = grid(rows, "gold_reward"), grid(rows, "gold_safety"), grid(rows, "gold_safe")
    boot = {"n_boot": 1000, "seed": cfg.seed}
    cost = summary["cost"]["per_generated_token"]

    def metrics(name, family, param, r, g, safe, kl, extra) -> dict[str, Any]:
        mr, se_r = mean_and_stderr(r)
        mg, se_g = mean_and_stderr(g)
        return ModelMetrics(
            name=name, family=family, param=param, helpful_win=win_rate(r, r0, **boot),
            harmless_win=win_rate(g, g0, **boot), mean_reward=mr, mean_safety=mg, p_safe=float(safe.mean()),
            constraint_ok=constraint_holds(mg, 0.0), kl=kl[0], kl_se=kl[1], n=int(r.numel()),
            n_prompts=shape[0], reward_se=se_r, safety_se=se_g, extra=extra,
        ).to_dict()  # fmt: skip

    extra = {"sampled/token": cost["base_sampled"], "forward/token": cost["total_forward"]}
    if cfg.mode == "token":
        kl = mean_and_stderr(grid(rows, "kl"))
        extra |= {
            "kl_topk": mean_and_stderr(grid(rows, "kl_topk"))[0],
            "kl_k1": summary["kl_k1_estimate"]["mean"],
        }
    else:
        kl = mean_and_stderr(grid(rows, "kl"))
        extra["kl_bound"] = float(grid(rows, "kl_bound").mean())
    family, param = cd_family(cfg)
    return [
        metrics("base", "sft", None, r0, g0, s0, (0.0, 0.0), {}),
        metrics(cd_name(cfg), family, param, r1, g1, s1, kl, extra),
    ]


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few plain-text lines (what `sacpo cd` prints)."""

    def f(x: Any, digits: int = 3) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    if summary["mode"] == "token":
        what = f"token-wise CD (β={summary['beta']:g}, top-k {summary['top_k']})"
    else:
        what = f"blockwise CD (K={summary['K']}, M={summary['M']})"
    if summary["lam"]:
        what += f", V = V_r {'−' if summary['combine'] == 'cost' else '+'} {summary['lam']:g}·V_2"
    kl, cost = summary["kl"], summary["cost"]
    per = cost["per_generated_token"]
    lines = [
        f"{what}: {summary['n_prompts']} prompts × {summary['n_samples']} samples, "
        f"{f(summary['mean_response_tokens'], 1)} tokens/response, finished {f(summary['finished_fraction'], 2)}",
        f"  value V {f(summary['value']['mean'])} ± {f(summary['value']['stderr'])}; KL {f(kl['mean'])} ± "
        f"{f(kl['stderr'])} ({kl['kind']})",
        f"  cost per generated token: {f(per['base_sampled'], 2)} sampled, {f(per['total_forward'], 2)} forward "
        f"tokens ({f(cost['cost_ratio_vs_sampling'], 2)}× plain sampling); {summary['seconds']:.0f} s",
    ]
    if "gold_reward" in summary:
        line = (
            f"  gold: E[r*] {f(summary['gold_reward']['mean'])} ± {f(summary['gold_reward']['stderr'])}, "
            f"P(safe) {f(summary['safe_fraction'])}"
        )
        if "baseline" in summary:
            b = summary["baseline"]
            line += (
                f"; base samples E[r*] {f(b['gold_reward']['mean'])}, P(safe) {f(b['safe_fraction'])}; win rate "
                f"vs base: helpful {f(b['gold_win_rate'])}, harmless {f(b['gold_harmless_win_rate'])}"
            )
        lines.append(line)
    return "\n".join(lines)


def write_cd_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    config_yaml: str,
    baseline: list[dict[str, Any]] | None = None,
    results: list[dict[str, Any]] | None = None,
) -> None:
    """Write every output file into a fresh directory that replaces `out` when complete."""
    with atomic_dir(out) as tmp:
        atomic_write_jsonl(tmp / SAMPLES_FILE, rows)
        if baseline:
            atomic_write_jsonl(tmp / BASELINE_FILE, baseline)
        if results is not None:
            atomic_write_text(tmp / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(tmp / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(tmp / "config.yaml", config_yaml)
