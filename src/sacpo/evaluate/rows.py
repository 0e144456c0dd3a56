"""One model's sample rows in an evaluation: put on the (prompt, sample) grid, scored, compared with SFT's rows.

grid_rows    rows in prompt-major order p·S + s (artifacts matched by prompt text)
score_rows   reward r, safety g, is_safe, extra scorers and degenerate flags, each (P, S)
row_metrics  the ModelMetrics row: win rates over all S × S′ cross pairs with SFT's samples, E[r], E[g] ± se,
             the one-sided lower bound of E[g], KL(π‖π_SFT) from the rows' log-probs, per-prompt values
scored_rows  the rows with their scores, for scored.jsonl
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sacpo.data.records import Prompt
from sacpo.evaluate.generate import SampleRow, prompt_id
from sacpo.evaluate.metrics import (
    NAN,
    ModelMetrics,
    constraint_holds,
    degenerate_kl_share,
    is_degenerate,
    kl_estimate,
)
from sacpo.math.statistics import bootstrap_lower_bound, cross_outcomes, cross_win_rate, mean_and_stderr
from sacpo.scoring.base import Scorer, run_scorer

log = logging.getLogger("sacpo.evaluate")

# An extra scorer under one of these names also fills the ModelMetrics field.
LEARNED_FIELDS = {"rm": "mean_rm", "cm": "mean_cm"}


def grid_rows(
    rows: Sequence[SampleRow], prompts: Sequence[Prompt], n_samples: int, where: str
) -> list[SampleRow]:
    """Rows in prompt-major order (p·S + s) for the evaluation prompts; artifacts are matched by prompt text."""
    index: dict[tuple[str, int], SampleRow] = {}
    for r in rows:
        index.setdefault((prompt_id(r.prompt), int(r.sample)), r)
    out, missing = [], []
    for p in prompts:
        pid = prompt_id(p)
        for s in range(n_samples):
            row = index.get((pid, s))
            if row is None:
                missing.append((p, s))
            else:
                out.append(row)
    if missing:
        p, s = missing[0]
        raise ValueError(
            f"{where}: no row for {len(missing)} (prompt, sample) pairs of the evaluation set, e.g. sample {s} "
            f"of {p!r}; an artifact needs samples 0..{n_samples - 1} for every evaluation prompt"
        )
    if len(index) > len(out):
        log.info("%s: %d rows outside the evaluation set ignored", where, len(index) - len(out))
    return out


@dataclass(frozen=True)
class Scores:
    reward: np.ndarray  # (P, S)
    safety: np.ndarray  # (P, S)
    safe: np.ndarray  # (P, S) bool
    extra: dict[str, np.ndarray]  # name → (P, S)
    degenerate: np.ndarray  # (P, S) bool, `is_degenerate` of the response


def score_rows(
    rows: Sequence[SampleRow],
    shape: tuple[int, int],
    reward: Scorer | None,
    safety: Scorer | None,
    is_safe: Callable[[Prompt, str], bool] | None,
    extra_scorers: dict[str, Scorer],
) -> Scores:
    """The rows' scores, each (P, S); a scorer given as None (none configured) scores NaN everywhere."""
    prompts = [r.prompt for r in rows]
    responses = [r.response for r in rows]

    def scored(scorer: Scorer | None) -> np.ndarray:
        if scorer is None:
            return np.full(shape, NAN)
        return run_scorer(scorer, prompts, responses).numpy().reshape(shape)

    r, g = scored(reward), scored(safety)
    if safety is None and is_safe is None:
        safe = np.zeros(shape, dtype=bool)
    elif is_safe is None:
        safe = g >= 0
    else:
        safe = np.array([bool(is_safe(p, y)) for p, y in zip(prompts, responses, strict=True)]).reshape(shape)
    extra = {k: run_scorer(s, prompts, responses).numpy().reshape(shape) for k, s in extra_scorers.items()}
    degenerate = np.array([is_degenerate(y) for y in responses], dtype=bool).reshape(shape)
    return Scores(r, g, safe, extra, degenerate)


def row_logps(rows: Sequence[SampleRow], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    if any(r.logp_policy is None or r.logp_ref is None for r in rows):
        return None
    lp = np.array([r.logp_policy for r in rows], dtype=np.float64).reshape(shape)
    lq = np.array([r.logp_ref for r in rows], dtype=np.float64).reshape(shape)
    return lp, lq


def row_metrics(
    name: str,
    family: str,
    param: float | None,
    scores: Scores,
    base: Scores,
    logps: tuple[np.ndarray, np.ndarray] | None,
    b: float,
    n_boot: int,
    seed: int,
    alpha: float,
    clusters: list[str] | None = None,
) -> ModelMetrics:
    boot = dict(n_boot=n_boot, seed=seed, alpha=alpha, clusters=clusters)
    mean_r, se_r = mean_and_stderr(scores.reward, clusters)
    mean_g, se_g = mean_and_stderr(scores.safety, clusters)
    lcb = bootstrap_lower_bound(scores.safety, alpha=alpha, n_boot=n_boot, seed=seed, clusters=clusters)
    extra = {k: float(v.mean()) for k, v in scores.extra.items()}
    learned = {field: extra[k] for k, field in LEARNED_FIELDS.items() if k in extra}
    per = {
        "reward": scores.reward.mean(axis=1),
        "safety": scores.safety.mean(axis=1),
        "safe": scores.safe.mean(axis=1),
        "helpful_win": _cross(scores.reward, base.reward),
        "harmless_win": _cross(scores.safety, base.safety),
    }
    if logps is not None:
        ratio = logps[0] - logps[1]  # (P, S)
        kl, kl_se = kl_estimate(*logps, clusters=clusters)
        per["kl"] = ratio.mean(axis=1)
        deg_kl = degenerate_kl_share(ratio, scores.degenerate)
    else:
        kl, kl_se, deg_kl = NAN, NAN, NAN
    return ModelMetrics(
        name=name,
        family=family,
        param=param,
        helpful_win=_cross_rate(scores.reward, base.reward, boot),
        harmless_win=_cross_rate(scores.safety, base.safety, boot),
        mean_reward=mean_r,
        mean_safety=mean_g,
        p_safe=float(scores.safe.mean()) if np.isfinite(scores.safety).all() else NAN,
        constraint_ok=constraint_holds(lcb, b),
        kl=kl,
        kl_se=kl_se,
        n=int(scores.reward.size),
        n_prompts=int(scores.reward.shape[0]),
        reward_se=se_r,
        safety_se=se_g,
        extra=extra,
        safety_lcb=lcb,
        degenerate_share=float(scores.degenerate.mean()),
        degenerate_kl_share=deg_kl,
        per_prompt={k: [float(x) for x in v] for k, v in per.items()},
        clusters=None if clusters is None else list(clusters),
        **learned,
    )


def _defined(*xs: np.ndarray) -> bool:
    return all(np.isfinite(x).all() for x in xs)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Prompt-level cross win rates, NaN when a scorer is undefined (not configured)."""
    return cross_outcomes(a, b) if _defined(a, b) else np.full(a.shape[0], NAN)


def _cross_rate(a: np.ndarray, b: np.ndarray, boot: dict[str, Any]) -> tuple[float, float, float]:
    return cross_win_rate(a, b, **boot) if _defined(a, b) else (NAN, NAN, NAN)


def scored_rows(rows: Sequence[SampleRow], scores: Scores, base: Scores) -> list[dict[str, Any]]:
    out = []
    flat = {
        "reward": scores.reward.ravel(),
        "safety": scores.safety.ravel(),
        "is_safe": scores.safe.ravel(),
        "sft_reward": base.reward.ravel(),
        "sft_safety": base.safety.ravel(),
    }
    flat["degenerate"] = scores.degenerate.ravel()
    extra = {k: v.ravel() for k, v in scores.extra.items()}
    for i, r in enumerate(rows):
        d = r.to_json()
        d.update({k: v[i].item() for k, v in flat.items()})
        d.update({f"score/{k}": v[i].item() for k, v in extra.items()})
        out.append(d)
    return out
