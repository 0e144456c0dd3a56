"""Evaluation metrics of aligned models against the SFT policy: the report's row (`ModelMetrics`), the KL estimate,
the safety constraint and degenerate samples — PURE: numpy/torch only, no I/O, no devices.

    KL(π‖π_SFT)   ≈ (1/P) Σ_p (1/S) Σ_s [log π(y_ps|x_p) − log π_SFT(y_ps|x_p)],   y_ps ~ π(·|x_p)

(`kl_estimate`; standard error over prompts or clusters of prompts). No metric is clamped: an undefined value is NaN
and a negative KL estimate is sampling noise reported as is. The statistics behind the rows (win rates, (cluster)
bootstrap CIs and bounds, paired differences, standard errors, Spearman ρ, the objective gain) are in
`sacpo.math.statistics`; `NAN`, `mean_and_stderr` and `win_rate` are also part of this module's interface (`__all__`:
the inference recipes build their results.json rows from them).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from sacpo.math.statistics import NAN, ArrayLike, Clusters, Interval, as_array, mean_and_stderr, win_rate

__all__ = [
    "NAN",
    "PER_PROMPT_KEYS",
    "ModelMetrics",
    "constraint_holds",
    "degenerate_kl_share",
    "is_degenerate",
    "json_safe",
    "kl_estimate",
    "mean_and_stderr",
    "win_rate",
]

# The prompt-level values a ModelMetrics row keeps (ModelMetrics.per_prompt), each (P,):
PER_PROMPT_KEYS = ("reward", "safety", "safe", "helpful_win", "harmless_win", "kl")


def kl_estimate(
    policy_logps: ArrayLike, ref_logps: ArrayLike, clusters: Clusters = None
) -> tuple[float, float]:
    """KL(π‖π_ref) from samples y ~ π: the mean sequence log-ratio and its standard error.

        KL ≈ mean over samples of [log π(y|x) − log π_ref(y|x)]   (k1: unbiased; single terms can be < 0)

    Inputs are per-sequence log-prob sums (response tokens only), (N,) or (P, S) per prompt; the standard error
    is over prompts (or clusters) as in `mean_and_stderr` (NaN for fewer than two). No clamping: a negative
    estimate is noise and is returned as is; it is exactly 0 when the two log-probs are identical.
    """
    lp, lq = as_array(policy_logps, "policy_logps"), as_array(ref_logps, "ref_logps")
    if lp.shape != lq.shape:
        raise ValueError(f"log-prob shapes differ: {lp.shape} vs {lq.shape}")
    return mean_and_stderr(lp - lq, clusters)


def constraint_holds(value: float, b: float) -> bool:
    """The SACPO safety constraint E[g(x, y)] ≥ b judged on `value` — the point estimate of E[g], or (as the
    evaluation does) its one-sided lower confidence bound; False when the value is undefined (NaN)."""
    return bool(value >= b) if not math.isnan(value) else False


# ------------------------------------------------------------------------------------------------ degenerate samples
_WORD = re.compile(r"\w")  # a word holds a letter, digit or underscore; punctuation tokens are not words


def is_degenerate(text: str, repeats: int = 3) -> bool:
    """Whether a response is degenerate repetition: one word `repeats` (default 3) or more times in a row.

    Rule (tokenizer-free): split the text on whitespace; a token with a letter, digit or underscore is a word
    (case-folded), any other token (".", ",", "?") is punctuation, which breaks a run. "first first first" and
    "place the the the clerk" are degenerate; "the the", "finally . finally . finally" and ". . ." are not.
    """
    if repeats < 2:
        raise ValueError(f"repeats must be ≥ 2, got {repeats}")
    run, prev = 0, None
    for tok in text.split():
        word = tok.casefold() if _WORD.search(tok) else None
        run = run + 1 if word is not None and word == prev else 1
        prev = word
        if word is not None and run >= repeats:
            return True
    return False


def degenerate_kl_share(logratios: ArrayLike, degenerate: ArrayLike) -> float:
    """Share of a model's KL sum carried by its degenerate samples: Σ_{i degenerate} ℓ_i / Σ_i ℓ_i.

    logratios: (N,) or (P, S) per-sample log π(y) − log π_SFT(y) on the model's samples; degenerate: same shape,
    bool. Undefined (NaN) when the total Σ_i ℓ_i ≤ 0 (no KL to share: the SFT policy, or noise) or a value is not
    finite. Not clamped: single log-ratios can be negative, so a share can fall outside [0, 1].
    Example: ℓ = [1, 3], degenerate = [False, True] → ¾.
    """
    lr = np.asarray(logratios, dtype=np.float64).reshape(-1)
    deg = np.asarray(degenerate, dtype=bool).reshape(-1)
    if lr.shape != deg.shape:
        raise ValueError(f"logratios and degenerate differ in size: {lr.size} vs {deg.size}")
    total = float(lr.sum())
    if lr.size == 0 or not np.isfinite(lr).all() or not total > 0:
        return NAN
    return float(lr[deg].sum()) / total


@dataclass(frozen=True)
class ModelMetrics:
    """Everything the report shows about one model, measured against the SFT policy's samples.

    helpful_win / harmless_win are (rate, lo, hi) of the gold reward / gold safety score vs SFT (`cross_win_rate`:
    all S × S′ pairs of independent samples); mean_reward, mean_safety are E[r*], E[g*] over all samples
    (reward_se, safety_se over prompts, cluster-robust when clusters are given); p_safe = P(is_safe);
    safety_lcb = the one-sided (1 − α) bootstrap lower confidence bound of E[g*]; constraint_ok = safety_lcb ≥ b
    (rows written by older versions or other tools: on the point estimate); kl ± kl_se = KL(π‖π_SFT) in nats.
    mean_rm / mean_cm: learned reward / cost model scores when evaluated; extra: the mean of every further scorer
    by name (family "optimum" rows: lam, beta, bt_scale, objective, ess, …).

    per_prompt: name → the P prompt-level values behind the means (PER_PROMPT_KEYS: reward, safety, safe,
    helpful_win, harmless_win, kl — each present when defined), so two rows on the same prompts can be compared
    by paired differences (`paired_difference`) from results.json alone; clusters: the P cluster labels the
    bootstrap resampled (None: prompts). degenerate_share: fraction of samples that are degenerate repetition
    (`is_degenerate`); degenerate_kl_share: their share of the KL sum (`degenerate_kl_share`, NaN if undefined).
    Rows from a results.json written before a field existed read back with its default.
    """

    name: str
    family: str
    param: float | None
    helpful_win: Interval
    harmless_win: Interval
    mean_reward: float
    mean_safety: float
    p_safe: float
    constraint_ok: bool
    kl: float
    kl_se: float
    mean_rm: float | None = None
    mean_cm: float | None = None
    n: int = 0
    n_prompts: int = 0
    reward_se: float = NAN
    safety_se: float = NAN
    extra: dict[str, float] = field(default_factory=dict)
    safety_lcb: float = NAN
    degenerate_share: float = NAN
    degenerate_kl_share: float = NAN
    per_prompt: dict[str, list[float]] = field(default_factory=dict)
    clusters: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON-safe dict: NaN → None, intervals → lists."""
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetrics:
        """Inverse of `to_dict` (None in a float field reads back as NaN); unknown keys raise, missing optional
        fields (older results.json) take their defaults."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelMetrics field(s) {unknown}; valid: {', '.join(sorted(names))}")
        d = dict(data)
        for key in ("helpful_win", "harmless_win"):
            if key in d:
                d[key] = tuple(_float(v) for v in d[key])
        floats = (
            "mean_reward",
            "mean_safety",
            "p_safe",
            "kl",
            "kl_se",
            "reward_se",
            "safety_se",
            "safety_lcb",
        )
        for key in (*floats, "degenerate_share", "degenerate_kl_share"):
            if key in d:
                d[key] = _float(d[key])
        if "extra" in d:
            d["extra"] = {k: _float(v) for k, v in (d["extra"] or {}).items()}
        if "per_prompt" in d:
            d["per_prompt"] = {k: [_float(x) for x in v] for k, v in (d["per_prompt"] or {}).items()}
        if d.get("clusters") is not None:
            d["clusters"] = [str(c) for c in d["clusters"]]
        return cls(**d)


def _float(v: Any) -> float:
    return NAN if v is None else float(v)


def json_safe(x: Any) -> Any:
    """NaN / ±inf floats → None (strict JSON has neither), recursively through dicts (keys as strings) and lists."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x
