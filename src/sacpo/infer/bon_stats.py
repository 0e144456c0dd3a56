"""Statistics and sample rows of best-of-n selections on a candidate pool.

A selection is chosen (P, S): the index within each draw's N candidates (`sacpo.math.bon_select.select_best`);
its opponent is the draw's independent base sample. Win rates are 1[a > b] + ½·1[a = b], averaged per prompt
first (mean ± s.e. over prompts); KL(π⁽ⁿ⁾‖p) is reported as the bound log n − (n−1)/n and an estimate per
selection: where the selection score of the selected response ties that of another distinct response of the prompt
(a discrete score), the level estimate log(M̂/q̂) with F̂, q̂ the fractions of the prompt's S·(N+1) responses — all
i.i.d. base samples — scoring ≤ and = the selected one; otherwise the ε-estimator KL̂(ε), ε = p(y_sel|x)
(`sacpo.math.bon_select.kl_per_selection`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sacpo.infer.bon_cache import SCORE_FIELDS, prompt_json
from sacpo.infer.pool import CandidatePool, Scores
from sacpo.math.bon import bon_kl_bound, bon_win_rate_bound
from sacpo.math.bon_select import kl_per_selection, kl_stats, prompt_mean_se, selected_levels, win_outcomes


def selection_score(scores: Scores, lam: float = 0.0) -> torch.Tensor:
    """(P, M) the score a selection ranks candidates by, with the selection's ties: r (λ = 0 or no safety
    scorer), r + λ·g (the same float operations as `select_best`), or at λ = ∞ the per-prompt dense rank of
    (g, r) in lexicographic order (safest first, then highest reward)."""
    if lam == 0.0 or scores.safety is None:
        return scores.reward
    if not math.isinf(lam):
        return scores.reward + lam * scores.safety
    p, m = scores.reward.shape
    prompt = torch.arange(p, dtype=torch.float64).unsqueeze(1).expand(p, m)
    pairs = torch.stack([prompt, scores.safety.double(), scores.reward.double()], -1).reshape(-1, 3)
    _, rank = torch.unique(pairs, dim=0, return_inverse=True)  # sorted rows: lexicographic in (prompt, g, r)
    return rank.view(p, m).double()


def selection_stats(
    pool: CandidatePool,
    scores: Scores,
    chosen: torch.Tensor,
    n: int,
    rows: torch.Tensor | None = None,
    threshold: float = 0.0,
    score: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Statistics of a selection chosen (P, S) (index within each draw) over prompt subset `rows` (all if None):
    win rate vs the base sample (scorer, and gold), mean scores, P(safe), KL bound and estimate (with
    level_fraction: the fraction of selections whose KL is the level estimate). score: (P, M) the selection
    score (`selection_score`; None = the reward), whose ties decide the KL estimator."""
    rows = torch.arange(len(pool.prompts)) if rows is None else rows
    col = pool.global_index(chosen)[rows]  # (p, S)
    score = scores.reward if score is None else score
    levels = selected_levels(score[rows], pool.distinct_ids()[rows], col)

    def sel(x: torch.Tensor) -> torch.Tensor:
        return x[rows].gather(1, col)

    def opp(x: torch.Tensor) -> torch.Tensor:
        return pool.base(x)[rows]

    out: dict[str, Any] = {
        "n": n,
        "n_prompts": int(rows.numel()),
        "win_rate": prompt_mean_se(win_outcomes(sel(scores.reward), opp(scores.reward))),
        "win_rate_bound": bon_win_rate_bound(n),
        "reward": prompt_mean_se(sel(scores.reward)),
        "kl": kl_stats(sel(pool.logp), n, levels),
        "mean_response_tokens": sel(pool.response_tokens).double().mean().item(),
        # compute per selection: the base tokens sampled for its n candidates and the n scorer calls
        "cost": {
            "base_sampled_tokens": pool.grouped(pool.response_tokens)[rows][..., :n]
            .sum(-1)
            .double()
            .mean()
            .item(),
            "scorer_calls": n,
        },
    }
    if scores.safety is not None:
        out["safety"] = prompt_mean_se(sel(scores.safety))
        out["p_safe"] = (sel(scores.safety) > threshold).double().mean().item()
    if scores.gold_reward is not None:
        assert scores.gold_safety is not None and scores.gold_safe is not None
        out["gold_win_rate"] = prompt_mean_se(win_outcomes(sel(scores.gold_reward), opp(scores.gold_reward)))
        out["gold_reward"] = prompt_mean_se(sel(scores.gold_reward))
        out["gold_safety"] = prompt_mean_se(sel(scores.gold_safety))
        out["gold_harmless_win_rate"] = prompt_mean_se(
            win_outcomes(sel(scores.gold_safety), opp(scores.gold_safety))
        )
        out["gold_p_safe"] = sel(scores.gold_safe).double().mean().item()
    return out


def base_stats(
    pool: CandidatePool, scores: Scores, threshold: float = 0.0, rows: torch.Tensor | None = None
) -> dict[str, Any]:
    """Mean scores and P(safe) of the independent base samples (what every win rate is measured against), over
    the prompts `rows` (all if None)."""
    rows = torch.arange(len(pool.prompts)) if rows is None else rows

    def base(x: torch.Tensor) -> torch.Tensor:
        return pool.base(x)[rows]

    out: dict[str, Any] = {
        "reward": prompt_mean_se(base(scores.reward)),
        "mean_response_tokens": base(pool.response_tokens).double().mean().item(),
    }
    if scores.safety is not None:
        out["safety"] = prompt_mean_se(base(scores.safety))
        out["p_safe"] = (base(scores.safety) > threshold).double().mean().item()
    if scores.gold_reward is not None:
        assert scores.gold_safety is not None and scores.gold_safe is not None
        out["gold_reward"] = prompt_mean_se(base(scores.gold_reward))
        out["gold_safety"] = prompt_mean_se(base(scores.gold_safety))
        out["gold_p_safe"] = base(scores.gold_safe).double().mean().item()
    return out


def sample_rows(
    pool: CandidatePool,
    scores: Scores,
    col: torch.Tensor,
    n: int,
    extra: dict[str, Any],
    split: list[str] | None,
    rows: torch.Tensor,
    is_base: bool = False,
    score: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """samples.jsonl rows (SampleRow fields + BoN fields) of the responses at global columns col (P, S), for the
    prompts `rows`; kl_estimate is the selection's KL estimate and kl_estimator which one ("level" or "epsilon",
    `sacpo.math.bon_select.kl_per_selection`; score: (P, M) the selection score, None = the reward).

    is_base: the rows are base-policy samples, so logp_policy = logp_ref is their exact log-prob (KL 0); else
    logp_policy is None: log π⁽ⁿ⁾(y) has no closed form (evaluate's k1 KL of a BoN artifact is undefined)."""
    score = scores.reward if score is None else score
    levels = None if is_base else selected_levels(score, pool.distinct_ids(), col)
    kl_row, level = kl_per_selection(pool.logp.gather(1, col), n, levels)  # (P, S) each
    bound = bon_kl_bound(n)
    out = []
    for i in rows.tolist():
        for s in range(pool.n_draws):
            j = int(col[i, s])
            logp = float(pool.logp[i, j])
            row: dict[str, Any] = {
                "prompt": prompt_json(pool.prompts[i]),
                "response": pool.responses[i][j],
                "sample": s,
                "logp_policy": logp if is_base else None,
                "logp_ref": logp,
                "prompt_index": i,
                "response_tokens": int(pool.response_tokens[i, j]),
                "finished": bool(pool.finished[i, j]),
                "roundtrip": bool(pool.roundtrip[i, j]),
                "n": n,
                "column": j,
                "kl_estimate": float(kl_row[i, s]),
                "kl_estimator": "level" if level[i, s] else "epsilon",
                "kl_bound": bound,
                **extra,
            }
            if split is not None:
                row["split"] = split[i]
            for name in SCORE_FIELDS:
                t = getattr(scores, name)
                if t is not None:
                    row[name] = bool(t[i, j]) if name == "gold_safe" else float(t[i, j])
            out.append(row)
    return out
