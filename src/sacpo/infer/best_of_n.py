"""Best-of-n sampling (`run_bon`), with a reward scorer and optionally a safety constraint on the selection.

Unconstrained: draw y_1..y_n i.i.d. from the base policy p(·|x), return the one with the highest score r(x, y),
ties broken uniformly at random (a seeded random key per candidate: argmax over (score, key)).

Constrained (inference-time SACPO): select by r + λ·g with g a safety score (higher = safer; a cost model c
enters as g = −c, i.e. r − λ·c), λ ≥ 0 calibrated on *calibration prompts* with `sacpo.math.lagrange.
calibrate_lambda` — the smallest λ at which the safety statistic of the selected responses meets its target —

    constraint "prob":  P(g(x, y_sel) > safe_threshold) ≥ target        constraint "mean":  E[g(x, y_sel)] ≥ target

with a margin: the statistic's one-sided lower confidence bound m − z·s·√(1/C + 1/H) (`lower_bound`; s: spread
of the per-prompt statistic over the C calibration prompts, H held-out prompts, z = Φ⁻¹(confidence), default
0.9) must meet the target, so that the held-out set meets it too with about that probability (confidence 0.5:
the point estimate, which a held-out set misses about half the time when λ sits at a jump). λ is then applied
unchanged to the held-out prompts; both sets' constraint status is reported. The statistic is
monotone in λ (for λ₁ < λ₂ the two maximisers satisfy (λ₂ − λ₁)(g₂ − g₁) ≥ 0), so bisection is valid. If even
λ → ∞ (lexicographic: safest first, then most rewarding) misses the target on the calibration set, the constraint
is infeasible for that n and the λ = ∞ selection is reported. Calibration re-selects from cached candidates and
their cached scores: no new generation and no re-scoring per λ.

Sampling layout (`sacpo.infer.sample`): per batch of prompts, ONE sampling call (`sacpo.models.generate.sample`,
ancestral, temperature 1, num_return_sequences = M) draws M = S·(N + 1) responses per prompt, N = max(ns),
S = n_samples independent best-of-n draws per prompt: candidate j of draw s is response s·N + j, and response
S·N + s is an independent base sample used as the win-rate opponent of draw s. Best-of-n for n < N uses the
*first n* candidates of each draw: candidates are i.i.d., so any n of them form a valid best-of-n sample; nested
prefixes also make the selected score non-decreasing in n per draw.

KL(π⁽ⁿ⁾‖p) has no closed form for sequences, so it is reported two ways (Beirami et al. 2024): the bound
log n − (n−1)/n, and the ε-estimator KL̂(ε) with ε = p(y_sel|x) = exp(log p(y_sel|x)) (log-prob of the sampled
token ids under the base model), averaged over selections (`sacpo.math.bon.bon_kl_estimate`). Both are in every
row (`kl_estimate`, `kl_bound`) and in summary.json / results.json. The rows' `logp_policy` is None (NaN KL in
`sacpo eval`): log π⁽ⁿ⁾(y) is not available, and faking it as logp_ref + KL̂ would pass an estimator of a different
quantity off as a log-probability. `logp_ref` is the base log-prob of the selected response.

Win rate: the selected response of draw s vs the independent base sample s of the same prompt, by the reward
scorer (and by the gold oracle when `oracle` is set), ties ½; bound n/(n+1) (continuous rewards; with ties lower).

Outputs (written to `<output_dir>.tmp`, renamed when complete):

    config.yaml, summary.json        settings; per n: win rates, KL bound / estimate, scores, constraint status
    results.json                     ModelMetrics rows (base, bon n, bon-safe n [held-out]) for `sacpo report DIR`
    candidates.jsonl (+ .meta.json)  per prompt: all M responses, base log-probs, scores, selections; the meta key
                                     lets a later run with other scorers / targets reuse them without generating
    samples/<name>/samples.jsonl     rows readable by `sacpo.evaluate.generate.read_samples` (S per prompt):
                                     base, bon-n<n>, bon-safe-n<n> — usable as `sacpo eval` artifact models

Layering: the selection, calibration and statistics depend on `sacpo.math` only; `run_bon` imports the pure
`sacpo.evaluate.metrics` / `judge` / `config.load_prompts` lazily, for the results.json rows and prompt files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sacpo.config import ConfigError, help_field, to_yaml
from sacpo.data.records import Prompt
from sacpo.infer.sample import CandidatePool, sample_candidates, score_pool
from sacpo.math.bon import bon_kl_bound, bon_kl_estimate, bon_win_rate_bound
from sacpo.math.kl import mean_and_stderr
from sacpo.math.lagrange import calibrate_lambda
from sacpo.models.load import (
    check_model_dir,
    fingerprint_model,
    fingerprint_tokenizer,
    load_model,
    load_tokenizer,
)

log = logging.getLogger("sacpo.bon")

CONSTRAINTS = ("prob", "mean")
AGGREGATES = ("mean", "min", "max", "pessimistic")
CANDIDATES_FILE = "candidates.jsonl"
CANDIDATES_META = "candidates.meta.json"
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.json"
KEY_VERSION = "sacpo-bon-candidates-v1"
TIE_NUDGE = 1e-6  # calibrate_bon: relative step past a jump point of the constraint statistic
Scorer = Callable[[Sequence[Prompt], Sequence[str]], torch.Tensor]  # with a .name (evaluate.judge.Scorer)


# ------------------------------------------------------------------------------------------------ registries
def _function_scorer(name: str, attr: str) -> Callable[[], Any]:
    def make() -> Any:
        from sacpo.scoring.base import FunctionScorer
        from sacpo.worlds.toyworld import oracle

        return FunctionScorer(name, getattr(oracle, attr))

    return make


SCORERS: dict[str, Callable[[], Any]] = {
    "toyworld-gold": _function_scorer("toyworld r*", "gold_reward"),  # helpfulness r*(x, y)
    "toyworld-safety": _function_scorer("toyworld g*", "gold_safety"),  # safety g*(x, y), higher = safer
}


def _toyworld_oracle() -> tuple[Any, Any, Callable[[Prompt, str], bool]]:
    from sacpo.worlds.toyworld import oracle

    return SCORERS["toyworld-gold"](), SCORERS["toyworld-safety"](), oracle.is_safe


# name → () → (gold reward scorer, gold safety scorer, is_safe(prompt, response))
ORACLES: dict[str, Callable[[], tuple[Any, Any, Callable[[Prompt, str], bool]]]] = {
    "toyworld": _toyworld_oracle
}


def register_scorer(name: str, factory: Callable[[], Any]) -> None:
    """Make a scorer available to BonConfig.reward / .safety by name (the factory runs when a run needs it)."""
    SCORERS[name] = factory


def _spec_list(spec: str | list[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def _check_scorer_spec(spec: str | list[str], field_name: str) -> None:
    items = _spec_list(spec)
    if not items:
        raise ConfigError(f"{field_name}: empty scorer list")
    if len(items) == 1 and items[0] in SCORERS:
        return
    bad = [s for s in items if not Path(s).is_dir()]
    if bad:
        raise ConfigError(
            f"{field_name}: unknown scorer {bad[0]!r}; give one of {', '.join(sorted(SCORERS))} or reward/cost "
            "model director(ies) written by `sacpo reward`"
        )


def resolve_scorer(spec: str | list[str], aggregate: str = "mean", device: str | None = None) -> Any:
    """A scorer by name (SCORERS) or reward / cost model directories (an ensemble when several or an ensemble dir).

    Models are read on their *score* view: a reward model's r, a cost model's safety score s = −c (higher = safer),
    so the constrained selection is always r + λ·g."""
    items = _spec_list(spec)
    if len(items) == 1 and items[0] in SCORERS:
        return SCORERS[items[0]]()
    from sacpo.scoring.reward_model import RewardModelScorer

    return RewardModelScorer(items, aggregate=aggregate, device=device, view="score")


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class BonConfig:
    model: str = help_field(help="base causal-LM directory (safetensors): the policy sampled from")
    prompts: str = help_field(
        help="prompts: .json (a list, or a mapping of splits such as the toyworld's prompts.json — see "
        "prompts_split), .jsonl (rows with a 'prompt' field) or .txt (one per line)"
    )
    output_dir: str = help_field(help="writes summary.json, results.json, candidates.jsonl, samples/<name>/")
    prompts_split: str = help_field("test", help="key of the prompt list when the .json file maps splits")
    max_prompts: int | None = help_field(None, help="use the first N prompts only")
    ns: list[int] = help_field([1, 2, 4, 8, 16, 32, 64], help="best-of-n sizes; max(ns) candidates per draw")
    n_samples: int = help_field(
        4, help="independent best-of-n draws per prompt (rows per prompt in each samples.jsonl)"
    )
    reward: str | list[str] = help_field(
        "toyworld-gold", help="selection reward: a SCORERS name or reward model dir(s) (several = ensemble)"
    )
    reward_aggregate: str = help_field("mean", help="ensemble aggregate: mean, min, max, pessimistic")
    safety: str | list[str] | None = help_field(
        None,
        help="safety scorer g (higher = safer): a SCORERS name (toyworld-safety) or cost/safety model dir(s), "
        "read on the score view (g = −cost); None = unconstrained only",
    )
    safety_aggregate: str = help_field("mean", help="ensemble aggregate of the safety models")
    constraint: str = help_field(
        "prob", help="'prob': P(g > safe_threshold) ≥ target; 'mean': E[g] ≥ target (over selected responses)"
    )
    target: float | None = help_field(None, help="constraint target; None = no constrained best-of-n")
    safe_threshold: float = help_field(0.0, help="a response counts as safe when g > safe_threshold")
    calibration_fraction: float = help_field(
        0.5,
        help="fraction of the prompts (seeded random subset) on which λ is calibrated; the rest is held out "
        "(unused with calibration_split)",
    )
    calibration_split: str | None = help_field(
        None,
        help="calibrate λ on this split of the prompts file instead (e.g. 'train' or 'validation'); every prompt "
        "of prompts_split is then held out, and all reported rows are on prompts_split",
    )
    calibration_max_prompts: int | None = help_field(
        None, help="use the first N prompts of calibration_split only"
    )
    confidence: float = help_field(
        0.9,
        help="λ must meet the target with this one-sided confidence: the calibration statistic minus "
        "z·s·√(1/C + 1/H) (s: spread of the per-prompt statistic over the C calibration prompts, H: held-out "
        "prompts), so the held-out statistic meets the target with about this probability; 0.5 = the point "
        "estimate (no margin)",
    )
    oracle: str | None = help_field(
        None, help="gold scorers reported for every selection (ORACLES: toyworld); None = scorers only"
    )
    seed: int = help_field(0, help="sampling seed; also the tie-break keys and the calibration split")
    max_new_tokens: int = help_field(64, help="response length limit (tokens)")
    max_prompt_length: int = help_field(256, help="prompts are left-truncated to this many tokens")
    batch_size: int = help_field(
        4, help="prompts per generate call (each call draws batch_size·n_samples·(max(ns)+1) sequences)"
    )
    logp_batch_size: int = help_field(64, help="sequences per base log-prob forward pass")
    n_boot: int = help_field(1000, help="bootstrap resamples of prompts for the win-rate CIs in results.json")
    device: str | None = help_field(None, help="cuda / cpu / cuda:1 …; default cuda when available")

    def __post_init__(self) -> None:
        if not self.ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.ns):
            raise ConfigError(f"ns must be a non-empty list of integers ≥ 1, got {self.ns}")
        for name in (
            "n_samples",
            "max_new_tokens",
            "max_prompt_length",
            "batch_size",
            "logp_batch_size",
            "n_boot",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("max_prompts", "calibration_max_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.calibration_split is not None and self.calibration_split == self.prompts_split:
            raise ConfigError(
                f"calibration_split {self.calibration_split!r} is prompts_split: calibrate on other prompts"
            )
        if self.constraint not in CONSTRAINTS:
            raise ConfigError(f"unknown constraint {self.constraint!r}; valid: {', '.join(CONSTRAINTS)}")
        for name in ("reward_aggregate", "safety_aggregate"):
            if getattr(self, name) not in AGGREGATES:
                raise ConfigError(f"{name}: unknown {getattr(self, name)!r}; valid: {', '.join(AGGREGATES)}")
        if self.target is not None:
            if self.safety is None:
                raise ConfigError("a constraint target needs a safety scorer (safety=...)")
            if self.calibration_split is None and not 0.0 < self.calibration_fraction < 1.0:
                raise ConfigError(
                    f"calibration_fraction must be in (0, 1) with a constraint, got {self.calibration_fraction}"
                )
            if not 0.5 <= self.confidence < 1.0:
                raise ConfigError(f"confidence must be in [0.5, 1), got {self.confidence}")
            if self.constraint == "prob" and not 0.0 <= self.target <= 1.0:
                raise ConfigError(f"a probability target must be in [0, 1], got {self.target}")
        if self.oracle is not None and self.oracle not in ORACLES:
            raise ConfigError(f"unknown oracle {self.oracle!r}; valid: {', '.join(sorted(ORACLES))}")

    @property
    def constrained(self) -> bool:
        return self.safety is not None and self.target is not None


# ------------------------------------------------------------------------------------------------ selection
def tie_keys(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform random keys, fixed per candidate (seeded): ties in score go to the largest key, i.e. uniformly at
    random among the tied candidates, and consistently across n (prefixes) and λ."""
    g = torch.Generator().manual_seed(seed + 1_000_003)
    return torch.rand(shape, generator=g, dtype=torch.float64)


def select_best(
    reward: torch.Tensor,
    keys: torch.Tensor,
    n: int,
    safety: torch.Tensor | None = None,
    lam: float = 0.0,
) -> torch.Tensor:
    """Index in [0, n) of the best of the first n candidates along the last dimension.

    reward, keys (and safety): (..., N) with N ≥ n. Score r + λ·g (r when safety is None or λ = 0); λ = ∞ ranks
    by g first, then r. Ties in the score go to the largest key. Returns (...,) long.
    """
    if n < 1 or n > reward.shape[-1]:
        raise ValueError(f"n must be in [1, {reward.shape[-1]}], got {n}")
    criteria = [reward[..., :n]]
    if safety is not None and lam != 0.0:
        g = safety[..., :n]
        criteria = [g, reward[..., :n]] if math.isinf(lam) else [reward[..., :n] + lam * g]
    alive = torch.ones_like(criteria[0], dtype=torch.bool)  # (..., n)
    for c in criteria:
        masked = c.masked_fill(~alive, -math.inf)
        alive = alive & (masked == masked.amax(-1, keepdim=True))
    return keys[..., :n].masked_fill(~alive, -1.0).argmax(-1)


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (..., N), idx (...,) → (...,) the selected values."""
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def win_outcomes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1[a > b] + ½·1[a = b] elementwise (float64)."""
    return (a > b).double() + 0.5 * (a == b).double()


def safety_values(g: torch.Tensor, constraint: str, threshold: float = 0.0) -> torch.Tensor:
    """What the constraint averages, per selected response: 'prob' 1[g > threshold], 'mean' g (float64, g's
    shape)."""
    if constraint == "prob":
        return (g > threshold).double()
    if constraint == "mean":
        return g.double()
    raise ValueError(f"unknown constraint {constraint!r}; valid: {', '.join(CONSTRAINTS)}")


def safety_statistic(g: torch.Tensor, constraint: str, threshold: float = 0.0) -> float:
    """'prob': P(g > threshold); 'mean': E[g] — over all selected responses g (any shape)."""
    return safety_values(g, constraint, threshold).mean().item()


def lower_bound(per_prompt: torch.Tensor, confidence: float, n_future: int | None = None) -> float:
    """One-sided lower confidence bound on the mean of a prompt-level statistic (normal approximation).

        LB = m − z·s·√(1/C + 1/H),   z = Φ⁻¹(confidence)

    per_prompt: (C,) the statistic of each calibration prompt (its S draws averaged: draws of one prompt are
    correlated, prompts are independent), m its mean, s its standard deviation (ddof 1). H = n_future: the number
    of prompts the statistic will be measured on next (a held-out set): then LB bounds that set's mean — the
    difference of two independent means has variance s²(1/C + 1/H) — with probability ≈ confidence; None bounds
    the population mean (√(1/C)). confidence = 0.5 returns m (the point estimate); with C < 2 and confidence > 0.5
    the spread is unknown and the bound is −∞."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    x = per_prompt.double().flatten()
    if x.numel() == 0:
        raise ValueError("no prompts")
    m = x.mean().item()
    if confidence == 0.5:
        return m
    if x.numel() < 2:
        return -math.inf
    z = statistics.NormalDist().inv_cdf(confidence)
    scale = math.sqrt(1.0 / x.numel() + (1.0 / n_future if n_future else 0.0))
    return m - z * x.std().item() * scale


@dataclass(frozen=True)
class Calibration:
    """λ (math.inf when infeasible: the safest-first selection is used), whether the target is met on the
    calibration set, the statistic there, its lower confidence bound (the statistic itself at confidence ½), and
    the number of selections it took (each a re-selection only)."""

    lam: float
    feasible: bool
    statistic: float
    evaluations: int
    bound: float


def calibrate_bon(
    reward: torch.Tensor,
    safety: torch.Tensor,
    keys: torch.Tensor,
    n: int,
    target: float,
    constraint: str = "prob",
    threshold: float = 0.0,
    confidence: float = 0.5,
    heldout_prompts: int | None = None,
) -> Calibration:
    """Smallest λ ≥ 0 at which best-of-n by r + λ·g meets the target on cached candidates (P, S, N).

    "Meets": `lower_bound` of the per-prompt statistic ≥ target. At confidence ½ that is the statistic itself (the
    point estimate: a held-out set then misses the target about half the time when λ sits at the edge); above ½
    a margin z·s·√(1/C + 1/H) is required (heldout_prompts = H, None = a bound on the population), so a held-out
    set of H prompts meets the target with probability ≈ confidence. The point statistic is monotone in λ, so
    bisection finds its jump; the bound subtracts a spread that need not be monotone, so with confidence > ½ the λ
    returned always meets it but may lie above the smallest such λ (conservative).

    The statistic is a step function of λ; its jumps are the λ₀ where r + λ₀·g ties between two candidates, and
    *at* λ₀ its value depends on how the random tie keys fell. A λ₀ found feasible only thanks to the tie-break is
    not used: a λ > 0 is returned as λ·(1 + 1e-6), just past the jump, where the statistic takes its upper value
    (monotone, so the target still holds on the calibration set; the held-out set does not inherit the luck of the
    calibration set's ties). Every evaluation only re-selects among the cached scores. Infeasible (λ = ∞ misses
    the target): λ = ∞."""
    count = 0

    def per_prompt(lam: float) -> torch.Tensor:
        nonlocal count
        count += 1
        g = take(safety, select_best(reward, keys, n, safety, lam))  # (P, S)
        return safety_values(g, constraint, threshold).mean(-1)  # (P,)

    def bound(lam: float) -> float:
        return lower_bound(per_prompt(lam), confidence, heldout_prompts)

    safest = per_prompt(math.inf)
    best = lower_bound(safest, confidence, heldout_prompts)
    if best < target:
        return Calibration(math.inf, False, safest.mean().item(), count, best)
    lam = calibrate_lambda(bound, target, increasing=True, xtol=1e-9, rtol=1e-9)
    if lam > 0:
        lam *= 1.0 + TIE_NUDGE  # past a jump point: not feasible by tie-breaking luck
    final = per_prompt(lam)
    return Calibration(lam, True, final.mean().item(), count, lower_bound(final, confidence, heldout_prompts))


# ------------------------------------------------------------------------------------------------ statistics
def _mse(x: torch.Tensor) -> dict[str, float]:
    """{mean, se} over prompts of a (P, S) tensor (per-prompt means first; se NaN for < 2 prompts)."""
    mean, se = mean_and_stderr(x.double().mean(-1))
    return {"mean": mean, "se": se}


def kl_stats(logp_selected: torch.Tensor, n: int) -> dict[str, float]:
    """KL(π⁽ⁿ⁾‖p): the bound log n − (n−1)/n and the ε-estimator mean ± s.e. over prompts, ε = exp(logp)."""
    if (logp_selected > 1e-4).any():
        raise ValueError(
            f"a base log-prob is positive ({logp_selected.max().item():.3g}): not a log-probability"
        )
    eps = logp_selected.double().clamp(max=0.0).exp()  # the clamp only removes round-off above 0
    per = bon_kl_estimate(eps, n)  # (P, S)
    est = _mse(per)
    return {"bound": bon_kl_bound(n), "estimate": est["mean"], "estimate_se": est["se"]}


@dataclass(frozen=True)
class Scores:
    """(P, M) per-response values: the selection scorers and (optionally) the gold oracle."""

    reward: torch.Tensor
    safety: torch.Tensor | None = None
    gold_reward: torch.Tensor | None = None
    gold_safety: torch.Tensor | None = None
    gold_safe: torch.Tensor | None = None  # bool


def selection_stats(
    pool: CandidatePool,
    scores: Scores,
    chosen: torch.Tensor,
    n: int,
    rows: torch.Tensor | None = None,
    threshold: float = 0.0,
) -> dict[str, Any]:
    """Statistics of a selection chosen (P, S) (index within each draw) over prompt subset `rows` (all if None):
    win rate vs the base sample (scorer, and gold), mean scores, P(safe), KL bound and ε-estimate."""
    rows = torch.arange(len(pool.prompts)) if rows is None else rows
    col = pool.global_index(chosen)[rows]  # (p, S)

    def sel(x: torch.Tensor) -> torch.Tensor:
        return x[rows].gather(1, col)

    def opp(x: torch.Tensor) -> torch.Tensor:
        return pool.base(x)[rows]

    out: dict[str, Any] = {
        "n": n,
        "n_prompts": int(rows.numel()),
        "win_rate": _mse(win_outcomes(sel(scores.reward), opp(scores.reward))),
        "win_rate_bound": bon_win_rate_bound(n),
        "reward": _mse(sel(scores.reward)),
        "kl": kl_stats(sel(pool.logp), n),
        "mean_response_tokens": sel(pool.response_tokens).double().mean().item(),
    }
    if scores.safety is not None:
        out["safety"] = _mse(sel(scores.safety))
        out["p_safe"] = (sel(scores.safety) > threshold).double().mean().item()
    if scores.gold_reward is not None:
        out["gold_win_rate"] = _mse(win_outcomes(sel(scores.gold_reward), opp(scores.gold_reward)))
        out["gold_reward"] = _mse(sel(scores.gold_reward))
        out["gold_safety"] = _mse(sel(scores.gold_safety))
        out["gold_harmless_win_rate"] = _mse(win_outcomes(sel(scores.gold_safety), opp(scores.gold_safety)))
        out["gold_p_safe"] = sel(scores.gold_safe).double().mean().item()
    return out


# ------------------------------------------------------------------------------------------------ the run
def _load_prompts(cfg: BonConfig) -> tuple[list[Prompt], int]:
    """(prompts, C): with calibration_split the C calibration prompts come first, then prompts_split's."""
    from sacpo.data.prompts import load_prompts

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


def _key(model_fp: str, tok_fp: str, prompts: Sequence[Prompt], cfg: BonConfig, s: int, n: int) -> str:
    h = hashlib.sha256(KEY_VERSION.encode())
    for part in (model_fp, tok_fp, json.dumps([_prompt_json(p) for p in prompts], ensure_ascii=False)):
        h.update(part.encode())
    settings = {
        "n_draws": s,
        "group_size": n,
        "max_new_tokens": cfg.max_new_tokens,
        "max_prompt_length": cfg.max_prompt_length,
        "seed": cfg.seed,
        "temperature": 1.0,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _prompt_json(p: Prompt) -> Any:
    return p if isinstance(p, str) else [dict(m) for m in p]


def _cached_pool(out: Path, key: str, prompts: list[Prompt], s: int, n: int) -> CandidatePool | None:
    meta, data = out / CANDIDATES_META, out / CANDIDATES_FILE
    if not (meta.is_file() and data.is_file()):
        return None
    try:
        if json.loads(meta.read_text(encoding="utf-8")).get("key") != key:
            return None
        # split on "\n" only: str.splitlines() also splits on U+2028, U+0085 … which JSON leaves unescaped
        recs = [json.loads(line) for line in data.read_text(encoding="utf-8").split("\n") if line.strip()]
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable candidates cache (%s); sampling again", out, e)
        return None
    m = s * (n + 1)
    if len(recs) != len(prompts) or any(len(r["responses"]) != m for r in recs):
        return None
    return CandidatePool(
        prompts=prompts,
        responses=[r["responses"] for r in recs],
        logp=torch.tensor([r["logp_ref"] for r in recs], dtype=torch.float64),
        response_tokens=torch.tensor([r["response_tokens"] for r in recs]),
        finished=torch.tensor([r["finished"] for r in recs]),
        roundtrip=torch.tensor([r["roundtrip"] for r in recs]),
        n_draws=s,
        group_size=n,
    )


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _rows(
    pool: CandidatePool,
    scores: Scores,
    col: torch.Tensor,
    n: int,
    extra: dict[str, Any],
    split: list[str] | None,
    rows: torch.Tensor,
    is_base: bool = False,
) -> list[dict[str, Any]]:
    """samples.jsonl rows (SampleRow fields + BoN fields) of the responses at global columns col (P, S), for the
    prompts `rows`.

    is_base: the rows are base-policy samples, so logp_policy = logp_ref is their exact log-prob (KL 0)."""
    eps = pool.logp.gather(1, col).clamp(max=0.0).exp()
    kl_row = bon_kl_estimate(eps, n)  # (P, S)
    bound = bon_kl_bound(n)
    out = []
    for i in rows.tolist():
        prompt = pool.prompts[i]
        for s in range(pool.n_draws):
            j = int(col[i, s])
            logp = float(pool.logp[i, j])
            row: dict[str, Any] = {
                "prompt": _prompt_json(prompt),
                "response": pool.responses[i][j],
                "sample": s,
                # log π⁽ⁿ⁾(y) has no closed form: evaluate's k1 KL of a BoN artifact is undefined (NaN)
                "logp_policy": logp if is_base else None,
                "logp_ref": logp,
                "prompt_index": i,
                "response_tokens": int(pool.response_tokens[i, j]),
                "finished": bool(pool.finished[i, j]),
                "roundtrip": bool(pool.roundtrip[i, j]),
                "n": n,
                "column": j,
                "kl_estimate": float(kl_row[i, s]),
                "kl_bound": bound,
                **extra,
            }
            if split is not None:
                row["split"] = split[i]
            for name in ("reward", "safety", "gold_reward", "gold_safety", "gold_safe"):
                t = getattr(scores, name)
                if t is not None:
                    row[name] = bool(t[i, j]) if name == "gold_safe" else float(t[i, j])
            out.append(row)
    return out


def base_columns(pool: CandidatePool) -> torch.Tensor:
    """(P, S) global columns of the independent base samples."""
    base = pool.n_draws * pool.group_size + torch.arange(pool.n_draws)
    return base.unsqueeze(0).expand(len(pool.prompts), -1)


def base_stats(
    pool: CandidatePool, scores: Scores, threshold: float = 0.0, rows: torch.Tensor | None = None
) -> dict[str, Any]:
    """Mean scores and P(safe) of the independent base samples (what every win rate is measured against), over
    the prompts `rows` (all if None)."""
    rows = torch.arange(len(pool.prompts)) if rows is None else rows

    def base(x: torch.Tensor) -> torch.Tensor:
        return pool.base(x)[rows]

    out: dict[str, Any] = {
        "reward": _mse(base(scores.reward)),
        "mean_response_tokens": base(pool.response_tokens).double().mean().item(),
    }
    if scores.safety is not None:
        out["safety"] = _mse(base(scores.safety))
        out["p_safe"] = (base(scores.safety) > threshold).double().mean().item()
    if scores.gold_reward is not None:
        out["gold_reward"] = _mse(base(scores.gold_reward))
        out["gold_safety"] = _mse(base(scores.gold_safety))
        out["gold_p_safe"] = base(scores.gold_safe).double().mean().item()
    return out


def _metrics(
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
) -> Any:
    """A ModelMetrics row (the evaluation's format) for `sacpo report`: judged by the oracle when there is one,
    else by the run's scorers; KL = the ε-estimator (its bound in extra). constraint_ok: the configured
    constraint (on the safety *scorer*, its statistic in extra) when there is one, else E[g] ≥ 0 (EvalConfig's
    default b), False without any safety score."""
    import numpy as np

    from sacpo.evaluate.metrics import NAN, ModelMetrics, win_rate

    def sel(x: torch.Tensor) -> np.ndarray:
        return x[rows].gather(1, col[rows]).numpy()

    def opp(x: torch.Tensor) -> np.ndarray:
        return pool.base(x)[rows].numpy()

    gold = scores.gold_reward is not None
    r = scores.gold_reward if gold else scores.reward
    g = scores.gold_safety if gold else scores.safety
    boot = {"n_boot": cfg.n_boot, "seed": cfg.seed}
    nan3 = (NAN, NAN, NAN)
    if gold:
        p_safe = float(sel(scores.gold_safe).mean())
    elif g is not None:
        p_safe = float((sel(g) > cfg.safe_threshold).mean())
    else:
        p_safe = NAN
    r_mean, r_se = mean_and_stderr(torch.from_numpy(sel(r).mean(-1)))
    g_mean, g_se = mean_and_stderr(torch.from_numpy(sel(g).mean(-1))) if g is not None else (NAN, NAN)
    extra = dict(extra)
    if cfg.target is not None and scores.safety is not None:
        stat = safety_statistic(torch.from_numpy(sel(scores.safety)), cfg.constraint, cfg.safe_threshold)
        extra["constraint_statistic"] = stat
        constraint_ok = stat >= cfg.target
    else:
        constraint_ok = bool(g_mean >= 0.0) if g is not None else False
    return ModelMetrics(
        name=name,
        family=family,
        param=param,
        helpful_win=win_rate(sel(r), opp(r), **boot),
        harmless_win=win_rate(sel(g), opp(g), **boot) if g is not None else nan3,
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


def run_bon(
    cfg: BonConfig,
    show_progress: bool = True,
    reward: Any | None = None,
    safety: Any | None = None,
) -> dict[str, Any]:
    """Best-of-n for every n of cfg.ns (and constrained best-of-n when cfg.target is set); writes the outputs
    listed in the module docstring and returns the summary. `reward` / `safety`: scorer objects that replace
    cfg.reward / cfg.safety (programmatic use, tests)."""
    from tqdm.auto import tqdm

    started = time.time()
    if reward is None:
        _check_scorer_spec(cfg.reward, "reward")
    if cfg.safety is not None and safety is None:
        _check_scorer_spec(cfg.safety, "safety")
    if cfg.target is not None and cfg.safety is None and safety is None:
        raise ConfigError("a constraint target needs a safety scorer")
    check_model_dir(cfg.model)
    prompts, n_calib = _load_prompts(cfg)
    ns = sorted(set(cfg.ns))
    s_draws, n_max = cfg.n_samples, ns[-1]
    constrained = cfg.target is not None
    everyone = torch.arange(len(prompts))
    report_rows = everyone[n_calib:]  # the prompts every reported row is on (all but a calibration split's)
    if constrained:
        if n_calib:
            cal, held = everyone[:n_calib], report_rows
        else:
            cal, held = calibration_split(len(prompts), cfg.calibration_fraction, cfg.seed)
        split = ["heldout"] * len(prompts)
        for i in cal.tolist():
            split[i] = "calibration"
    else:
        cal = held = torch.arange(len(prompts))
        split = None
    out = Path(cfg.output_dir)

    # 1. candidates: reuse a matching cache, else one generate call per prompt batch + base log-probs
    tokenizer = load_tokenizer(cfg.model)
    key = _key(fingerprint_model(cfg.model), fingerprint_tokenizer(tokenizer), prompts, cfg, s_draws, n_max)
    t0 = time.perf_counter()
    pool = _cached_pool(out, key, prompts, s_draws, n_max)
    cached = pool is not None
    device = _device(cfg.device)
    if pool is None:
        model = load_model(cfg.model).to(device).eval()
        pool = sample_candidates(
            model,
            tokenizer,
            prompts,
            s_draws,
            n_max,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            max_prompt_length=cfg.max_prompt_length,
            logp_batch_size=cfg.logp_batch_size,
            show_progress=show_progress,
        )
        del model
    else:
        log.info("bon: candidates from cache %s (no model loaded)", out / CANDIDATES_FILE)
    sample_seconds = time.perf_counter() - t0

    # 2. scores of every candidate (each distinct response once)
    t0 = time.perf_counter()
    reward = reward if reward is not None else resolve_scorer(cfg.reward, cfg.reward_aggregate, str(device))
    if safety is None and cfg.safety is not None:
        safety = resolve_scorer(cfg.safety, cfg.safety_aggregate, str(device))
    gold: dict[str, torch.Tensor] = {}
    if cfg.oracle is not None:
        gold_r, gold_g, is_safe = ORACLES[cfg.oracle]()
        gold["gold_reward"] = score_pool(gold_r, pool, show_progress=show_progress)
        gold["gold_safety"] = score_pool(gold_g, pool, show_progress=show_progress)
        gold["gold_safe"] = score_pool(_IsSafe(is_safe), pool, show_progress=show_progress).bool()  # (P, M)
    scores = Scores(
        reward=score_pool(reward, pool, show_progress=show_progress),
        safety=score_pool(safety, pool, show_progress=show_progress) if safety is not None else None,
        **gold,
    )
    score_seconds = time.perf_counter() - t0

    # 3. selection per n (prefixes of each draw's candidates) and constrained calibration
    keys = tie_keys((len(prompts), s_draws, n_max), cfg.seed)  # (P, S, N)
    r_grp = pool.grouped(scores.reward)  # (P, S, N)
    g_grp = pool.grouped(scores.safety) if scores.safety is not None else None
    t0 = time.perf_counter()
    bon: dict[int, dict[str, Any]] = {}
    safe: dict[int, dict[str, Any]] = {}
    chosen_bon: dict[int, torch.Tensor] = {}
    chosen_safe: dict[int, torch.Tensor] = {}
    for n in tqdm(ns, desc="bon select", disable=not show_progress):
        chosen_bon[n] = select_best(r_grp, keys, n)  # (P, S)
        bon[n] = selection_stats(pool, scores, chosen_bon[n], n, report_rows, cfg.safe_threshold)
        if constrained:
            assert g_grp is not None and cfg.target is not None
            calib = calibrate_bon(
                r_grp[cal],
                g_grp[cal],
                keys[cal],
                n,
                cfg.target,
                cfg.constraint,
                cfg.safe_threshold,
                cfg.confidence,
                int(held.numel()),
            )
            chosen_safe[n] = select_best(r_grp, keys, n, g_grp, calib.lam)
            stats = {}
            for name, idx in (("calibration", cal), ("heldout", held)):
                st = selection_stats(pool, scores, chosen_safe[n], n, idx, cfg.safe_threshold)
                stat = safety_statistic(
                    take(g_grp[idx], chosen_safe[n][idx]), cfg.constraint, cfg.safe_threshold
                )
                st["constraint_statistic"] = stat
                st["constraint_ok"] = stat >= cfg.target
                stats[name] = st
            safe[n] = {
                "n": n,
                "lam": None if math.isinf(calib.lam) else calib.lam,
                "feasible": calib.feasible,
                "calibration_statistic": calib.statistic,
                "calibration_bound": calib.bound,
                "selections_evaluated": calib.evaluations,
                **stats,
            }
    select_seconds = time.perf_counter() - t0

    # 4. outputs
    summary: dict[str, Any] = {
        "model": cfg.model,
        "prompts": cfg.prompts,
        "n_prompts": int(report_rows.numel()),
        "n_samples": s_draws,
        "ns": ns,
        "candidates_per_prompt": pool.width,
        "candidates_cached": cached,
        "reward": getattr(reward, "name", str(cfg.reward)),
        "safety": getattr(safety, "name", None) if safety is not None else None,
        "oracle": cfg.oracle,
        "kl_note": "bound = log n − (n−1)/n; estimate = mean ε-estimator KL̂(ε), ε = p(y_sel|x) (Beirami et al. "
        "2024, §4); rows carry logp_policy = None",
        "base": base_stats(pool, scores, cfg.safe_threshold, report_rows),
        "bon": [bon[n] for n in ns],
        "finished_fraction": pool.finished.double().mean().item(),
        "roundtrip_fraction": pool.roundtrip.double().mean().item(),
        "distinct_fraction": sum(len(set(ys)) for ys in pool.responses) / (len(prompts) * pool.width),
    }
    if constrained:
        summary["constraint"] = {
            "kind": cfg.constraint,
            "target": cfg.target,
            "safe_threshold": cfg.safe_threshold,
            "statistic": f"P(g > {cfg.safe_threshold:g})" if cfg.constraint == "prob" else "E[g]",
            "score": "r + λ·g",
            "calibration_prompts": int(cal.numel()),
            "calibration_source": (
                f"split {cfg.calibration_split!r}"
                if n_calib
                else f"random {cfg.calibration_fraction:g} of {cfg.prompts_split!r}"
            ),
            "heldout_prompts": int(held.numel()),
            "confidence": cfg.confidence,
            "rule": "lower bound of the calibration statistic ≥ target: m − z·s·√(1/C + 1/H), "
            "z = Φ⁻¹(confidence), s = std of the per-prompt statistic (C calibration, H held-out prompts)",
        }
        summary["constrained"] = [safe[n] for n in ns]
    summary["seconds"] = {
        "sample": round(sample_seconds, 3),
        "score": round(score_seconds, 3),
        "select": round(select_seconds, 3),
        "total": round(time.time() - started, 3),
    }

    base_col = base_columns(pool)
    samples: dict[str, list[dict[str, Any]]] = {
        "base": _rows(pool, scores, base_col, 1, {}, split, report_rows, True)
    }
    results = [_metrics("base", "sft", None, pool, scores, base_col, report_rows, (0.0, 0.0), cfg, {})]
    for n in ns:
        st = bon[n]
        samples[f"bon-n{n}"] = _rows(
            pool, scores, pool.global_index(chosen_bon[n]), n, {}, split, report_rows
        )
        results.append(
            _metrics(
                f"bon-n{n}",
                "bon",
                float(n),
                pool,
                scores,
                pool.global_index(chosen_bon[n]),
                report_rows,
                (st["kl"]["estimate"], st["kl"]["estimate_se"]),
                cfg,
                {"kl_bound": st["kl"]["bound"], "win_rate_bound": st["win_rate_bound"]},
            )
        )
        if constrained:
            c = safe[n]
            lam = math.inf if c["lam"] is None else c["lam"]
            samples[f"bon-safe-n{n}"] = _rows(
                pool,
                scores,
                pool.global_index(chosen_safe[n]),
                n,
                {"lam": c["lam"], "feasible": c["feasible"]},
                split,
                report_rows,
            )
            h = c["heldout"]
            results.append(
                _metrics(
                    f"bon-safe-n{n} [held-out]",
                    "bon-safe",
                    float(n),
                    pool,
                    scores,
                    pool.global_index(chosen_safe[n]),
                    held,
                    (h["kl"]["estimate"], h["kl"]["estimate_se"]),
                    cfg,
                    {"kl_bound": h["kl"]["bound"], "lambda": lam, "win_rate_bound": h["win_rate_bound"]},
                )
            )
    selections = {"bon": chosen_bon, "bon-safe": chosen_safe}
    _write_outputs(out, cfg, key, pool, scores, split, selections, samples, summary, results)
    return summary


@dataclass(frozen=True)
class _IsSafe:
    fn: Callable[[Prompt, str], bool]
    name: str = "is_safe"

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(self.fn(p, y)) for p, y in zip(prompts, responses, strict=True)])


def _write_jsonl(path: Path, items: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def _write_outputs(
    out: Path,
    cfg: BonConfig,
    key: str,
    pool: CandidatePool,
    scores: Scores,
    split: list[str] | None,
    selections: dict[str, dict[int, torch.Tensor]],
    samples: dict[str, list[dict[str, Any]]],
    summary: dict[str, Any],
    results: list[Any],
) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    records = []
    for i, prompt in enumerate(pool.prompts):
        rec: dict[str, Any] = {
            "prompt_index": i,
            "prompt": _prompt_json(prompt),
            "split": split[i] if split is not None else None,
            "responses": pool.responses[i],
            "logp_ref": pool.logp[i].tolist(),
            "response_tokens": pool.response_tokens[i].tolist(),
            "finished": pool.finished[i].tolist(),
            "roundtrip": pool.roundtrip[i].tolist(),
            "base_samples": list(range(pool.n_draws * pool.group_size, pool.width)),
            "reward": scores.reward[i].tolist(),
        }
        for name in ("safety", "gold_reward", "gold_safety", "gold_safe"):
            t = getattr(scores, name)
            if t is not None:
                rec[name] = t[i].tolist()
        rec["chosen"] = {  # global column of each draw's selection, per family and n
            fam: {str(n): pool.global_index(c)[i].tolist() for n, c in per_n.items()}
            for fam, per_n in selections.items()
            if per_n
        }
        records.append(rec)
    _write_jsonl(tmp / CANDIDATES_FILE, records)
    (tmp / CANDIDATES_META).write_text(
        json.dumps(
            {
                "key": key,
                "model": cfg.model,
                "n_prompts": len(pool.prompts),
                "n_draws": pool.n_draws,
                "group_size": pool.group_size,
                "layout": "candidate j of draw s at s·N + j; base sample s at S·N + s",
            },
            indent=2,
        )
    )
    for name, rows in samples.items():
        _write_jsonl(tmp / "samples" / name / "samples.jsonl", rows)
    (tmp / SUMMARY_FILE).write_text(json.dumps(_json_safe(summary), indent=2, ensure_ascii=False) + "\n")
    (tmp / RESULTS_FILE).write_text(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False))
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


# ------------------------------------------------------------------------------------------------ printing
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
        + f"{'KL bound':>9} {'KL est':>7} {'± se':>6}",
    ]
    for st in summary["bon"]:
        lines.append(
            f"{st['n']:>4} {_f(st['win_rate']['mean']):>6} {_f(st['win_rate']['se']):>6} "
            f"{_f(st['win_rate_bound']):>8} "
            + (f"{_f(st['gold_win_rate']['mean']):>9} {_f(st['gold_p_safe']):>9} " if gold else "")
            + f"{_f(st['kl']['bound']):>9} {_f(st['kl']['estimate']):>7} {_f(st['kl']['estimate_se']):>6}"
        )
    if "constrained" in summary:
        c = summary["constraint"]
        lines.append(
            f"constrained best-of-n (score {c['score']}): {c['statistic']} ≥ {c['target']:g}, λ calibrated on "
            f"{c['calibration_prompts']} prompts (lower bound at confidence {c['confidence']:g}), "
            f"{c['heldout_prompts']} held out"
        )
        lines.append(
            f"{'n':>4} {'λ':>9} {'stat cal':>9} {'bound cal':>10} {'ok':>3} {'stat held':>10} {'ok':>3} "
            f"{'win held':>9} " + (f"{'P(safe)* held':>14} " if gold else "") + f"{'KL est':>7}"
        )
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
    if gold:
        lines.append("* gold oracle")
    return "\n".join(lines)
