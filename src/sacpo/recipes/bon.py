"""`sacpo bon`: best-of-n sampling, with a reward scorer and optionally a safety constraint on the selection.

Unconstrained: draw y_1..y_n i.i.d. from the base policy p(·|x), return the one with the highest score r(x, y),
ties broken uniformly at random (a seeded random key per candidate: argmax over (score, key)).

Constrained (inference-time SACPO): select by r + λ·g with g a safety score (higher = safer; a cost model c
enters as g = −c, i.e. r − λ·c), λ ≥ 0 calibrated on *calibration prompts* (`sacpo.math.bon_calibrate`) — the
smallest λ of the passing run of a scan from λ = ∞ downward over the selection's jump points, a λ passing when
the lower confidence bound (`bound`: Wilson for "prob", Student t for "mean") of the safety statistic of the
selected responses meets its target

    constraint "prob":  P(g(x, y_sel) > safe_threshold) ≥ target        constraint "mean":  E[g(x, y_sel)] ≥ target

— then applied unchanged to the held-out prompts; both sets' constraint status is reported. If even λ → ∞ misses
the target on the calibration set, the constraint is infeasible for that n and the λ = ∞ selection is reported.
Calibration re-selects from cached candidates and their cached scores: no new generation and no re-scoring per λ.

Sampling layout (`sacpo.infer.pool`): per batch of prompts, ONE sampling call draws M = S·(N + 1) responses per
prompt, N = max(ns), S = n_samples independent best-of-n draws per prompt: candidate j of draw s is response
s·N + j, and response S·N + s is an independent base sample used as the win-rate opponent of draw s. Best-of-n for
n < N uses the *first n* candidates of each draw (i.i.d., so a valid best-of-n sample; nested prefixes make the
selected score non-decreasing in n per draw).

KL(π⁽ⁿ⁾‖p) has no closed form for sequences, so it is reported two ways (Beirami et al. 2024): the bound
log n − (n−1)/n, and an estimate averaged over the selections (`sacpo.infer.bon_stats`). A selection whose
selection score ties that of another distinct response of its prompt comes from a discrete score (e.g. the
toyworld's gold reward): within its level π⁽ⁿ⁾/p = M/q, so its estimate is log(M̂/q̂), M̂ = F̂ⁿ − (F̂ − q̂)ⁿ, with
F̂, q̂ the fractions of the prompt's S·(N+1) pooled responses (all base samples) scoring ≤ and = the selected one
(`sacpo.math.bon.bon_kl_level_estimate`). Any other selection keeps the ε-estimator KL̂(ε) with ε = p(y_sel|x)
(`sacpo.math.bon.bon_kl_estimate`), exact for continuous scores; under ties it overestimates (see
bon_kl_level_estimate). summary.json reports the fraction of level estimates per n (kl.level_fraction), each
sample row its kl_estimator. The rows' `logp_policy` is None (NaN KL in `sacpo eval`): log π⁽ⁿ⁾(y) is not
available. Win rate: the selected response of
draw s vs the independent base sample s of the same prompt, by the reward scorer (and by the gold oracle when
`oracle` is set), ties ½; bound n/(n+1).

Outputs (the directory replaced atomically, `sacpo.fsutil.atomic_dir`; files listed in `sacpo.recipes.bon_report`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sacpo.config import ConfigError
from sacpo.data.prompt_format import log_first_prompt
from sacpo.data.prompts import load_prompts
from sacpo.data.records import Prompt
from sacpo.infer.bon_cache import CANDIDATES_FILE, candidates_key, read_cached_pool
from sacpo.infer.bon_config import BonConfig
from sacpo.infer.bon_stats import selection_score, selection_stats
from sacpo.infer.pool import CandidatePool, Scores, sample_candidates, score_pool
from sacpo.math.bon_calibrate import calibrate_bon
from sacpo.math.bon_select import safety_statistic, select_best, take, tie_keys
from sacpo.models.load import (
    check_model_dir,
    fingerprint_model,
    fingerprint_tokenizer,
    load_model,
    load_tokenizer,
)
from sacpo.models.modules import resolve_device
from sacpo.recipes.bon_report import bon_summary, results_rows, sample_sets, write_bon_outputs
from sacpo.scoring import FunctionScorer, Scorer, check_scorer_spec, get_oracle, resolve_scorer

log = logging.getLogger("sacpo.bon")


@dataclass(frozen=True)
class PromptSets:
    """Which prompts calibrate λ and which are reported. split: per prompt "calibration" / "heldout" (None when
    unconstrained); n_calib: the leading prompts that came from calibration_split (0 for a random split)."""

    cal: torch.Tensor
    held: torch.Tensor
    report_rows: torch.Tensor
    split: list[str] | None
    n_calib: int


@dataclass
class Selections:
    """Per n: the selections chosen (P, S) (index within each draw) and their statistics, unconstrained (bon)
    and constrained (safe)."""

    bon: dict[int, dict[str, Any]] = field(default_factory=dict)
    safe: dict[int, dict[str, Any]] = field(default_factory=dict)
    chosen_bon: dict[int, torch.Tensor] = field(default_factory=dict)
    chosen_safe: dict[int, torch.Tensor] = field(default_factory=dict)


def run_bon(
    cfg: BonConfig,
    show_progress: bool = True,
    reward: Any | None = None,
    safety: Any | None = None,
) -> dict[str, Any]:
    """Best-of-n for every n of cfg.ns (and constrained best-of-n when cfg.target is set); writes the outputs
    and returns the summary. `reward` / `safety`: scorer objects that replace cfg.reward / cfg.safety
    (programmatic use, tests)."""
    started = time.time()
    _check_scorers(cfg, reward, safety)
    check_model_dir(cfg.model)
    prompts, n_calib = load_bon_prompts(cfg)
    sets = prompt_sets(cfg, len(prompts), n_calib)
    ns = sorted(set(cfg.ns))
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    key, pool, cached = _candidates(cfg, prompts, ns[-1], device, show_progress)
    seconds = {"sample": time.perf_counter() - t0}
    t0 = time.perf_counter()
    reward = reward if reward is not None else resolve_scorer(cfg.reward, cfg.reward_aggregate, str(device))
    if safety is None and cfg.safety is not None:
        safety = resolve_scorer(cfg.safety, cfg.safety_aggregate, str(device))
    scores = score_candidates(pool, reward, safety, cfg.oracle, show_progress)
    seconds["score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sel = select_all(cfg, pool, scores, ns, sets, show_progress)
    seconds["select"] = time.perf_counter() - t0
    names = (
        getattr(reward, "name", str(cfg.reward)),
        getattr(safety, "name", None) if safety is not None else None,
    )
    summary = bon_summary(cfg, pool, scores, ns, sets, sel, cached, names)
    summary["prompt_format"] = cfg.prompt_format().to_json()
    summary["seconds"] = {k: round(v, 3) for k, v in seconds.items()} | {
        "total": round(time.time() - started, 3)
    }
    samples = sample_sets(cfg, pool, scores, ns, sets, sel)
    results = results_rows(cfg, pool, scores, ns, sets, sel)
    selections = {"bon": sel.chosen_bon, "bon-safe": sel.chosen_safe}
    write_bon_outputs(
        Path(cfg.output_dir), cfg, key, pool, scores, sets.split, selections, samples, summary, results
    )
    return summary


def _check_scorers(cfg: BonConfig, reward: Any | None, safety: Any | None) -> None:
    """Scorer specs that are not replaced by objects must name a registered scorer or model directories."""
    if reward is None:
        check_scorer_spec(cfg.reward, "reward")
    if cfg.safety is not None and safety is None:
        check_scorer_spec(cfg.safety, "safety")
    if cfg.target is not None and cfg.safety is None and safety is None:
        raise ConfigError("a constraint target needs a safety scorer")


def load_bon_prompts(cfg: BonConfig) -> tuple[list[Prompt], int]:
    """(prompts, C): with calibration_split the C calibration prompts come first, then prompts_split's."""
    prompts = load_prompts(cfg.prompts, cfg.prompts_split, cfg.max_prompts)
    if cfg.calibration_split is None or cfg.target is None:
        return prompts, 0
    calib = load_prompts(cfg.prompts, cfg.calibration_split, cfg.calibration_max_prompts)
    return calib + prompts, len(calib)


def calibration_split(n_prompts: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out) prompt indices: a seeded random subset of round(fraction·P) prompts (≥ 1 each)."""
    if n_prompts < 2:
        raise ConfigError(f"a calibration / held-out split needs ≥ 2 prompts, got {n_prompts}")
    perm = list(range(n_prompts))
    random.Random(seed).shuffle(perm)
    k = min(max(1, round(fraction * n_prompts)), n_prompts - 1)
    return torch.tensor(sorted(perm[:k])), torch.tensor(sorted(perm[k:]))


def prompt_sets(cfg: BonConfig, n_prompts: int, n_calib: int) -> PromptSets:
    """Calibration / held-out / reported prompt indices: every reported row is on all but a calibration split's
    prompts; unconstrained, every prompt is all three."""
    everyone = torch.arange(n_prompts)
    report_rows = everyone[n_calib:]
    if cfg.target is None:
        return PromptSets(everyone, everyone, report_rows, None, n_calib)
    if n_calib:
        cal, held = everyone[:n_calib], report_rows
    else:
        cal, held = calibration_split(n_prompts, cfg.calibration_fraction, cfg.seed)
    split = ["heldout"] * n_prompts
    for i in cal.tolist():
        split[i] = "calibration"
    return PromptSets(cal, held, report_rows, split, n_calib)


def _candidates(
    cfg: BonConfig, prompts: list[Prompt], n_max: int, device: torch.device, show_progress: bool
) -> tuple[str, CandidatePool, bool]:
    """(cache key, pool, from cache?): reuse a matching cache in the output directory, else sample (one generate
    call per prompt batch + base log-probs)."""
    out, s_draws = Path(cfg.output_dir), cfg.n_samples
    tokenizer = load_tokenizer(cfg.model)
    fmt = cfg.prompt_format()
    log_first_prompt(log, tokenizer, prompts[0], fmt)
    key = candidates_key(
        fingerprint_model(cfg.model), fingerprint_tokenizer(tokenizer), prompts, s_draws, n_max,
        cfg.max_new_tokens, cfg.max_prompt_length, cfg.seed, fmt,
    )  # fmt: skip
    pool = read_cached_pool(out, key, prompts, s_draws, n_max)
    if pool is not None:
        log.info("bon: candidates from cache %s (no model loaded)", out / CANDIDATES_FILE)
        return key, pool, True
    model = load_model(cfg.model).to(device).eval()
    pool = sample_candidates(
        model, tokenizer, prompts, s_draws, n_max, max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size, seed=cfg.seed, max_prompt_length=cfg.max_prompt_length,
        logp_batch_size=cfg.logp_batch_size, show_progress=show_progress, prompt_format=fmt,
    )  # fmt: skip
    return key, pool, False


def score_candidates(
    pool: CandidatePool, reward: Scorer, safety: Scorer | None, oracle: str | None, show_progress: bool
) -> Scores:
    """Scores of every candidate (each distinct response once): the selection scorers and the oracle's gold
    reward, safety and is_safe (g* > 0 when the oracle has no is_safe)."""
    gold: dict[str, torch.Tensor] = {}
    if oracle is not None:
        o = get_oracle(oracle)
        gold["gold_reward"] = score_pool(o.reward, pool, show_progress=show_progress)
        gold["gold_safety"] = score_pool(o.safety, pool, show_progress=show_progress)
        if o.is_safe is None:
            gold["gold_safe"] = gold["gold_safety"] > 0
        else:
            is_safe = o.is_safe
            safe = FunctionScorer("is_safe", lambda p, y: float(is_safe(p, y)))
            gold["gold_safe"] = score_pool(safe, pool, show_progress=show_progress).bool()  # (P, M)
    return Scores(
        reward=score_pool(reward, pool, show_progress=show_progress),
        safety=score_pool(safety, pool, show_progress=show_progress) if safety is not None else None,
        **gold,
    )


def select_all(
    cfg: BonConfig, pool: CandidatePool, scores: Scores, ns: list[int], sets: PromptSets, show_progress: bool
) -> Selections:
    """Best-of-n per n (prefixes of each draw's candidates) and, with a target, the calibrated constrained one."""
    keys = tie_keys((len(pool.prompts), pool.n_draws, pool.group_size), cfg.seed)  # (P, S, N)
    r_grp = pool.grouped(scores.reward)  # (P, S, N)
    sel = Selections()
    for n in tqdm(ns, desc="bon select", disable=not show_progress):
        sel.chosen_bon[n] = select_best(r_grp, keys, n)  # (P, S)
        sel.bon[n] = selection_stats(pool, scores, sel.chosen_bon[n], n, sets.report_rows, cfg.safe_threshold)
        if cfg.target is not None:
            sel.chosen_safe[n], sel.safe[n] = _constrained(cfg, pool, scores, keys, n, sets)
    return sel


def _constrained(
    cfg: BonConfig, pool: CandidatePool, scores: Scores, keys: torch.Tensor, n: int, sets: PromptSets
) -> tuple[torch.Tensor, dict[str, Any]]:
    """λ calibrated on the calibration prompts, the selection by r + λ·g on all, and its statistics per set."""
    assert scores.safety is not None and cfg.target is not None
    r_grp, g_grp = pool.grouped(scores.reward), pool.grouped(scores.safety)  # (P, S, N)
    cal, held = sets.cal, sets.held
    calib = calibrate_bon(
        r_grp[cal], g_grp[cal], keys[cal], n, cfg.target, cfg.constraint, cfg.safe_threshold, cfg.confidence,
        int(held.numel()), cfg.bound,
    )  # fmt: skip
    chosen = select_best(r_grp, keys, n, g_grp, calib.lam)  # (P, S)
    score = selection_score(scores, calib.lam)
    stats = {}
    for name, idx in (("calibration", cal), ("heldout", held)):
        st = selection_stats(pool, scores, chosen, n, idx, cfg.safe_threshold, score)
        stat = safety_statistic(take(g_grp[idx], chosen[idx]), cfg.constraint, cfg.safe_threshold)
        st["constraint_statistic"] = stat
        st["constraint_ok"] = stat >= cfg.target
        stats[name] = st
    return chosen, {
        "n": n,
        "lam": None if math.isinf(calib.lam) else calib.lam,
        "feasible": calib.feasible,
        "calibration_statistic": calib.statistic,
        "calibration_bound": calib.bound,
        "bound_kind": calib.bound_kind,
        "selections_evaluated": calib.evaluations,
        "lambdas_in_scan": calib.candidates,
        **stats,
    }
