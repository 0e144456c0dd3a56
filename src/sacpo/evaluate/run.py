"""Evaluate aligned models against the SFT policy: sample, score, compare, write results.json.

For every model m (the SFT policy included, as the baseline) and prompt x_p, S samples y_ps ~ π_m(·|x_p) are
drawn from the model's own random stream (seed `stream_seed(seed, m)`, so the models' samples are independent
draws), scored by a helpfulness scorer r (higher = more helpful) and a safety scorer g (higher = safer), and
every sample of m is compared with every SFT sample of the same prompt:

    helpful win rate  = (1/P) Σ_p (1/S²) Σ_s Σ_s′ (1[r(x_p, y^m_ps) > r(x_p, y^sft_ps′)] + ½·1[=])   (harmless: g)
    E[r], E[g], P(safe) = mean over all samples;  constraint: LCB_{1−α}(E[g]) ≥ b  (one-sided bootstrap bound)
    KL(π_m‖π_SFT)      = mean_{p,s} [log π_m(y_ps|x_p) − log π_SFT(y_ps|x_p)]

with bootstrap CIs over prompts — or over clusters of prompts (`clusters`: e.g. the toyworld's paraphrases of one
task), resampling whole clusters (`metrics`). The SFT model compared with itself has win rates exactly ½ and its
KL, estimated like any other (a second forward pass under the reference), is 0. Each row keeps its prompt-level
values (ModelMetrics.per_prompt) so a report can compare two models by paired differences, and the share of
degenerate (repetitive) samples and of the KL they carry.

Outputs under out_dir: samples/<name>/samples.jsonl (+ .meta.json, the generation cache),
samples/<name>/scored.jsonl (rows with their scores; sft_reward / sft_safety are SFT's sample with the same index,
an independent draw, for reading only), results.json (list of ModelMetrics dicts), eval.json (the settings, the
sampling seeds and the clustering). An "artifact" model (`ModelSpec(samples=...)`, e.g. best-of-n outputs) is
evaluated from its rows; its KL is NaN unless every row has logp_policy and logp_ref.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sacpo.data.records import Prompt
from sacpo.evaluate.generate import (
    SampleRow,
    generate_samples,
    prompt_id,
    read_samples,
    stream_seed,
    write_json,
    write_jsonl,
)
from sacpo.evaluate.metrics import (
    NAN,
    ModelMetrics,
    bootstrap_lower_bound,
    constraint_holds,
    cross_outcomes,
    cross_win_rate,
    degenerate_kl_share,
    is_degenerate,
    kl_estimate,
    mean_and_stderr,
)
from sacpo.models.load import default_device
from sacpo.scoring.base import Scorer, run_scorer

log = logging.getLogger("sacpo.evaluate")

RESULTS_FILE = "results.json"
SFT_NAME = "sft"
# An extra scorer under one of these names also fills the ModelMetrics field.
LEARNED_FIELDS = {"rm": "mean_rm", "cm": "mean_cm"}
ClusterSpec = Callable[[Prompt], str] | Sequence[str] | None


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a model directory (HF, safetensors) or a samples.jsonl artifact made elsewhere.

    family: "sft", "dpo-helpful", "dpo-safe", "sacpo", "p-sacpo", "naive-merge", "kto", or any string;
    param: β/λ (SACPO), q (P-SACPO, merges), β, … — what the plots label and connect points by.
    """

    dir: str | Path | None = None
    family: str = "other"
    param: float | None = None
    samples: str | Path | None = None

    def __post_init__(self) -> None:
        if (self.dir is None) == (self.samples is None):
            raise ValueError(
                f"a ModelSpec needs exactly one of dir or samples, got dir={self.dir!r}, "
                f"samples={self.samples!r}"
            )


def save_results(results: Sequence[ModelMetrics], path: str | Path) -> Path:
    """results.json: a list of ModelMetrics dicts (strict JSON: NaN written as null)."""
    p = Path(path)
    write_json(p, [r.to_dict() for r in results])
    return p


def load_results(path: str | Path) -> list[ModelMetrics]:
    """Read a results.json (a file, or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    return [ModelMetrics.from_dict(d) for d in json.loads(p.read_text(encoding="utf-8"))]


def safe_name(name: str) -> str:
    """A model name as a directory name."""
    cleaned = re.sub(r"[^A-Za-z0-9._+=-]+", "_", name).strip("._") or "model"
    return cleaned


def _same_dir(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _grid(
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
class _Scores:
    reward: np.ndarray  # (P, S)
    safety: np.ndarray  # (P, S)
    safe: np.ndarray  # (P, S) bool
    extra: dict[str, np.ndarray]  # name → (P, S)
    degenerate: np.ndarray  # (P, S) bool, `is_degenerate` of the response


def _score(
    rows: Sequence[SampleRow],
    shape: tuple[int, int],
    reward: Scorer,
    safety: Scorer,
    is_safe: Callable[[Prompt, str], bool] | None,
    extra_scorers: dict[str, Scorer],
) -> _Scores:
    prompts = [r.prompt for r in rows]
    responses = [r.response for r in rows]
    r = run_scorer(reward, prompts, responses).numpy().reshape(shape)
    g = run_scorer(safety, prompts, responses).numpy().reshape(shape)
    if is_safe is None:
        safe = g >= 0
    else:
        safe = np.array([bool(is_safe(p, y)) for p, y in zip(prompts, responses, strict=True)]).reshape(shape)
    extra = {k: run_scorer(s, prompts, responses).numpy().reshape(shape) for k, s in extra_scorers.items()}
    degenerate = np.array([is_degenerate(y) for y in responses], dtype=bool).reshape(shape)
    return _Scores(r, g, safe, extra, degenerate)


def _logps(rows: Sequence[SampleRow], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    if any(r.logp_policy is None or r.logp_ref is None for r in rows):
        return None
    lp = np.array([r.logp_policy for r in rows], dtype=np.float64).reshape(shape)
    lq = np.array([r.logp_ref for r in rows], dtype=np.float64).reshape(shape)
    return lp, lq


def _metrics(
    name: str,
    spec: ModelSpec,
    scores: _Scores,
    base: _Scores,
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
        "helpful_win": cross_outcomes(scores.reward, base.reward),
        "harmless_win": cross_outcomes(scores.safety, base.safety),
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
        family=spec.family,
        param=spec.param,
        helpful_win=cross_win_rate(scores.reward, base.reward, **boot),
        harmless_win=cross_win_rate(scores.safety, base.safety, **boot),
        mean_reward=mean_r,
        mean_safety=mean_g,
        p_safe=float(scores.safe.mean()),
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


def resolve_clusters(clusters: ClusterSpec, prompts: Sequence[Prompt]) -> list[str] | None:
    """P cluster labels of the evaluation prompts: `clusters` called on each prompt, or a sequence of P labels
    taken as is; None → None (every prompt its own cluster). Raises with the offending prompt when a function
    fails, or when the number of labels is not P."""
    if clusters is None:
        return None
    if callable(clusters):
        labels = []
        for p in prompts:
            try:
                labels.append(str(clusters(p)))
            except Exception as e:  # a user function: say which prompt it failed on
                raise ValueError(f"clusters: {_describe(clusters)} failed on prompt {p!r}: {e}") from e
        return labels
    labels = [str(c) for c in clusters]
    if len(labels) != len(prompts):
        raise ValueError(f"clusters: {len(labels)} labels for {len(prompts)} evaluation prompts")
    return labels


def _describe(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def clustering_record(clusters: ClusterSpec, labels: list[str] | None) -> dict[str, Any]:
    """What eval.json records of the clustering: by (function name / "labels" / "prompt"), the number of
    clusters and their sizes."""
    if labels is None:
        return {"by": "prompt", "n_clusters": None}
    sizes = dict(Counter(labels))
    return {
        "by": _describe(clusters) if callable(clusters) else "labels",
        "n_clusters": len(sizes),
        "sizes": sizes,
    }


def _scored_rows(rows: Sequence[SampleRow], scores: _Scores, base: _Scores) -> list[dict[str, Any]]:
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


def evaluate_models(
    models: dict[str, ModelSpec],
    sft_dir: str | Path,
    prompts: Sequence[Prompt],
    reward: Scorer,
    safety: Scorer,
    b: float,
    out_dir: str | Path,
    n_samples: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    extra_scorers: dict[str, Scorer] | None = None,
    show_progress: bool = True,
    is_safe: Callable[[Prompt, str], bool] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    batch_size: int = 16,
    max_prompt_length: int = 256,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    clusters: ClusterSpec = None,
) -> list[ModelMetrics]:
    """Generate (or reuse), score and compare every model with the SFT policy; write results.json.

    The SFT policy is the entry whose dir is sft_dir, or is added as "sft" (family "sft") when none is. is_safe
    defaults to g ≥ 0. Extra scorers' means go to ModelMetrics.extra (names "rm" / "cm" also fill mean_rm /
    mean_cm). Every model samples from its own stream, seed `stream_seed(seed, name)` (recorded in eval.json and
    samples.meta.json), and win rates use all S × S cross pairs with SFT's samples. clusters: a function
    Prompt → label or a sequence of P labels; every bootstrap CI (and the lower bound of E[g]) then resamples
    whole clusters and standard errors are cluster-robust. The bootstrap uses `seed` too.
    Returns the metrics in evaluation order, SFT first.
    """
    from tqdm.auto import tqdm

    from sacpo.models.load import fingerprint_model, load_model

    prompts = list(prompts)
    if not prompts:
        raise ValueError("no evaluation prompts")
    extra_scorers = dict(extra_scorers or {})
    labels = resolve_clusters(clusters, prompts)
    out = Path(out_dir)
    base_name = next((k for k, s in models.items() if s.dir is not None and _same_dir(s.dir, sft_dir)), None)
    specs = dict(models)
    if base_name is None:
        base_name = SFT_NAME if SFT_NAME not in specs else f"{SFT_NAME}-baseline"
        specs = {base_name: ModelSpec(dir=sft_dir, family="sft"), **specs}
    else:
        specs = {base_name: specs.pop(base_name), **specs}
    dirs = {name: safe_name(name) for name in specs}
    if len(set(dirs.values())) != len(dirs):
        raise ValueError(f"model names collide as directory names: {sorted(dirs)}")

    device = device or default_device()
    ref_fp = fingerprint_model(sft_dir)

    @functools.cache
    def reference() -> Any:
        return load_model(sft_dir, dtype=dtype).to(device).eval()

    shape = (len(prompts), n_samples)
    base: _Scores | None = None
    results: list[ModelMetrics] = []
    bar = tqdm(specs.items(), desc="evaluate", total=len(specs), disable=not show_progress)
    for name, spec in bar:
        bar.set_postfix_str(name)
        where = out / "samples" / dirs[name]
        if spec.dir is not None:
            gen = generate_samples(
                spec.dir,
                prompts,
                where,
                sft_dir,
                n_samples=n_samples,
                max_new_tokens=max_new_tokens,
                seed=seed,
                batch_size=batch_size,
                max_prompt_length=max_prompt_length,
                device=device,
                dtype=dtype,
                ref_model=reference,
                ref_fingerprint=ref_fp,
                stream=name,
            )
            rows = gen.rows
        else:
            rows = read_samples(spec.samples)
        rows = _grid(rows, prompts, n_samples, f"model {name!r}")
        scores = _score(rows, shape, reward, safety, is_safe, extra_scorers)
        if base is None:
            base = scores  # the SFT policy comes first
        logps = _logps(rows, shape)
        if logps is None:
            log.warning("model %r: rows without logp_policy/logp_ref; its KL is undefined (NaN)", name)
        metrics = _metrics(name, spec, scores, base, logps, b, n_boot, seed, alpha, labels)
        results.append(metrics)
        write_jsonl(where / "scored.jsonl", _scored_rows(rows, scores, base))
    save_results(results, out / RESULTS_FILE)
    write_json(
        out / "eval.json",
        {
            "sft_dir": str(sft_dir),
            "baseline": base_name,
            "b": b,
            "n_prompts": len(prompts),
            "n_samples": n_samples,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "sampling": "independent streams: seed stream_seed(seed, model name) = sha256; win rates over all "
            "S×S cross pairs of a prompt",
            "n_boot": n_boot,
            "alpha": alpha,
            "clusters": clustering_record(clusters, labels),
            "reward": reward.name,
            "safety": safety.name,
            "is_safe": "g >= 0" if is_safe is None else getattr(is_safe, "__name__", repr(is_safe)),
            "extra_scorers": {k: s.name for k, s in extra_scorers.items()},
            "models": {
                k: {
                    "dir": _str(s.dir),
                    "samples": _str(s.samples),
                    "family": s.family,
                    "param": s.param,
                    "sampling_seed": stream_seed(seed, k) if s.dir is not None else None,
                }
                for k, s in specs.items()
            },
        },
    )
    return results


def _str(p: str | Path | None) -> str | None:
    return None if p is None else str(p)


def specs_from_pipeline(
    pipeline_json: str | Path, families: dict[str, str] | None = None
) -> tuple[Path, dict[str, ModelSpec]]:
    """(sft_dir, specs) for every model a `sacpo pipeline` run wrote (its pipeline.json).

    families maps a stage name, or a merge name prefix, to a family (e.g. {"helpful": "dpo-helpful",
    "safe": "sacpo", "psacpo": "p-sacpo", "naive": "naive-merge"}); unmapped stages keep their stage name and
    unmapped merges are "merge". param: the stage's β (β/λ for a λ sweep) or the merge's q.
    """
    families = families or {}
    p = Path(pipeline_json)
    if p.is_dir():
        p = p / "pipeline.json"
    data = json.loads(p.read_text(encoding="utf-8"))
    specs: dict[str, ModelSpec] = {}
    for r in data.get("stages", []):
        family = families.get(r["stage"], r["stage"])
        specs[r["name"]] = ModelSpec(dir=r["model"], family=family, param=r.get("beta"))
    for m in data.get("merges", []):
        prefixes = [k for k in families if m["name"] == k or m["name"].startswith(k + "-")]
        family = families[max(prefixes, key=len)] if prefixes else "merge"
        specs[m["name"]] = ModelSpec(dir=m["model"], family=family, param=m.get("q"))
    return Path(data["policy"]), specs
