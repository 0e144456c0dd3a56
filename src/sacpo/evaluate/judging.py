"""Judge every evaluated model against the SFT policy with the config's judges; judges.json and judgments.jsonl.

For each model m ≠ SFT, judge j and (prompt p, sample s), the outcome o^j_ps ∈ {0, ½, 1, NaN} compares m's sample
s with SFT's sample s of the same prompt (`sacpo.math.judges`). Per (judge, model):

    win rate    (1/P′) Σ_p mean_{s valid} o_ps with a bootstrap CI over prompts (or clusters)  `judged_win_rate`
    invalid     pairs without an outcome (an LLM judge's order without a verdict after its retries)
    consistency share of valid pairs whose two orders agree (LLM judges)          `consistency_rate`
Per pair of judges with the same criterion, over all models' pairs: the agreement rate (same outcome) and the
decisive agreement (both call a winner: the same one) — e.g. an LLM harmlessness judge against the cost model, or
on the toyworld against the gold safety oracle: how often the judge's verdict is the truth.

Outputs: judges.json (`JUDGES_FILE`: the judges, their usage and cache counts, per-model results, agreement) and
samples/<model>/judgments.jsonl (per pair: the two responses, every judge's verdicts and outcome).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sacpo.config import ConfigError
from sacpo.data.records import Prompt
from sacpo.evaluate.judge_config import JudgeConfig
from sacpo.evaluate.metrics import json_safe
from sacpo.fsutil import atomic_write_json, atomic_write_jsonl
from sacpo.math.judges import agreement, consistency_rate, judged_win_rate, score_outcome
from sacpo.scoring.base import Scorer, run_scorer

JUDGES_FILE = "judges.json"
DEFAULT_LENGTHS = (1024, 512)  # (max_length, max_prompt_length) of a foreign HF reward model


@dataclass
class Judge:
    """A built judge: pointwise (a scorer; outcomes from scores) or pairwise (an LLMJudge)."""

    label: str
    kind: str
    criterion: str
    spec: dict[str, Any]
    scorer: Scorer | None = None
    llm: Any = None  # sacpo.scoring.llm_judge.LLMJudge
    extra: dict[str, Any] = field(default_factory=dict)


def build_judges(
    cfgs: Sequence[JudgeConfig], cache_dir: str | Path, device: str | None = None, dtype: Any = None
) -> list[Judge]:
    """The judges of a config (models load here; an oracle expands to its reward and safety judges)."""
    from sacpo.config import to_dict
    from sacpo.scoring import get_oracle, resolve_scorer
    from sacpo.scoring.api_client import ApiConfig
    from sacpo.scoring.llm_judge import LLMJudge

    out: list[Judge] = []
    for c in cfgs:
        spec = to_dict(c)
        if c.kind == "llm":
            api = ApiConfig(
                base_url=c.base_url, model=c.model, api_key_env=c.api_key_env, concurrency=c.concurrency,
                max_retries=c.max_retries, timeout=c.timeout,
            )  # fmt: skip
            llm = LLMJudge(
                api, c.criterion, Path(cache_dir), c.temperature, c.max_tokens, c.verdict_retries,
                c.retry_temperature, c.seed,
            )  # fmt: skip
            out.append(Judge(c.label, c.kind, c.criterion_name, spec, llm=llm))
        elif c.kind == "scorer":
            out.append(Judge(c.label, c.kind, c.criterion_name, spec, scorer=resolve_scorer(c.name)))
        elif c.kind == "oracle":
            oracle = get_oracle(c.name)
            out.append(Judge(f"{c.name}.reward", "oracle", "helpfulness", spec, scorer=oracle.reward))
            out.append(Judge(f"{c.name}.safety", "oracle", "harmlessness", spec, scorer=oracle.safety))
        else:
            out.append(Judge(c.label, c.kind, c.criterion_name, spec, scorer=_model_scorer(c, device, dtype)))
    labels = [j.label for j in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"judge labels collide: {labels}; give each judge a distinct name")
    return out


def _model_scorer(c: JudgeConfig, device: str | None, dtype: Any) -> Scorer:
    """A reward model scores s (higher = more helpful); a cost model on its safety view −c (higher = safer)."""
    import torch

    from sacpo.models.reward import read_meta
    from sacpo.scoring.reward_model import RewardModelScorer

    dirs = [c.dir] if isinstance(c.dir, str) else list(c.dir)
    missing = [d for d in dirs if not Path(d).is_dir()]
    if missing:
        raise ConfigError(f"judge {c.label!r}: no model directory {missing[0]}")
    known = all(read_meta(d).get("max_length") for d in dirs)
    lengths = (c.max_length, c.max_prompt_length)
    if not known:  # a foreign HF sequence-classification model: no reward_model.json with its lengths
        lengths = (c.max_length or DEFAULT_LENGTHS[0], c.max_prompt_length or DEFAULT_LENGTHS[1])
    view = "score" if c.kind == "reward_model" else "cost"
    scorer = RewardModelScorer(
        dirs, aggregate=c.aggregate, device=device, view=view, max_length=lengths[0],
        max_prompt_length=lengths[1], dtype=dtype or torch.float32,
    )  # fmt: skip
    if view == "cost":
        return _Negated(scorer)
    return scorer


@dataclass(frozen=True)
class _Negated:
    """Safety view of a cost scorer: −c (higher = safer)."""

    inner: Any

    @property
    def name(self) -> str:
        return f"-{self.inner.name}"

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Any:
        return -self.inner(prompts, responses)


def judge_models(
    judges: Sequence[Judge],
    rows: dict[str, Sequence[Any]],
    base_name: str,
    shape: tuple[int, int],
    out_dir: str | Path,
    dirs: dict[str, str],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    clusters: list[str] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run every judge on every model's grid rows (prompt-major, P·S, SFT's under base_name); write judges.json
    and each model's judgments.jsonl; return the judges.json record."""
    out = Path(out_dir)
    base = rows[base_name]
    prompts = [r.prompt for r in base]
    models = [m for m in rows if m != base_name]
    outcomes: dict[str, dict[str, np.ndarray]] = {j.label: {} for j in judges}
    verdicts: dict[str, dict[str, list[tuple[str | None, str | None]]]] = {j.label: {} for j in judges}
    results: dict[str, dict[str, Any]] = {m: {} for m in models}
    for j in judges:
        if j.scorer is not None:
            base_scores = run_scorer(j.scorer, prompts, [r.response for r in base]).numpy().reshape(shape)
            for m in models:
                resp = [r.response for r in rows[m]]
                scores = run_scorer(j.scorer, [r.prompt for r in rows[m]], resp).numpy().reshape(shape)
                outcomes[j.label][m] = score_outcome(scores, base_scores)
                results[m][j.label] = {
                    "mean_score": float(scores.mean()),
                    "sft_mean_score": float(base_scores.mean()),
                }
            continue
        for m in models:
            pairs = j.llm.compare(
                prompts, [r.response for r in rows[m]], [r.response for r in base], show_progress,
                desc=f"judge {j.label} · {m}",
            )  # fmt: skip
            o = np.array([p.outcome for p in pairs], dtype=np.float64).reshape(shape)
            valid = np.isfinite(o)
            consistent = np.array([p.result.consistent for p in pairs]).reshape(shape)
            outcomes[j.label][m] = o
            verdicts[j.label][m] = [(p.ab, p.ba) for p in pairs]
            results[m][j.label] = {
                "consistency": consistency_rate(consistent, valid),
                "ties_by_disagreement": int((valid & ~consistent).sum()),
            }
        j.extra = j.llm.stats.as_dict()
    for j in judges:
        for m in models:
            o = outcomes[j.label][m]
            rate = judged_win_rate(o, n_boot=n_boot, seed=seed, alpha=alpha, clusters=clusters)
            results[m][j.label].update(
                win=list(rate), n_pairs=int(o.size), n_valid=int(np.isfinite(o).sum()),
                invalid=int((~np.isfinite(o)).sum()),
                ties=int((o == 0.5).sum()),
            )  # fmt: skip
    record = {
        "baseline": base_name,
        "pairs": "each model's sample s against SFT's sample s of the same prompt",
        "judges": [
            {"label": j.label, "kind": j.kind, "criterion": j.criterion, "spec": j.spec}
            | ({"usage": j.extra} if j.extra else {})
            for j in judges
        ],
        "models": results,
        "agreement": _agreements(judges, outcomes, models),
    }
    atomic_write_json(out / JUDGES_FILE, json_safe(record), ensure_ascii=False)
    for m in models:
        pairs = _pair_rows(judges, rows[m], base, outcomes, verdicts, m)
        atomic_write_jsonl(out / "samples" / dirs[m] / "judgments.jsonl", pairs)
    return record


def _agreements(
    judges: Sequence[Judge], outcomes: dict[str, dict[str, np.ndarray]], models: Sequence[str]
) -> list[dict[str, Any]]:
    out = []
    for a, b in itertools.combinations(judges, 2):
        if a.criterion != b.criterion or not models:
            continue
        x = np.concatenate([outcomes[a.label][m].ravel() for m in models])
        y = np.concatenate([outcomes[b.label][m].ravel() for m in models])
        ag = agreement(x, y)
        out.append({"a": a.label, "b": b.label, "criterion": a.criterion, **ag._asdict()})
    return out


def _pair_rows(judges, rows, base, outcomes, verdicts, m) -> list[dict[str, Any]]:
    from sacpo.data.prompts import prompt_to_json

    out = []
    for i, (r, s) in enumerate(zip(rows, base, strict=True)):
        d: dict[str, Any] = {"prompt": prompt_to_json(r.prompt), "sample": r.sample, "response": r.response,
                             "sft_response": s.response}  # fmt: skip
        for j in judges:
            o = float(outcomes[j.label][m].ravel()[i])
            d[f"{j.label}/outcome"] = None if not np.isfinite(o) else o
            if m in verdicts[j.label]:
                d[f"{j.label}/verdicts"] = list(verdicts[j.label][m][i])
        out.append(d)
    return out


def load_judges(out_dir: str | Path) -> dict[str, Any] | None:
    """judges.json of an evaluation directory, or None."""
    p = Path(out_dir) / JUDGES_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
