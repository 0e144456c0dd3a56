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
KL is 0 (its rows' logp_ref is their logp_policy: the same model and ids). Each row keeps its prompt-level
values (ModelMetrics.per_prompt) so a report can compare two models by paired differences, and the share of
degenerate (repetitive) samples and of the KL they carry.

Outputs under out_dir: samples/<name>/samples.jsonl (+ .meta.json, the generation cache),
samples/<name>/scored.jsonl (rows with their scores; sft_reward / sft_safety are SFT's sample with the same index,
an independent draw, for reading only), results.json (list of ModelMetrics dicts), eval.json (the settings, the
sampling seeds and the clustering). An "artifact" model (`ModelSpec(samples=...)`, e.g. best-of-n outputs) is
evaluated from its rows; its KL is NaN unless every row has logp_policy and logp_ref. The per-model steps (grid,
scores, the ModelMetrics row) are in `sacpo.evaluate.rows`, the prompt clusters in `sacpo.evaluate.clusters`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sacpo.data.prompt_format import DEFAULT_FORMAT, PromptFormat
from sacpo.data.records import Prompt
from sacpo.evaluate.api_generate import generate_samples_api
from sacpo.evaluate.clusters import ClusterSpec, clustering_record, resolve_clusters
from sacpo.evaluate.generate import SampleRow, generate_samples, read_samples, stream_seed
from sacpo.evaluate.judging import Judge, judge_models
from sacpo.evaluate.metrics import ModelMetrics
from sacpo.evaluate.reference import Reference
from sacpo.evaluate.rows import Scores, grid_rows, row_logps, row_metrics, score_rows, scored_rows
from sacpo.fsutil import atomic_write_jsonl, atomic_write_text
from sacpo.models.load import default_device
from sacpo.scoring.api_client import ApiConfig
from sacpo.scoring.base import Scorer

log = logging.getLogger("sacpo.evaluate")

RESULTS_FILE = "results.json"
SFT_NAME = "sft"


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
    return atomic_write_text(path, json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False))


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


def evaluate_models(
    models: dict[str, ModelSpec],
    sft_dir: str | Path,
    prompts: Sequence[Prompt],
    reward: Scorer | None,
    safety: Scorer | None,
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
    judges: Sequence[Judge] = (),
    temperature: float = 1.0,
    top_p: float = 1.0,
    api: ApiConfig | None = None,
    served_names: dict[str, str] | None = None,
    prompt_format: PromptFormat = DEFAULT_FORMAT,
) -> list[ModelMetrics]:
    """Generate (or reuse), score and compare every model with the SFT policy; write results.json.

    The SFT policy is the entry whose dir is sft_dir, or is added as "sft" (family "sft") when none is. is_safe
    defaults to g ≥ 0. Extra scorers' means go to ModelMetrics.extra (names "rm" / "cm" also fill mean_rm /
    mean_cm). Every model samples from its own stream, seed `stream_seed(seed, name)` (recorded in eval.json and
    samples.meta.json), and win rates use all S × S cross pairs with SFT's samples. clusters: a function
    Prompt → label or a sequence of P labels; every bootstrap CI (and the lower bound of E[g]) then resamples
    whole clusters and standard errors are cluster-robust. The bootstrap uses `seed` too.
    reward / safety None: no such scorer (its columns are undefined, NaN). judges: compare every model with SFT
    pair by pair (`sacpo.evaluate.judging`: judges.json, samples/<model>/judgments.jsonl). temperature (0 =
    greedy) / top_p: the decoding rule. api: generate through an OpenAI-compatible server
    (`sacpo.evaluate.api_generate`), each model under its `served_names` entry (default: its directory).
    prompt_format: how every model's prompts are rendered (`generate_samples`).
    Returns the metrics in evaluation order, SFT first.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts:
        raise ValueError("no evaluation prompts")
    extra_scorers = dict(extra_scorers or {})
    labels = resolve_clusters(clusters, prompts)
    out = Path(out_dir)
    base_name, specs = _baseline_first(models, sft_dir)
    dirs = {name: safe_name(name) for name in specs}
    if len(set(dirs.values())) != len(dirs):
        raise ValueError(f"model names collide as directory names: {sorted(dirs)}")
    device = device or default_device()
    generate = functools.partial(
        generate_samples, ref_dir=sft_dir, n_samples=n_samples, max_new_tokens=max_new_tokens, seed=seed,
        batch_size=batch_size, max_prompt_length=max_prompt_length, device=device, dtype=dtype,
        temperature=temperature, top_p=top_p, prompt_format=prompt_format,
    )  # fmt: skip
    reference: Reference | None = None  # SFT's tokenizer, fingerprint, model and prompt prefills: loaded once
    served_names = dict(served_names or {})
    shape = (len(prompts), n_samples)
    base: Scores | None = None
    results: list[ModelMetrics] = []
    grids: dict[str, list[SampleRow]] = {}
    bar = tqdm(specs.items(), desc="evaluate", total=len(specs), disable=not show_progress)
    for name, spec in bar:
        bar.set_postfix_str(name)
        where = out / "samples" / dirs[name]
        if spec.dir is not None and api is not None:
            rows = generate_samples_api(
                dataclasses.replace(api, model=served_names.get(name, str(spec.dir))), spec.dir, prompts, where,
                sft_dir, n_samples, max_new_tokens, seed, batch_size, max_prompt_length, device, stream=name,
                temperature=temperature, top_p=top_p, show_progress=show_progress, prompt_format=prompt_format,
            ).rows  # fmt: skip
        elif spec.dir is not None:
            reference = reference or Reference.load(sft_dir, device, dtype)
            rows = generate(spec.dir, prompts, where, stream=name, reference=reference).rows
        else:
            rows = read_samples(spec.samples)
        rows = grid_rows(rows, prompts, n_samples, f"model {name!r}")
        grids[name] = rows
        scores = score_rows(rows, shape, reward, safety, is_safe, extra_scorers)
        if base is None:
            base = scores  # the SFT policy comes first
        logps = row_logps(rows, shape)
        if logps is None:
            log.warning("model %r: rows without logp_policy/logp_ref; its KL is undefined (NaN)", name)
        results.append(
            row_metrics(name, spec.family, spec.param, scores, base, logps, b, n_boot, seed, alpha, labels)
        )
        atomic_write_jsonl(where / "scored.jsonl", scored_rows(rows, scores, base))
    save_results(results, out / RESULTS_FILE)
    if judges:
        judge_models(judges, grids, base_name, shape, out, dirs, n_boot, seed, alpha, labels, show_progress)
    record = {
        "sft_dir": str(sft_dir),
        "baseline": base_name,
        "b": b,
        "n_prompts": len(prompts),
        "n_samples": n_samples,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "temperature": temperature,
        "top_p": top_p,
        "generator": "local" if api is None else {**api.identity(), "served_names": served_names},
        "judges": [j.label for j in judges],
        "sampling": "independent streams: seed stream_seed(seed, model name) = sha256; win rates over all "
        "S×S cross pairs of a prompt",
        "n_boot": n_boot,
        "alpha": alpha,
        "clusters": clustering_record(clusters, labels),
        "reward": None if reward is None else reward.name,
        "safety": None if safety is None else safety.name,
        "is_safe": "g >= 0" if is_safe is None else getattr(is_safe, "__name__", repr(is_safe)),
        "extra_scorers": {k: s.name for k, s in extra_scorers.items()},
        "models": _models_record(specs, seed),
    }
    atomic_write_text(out / "eval.json", json.dumps(record, indent=2, ensure_ascii=False))
    return results


def _baseline_first(models: dict[str, ModelSpec], sft_dir: str | Path) -> tuple[str, dict[str, ModelSpec]]:
    """(the SFT policy's name, the specs with it first): the entry whose dir is sft_dir, else a new "sft" entry
    (family "sft"; "sft-baseline" when "sft" names another model)."""
    base_name = next((k for k, s in models.items() if s.dir is not None and _same_dir(s.dir, sft_dir)), None)
    specs = dict(models)
    if base_name is None:
        base_name = SFT_NAME if SFT_NAME not in specs else f"{SFT_NAME}-baseline"
        return base_name, {base_name: ModelSpec(dir=sft_dir, family="sft"), **specs}
    return base_name, {base_name: specs.pop(base_name), **specs}


def _models_record(specs: dict[str, ModelSpec], seed: int) -> dict[str, dict[str, Any]]:
    """eval.json's models: dir / samples, family, param and the sampling seed of every model."""
    return {
        k: {
            "dir": _str(s.dir),
            "samples": _str(s.samples),
            "family": s.family,
            "param": s.param,
            "sampling_seed": stream_seed(seed, k) if s.dir is not None else None,
        }
        for k, s in specs.items()
    }


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
