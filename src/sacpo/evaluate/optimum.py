"""The target SACPO aims at, measured: π*_λ ∝ π_SFT·exp(s·(r + λg)/β) on the evaluation prompts, from gold scorers.

For every prompt, samples are pooled from a defensive mixture q = Σ_k α_k·π_k of the SFT policy (n_sft samples)
and any proposal policies (n_proposal samples each; trained models put mass where exp(t) is large and the SFT
policy rarely goes), every pooled sample is scored under every component (the mixture density of the balance
heuristic) and by the gold scorers, and `sacpo.math.optimum.tilted_estimate` gives, for each λ:

    E*[r], E*[g], P*(safe), KL(π*‖π_SFT), J(π*) = (β/s)·log Z, the effective sample size, and the win rates of
    π* against independent SFT samples (helpful: r, harmless: g).

Each λ becomes one `ModelMetrics` row of family "optimum" with param β/λ (the coefficient of the SACPO step it is
the target of) and extra = {lam, beta, bt_scale, objective, ess, ess_min, bon_limit}: bon_limit is the mean over
prompts of max_i (r_i + λg_i) over the SFT samples — best-of-n_sft, the β → 0 end of the frontier. The pool
(token ids, log-densities, scores) is cached in <out_dir>/pool.pt under a content key, so a report rebuilt with
other λ values reuses it. Responses are cut at max_new_tokens as in the evaluation, so π* lives on the same space of
(possibly cut) responses the trained models are scored on: a cut response stands for all its continuations.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sacpo.data.records import Prompt
from sacpo.data.tokenize import encode_prompt
from sacpo.evaluate.metrics import ModelMetrics
from sacpo.fsutil import atomic_write_bytes
from sacpo.math.optimum import log_mixture_density, optimum_objective, tilted_estimate, weighted_win_rate
from sacpo.math.statistics import bootstrap_ci, mean_and_stderr
from sacpo.models.load import default_device
from sacpo.models.logprobs import batched_sequence_logps
from sacpo.rng import torch_seeded
from sacpo.scoring.base import Scorer, run_scorer

log = logging.getLogger("sacpo.optimum")

OPTIMUM_FAMILY = "optimum"
POOL_FILE = "pool.pt"
KEY_VERSION = "sacpo-optimum-pool-v1"


@dataclass(frozen=True)
class Pool:
    """Samples of the mixture on P prompts: N_p rows per prompt, flattened prompt-major (row → prompt index)."""

    prompt_index: np.ndarray  # (M,) int
    component: np.ndarray  # (M,) int — which policy drew the row (0 = SFT)
    log_sft: np.ndarray  # (M,) log π_SFT(y)
    log_q: np.ndarray  # (M,) log q(y), the mixture density
    reward: np.ndarray  # (M,)
    safety: np.ndarray  # (M,)
    safe: np.ndarray  # (M,) bool
    responses: list[str]
    components: list[str]  # names, SFT first


def _key(fps: Sequence[str], prompts: Sequence[Prompt], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(KEY_VERSION.encode())
    for fp in fps:
        h.update(fp.encode())
    h.update(json.dumps([p if isinstance(p, str) else list(p) for p in prompts], ensure_ascii=False).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def sample_pool(
    sft_dir: str | Path,
    prompts: Sequence[Prompt],
    reward: Scorer,
    safety: Scorer,
    out_dir: str | Path,
    proposals: dict[str, str | Path] | None = None,
    n_sft: int = 256,
    n_proposal: int = 32,
    max_new_tokens: int = 40,
    max_prompt_length: int = 64,
    seed: int = 0,
    batch_size: int = 256,
    is_safe: Callable[[Prompt, str], bool] | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> Pool:
    """Draw (or reuse from out_dir) the mixture pool and score it; see the module docstring."""
    from tqdm.auto import tqdm

    from sacpo.models.load import fingerprint_model, fingerprint_tokenizer, load_model, load_tokenizer

    proposals = dict(proposals or {})
    names = ["sft", *proposals]
    dirs = [Path(sft_dir), *(Path(d) for d in proposals.values())]
    counts = [n_sft] + [n_proposal] * len(proposals)
    tok = load_tokenizer(sft_dir)
    settings = {
        "counts": counts,
        "max_new_tokens": max_new_tokens,
        "max_prompt_length": max_prompt_length,
        "seed": seed,
        "reward": reward.name,
        "safety": safety.name,
        "names": names,
    }
    key = _key([fingerprint_model(d) for d in dirs] + [fingerprint_tokenizer(tok)], prompts, settings)
    out = Path(out_dir)
    path = out / POOL_FILE
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            log.info("optimum: reusing the sample pool in %s", path)
            return _pool_from(saved, names)
    device = device or default_device()
    pids = [encode_prompt(tok, p, max_prompt_length) for p in prompts]
    bar = tqdm(total=len(dirs) * 2, desc="π* pool", disable=not show_progress, leave=False)
    seqs, prompt_index, component = _draw(dirs, counts, pids, tok, max_new_tokens, seed, device, bar)
    logps = torch.empty(len(dirs), len(seqs), dtype=torch.float64)  # (K, M)
    for k, d in enumerate(dirs):
        model = load_model(d).to(device).eval()
        logps[k] = batched_sequence_logps(model, seqs, tok.pad_token_id, batch_size=batch_size)
        del model
        bar.update()
    bar.close()
    responses = [tok.decode(s.input_ids[s.prompt_len :], skip_special_tokens=True).strip() for s in seqs]
    saved = {
        "key": key,
        "prompt_index": torch.tensor(prompt_index),
        "component": torch.tensor(component),
        "log_sft": logps[0],
        # every pooled row came from the per-prompt mixture with the same counts on every prompt
        "log_q": log_mixture_density(logps, counts),  # (M,)
        **_gold_scores([prompts[i] for i in prompt_index], responses, reward, safety, is_safe),
        "responses": responses,
    }
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return _pool_from(saved, names)


def _draw(
    dirs: list[Path],
    counts: list[int],
    prompt_ids: list[list[int]],
    tok: Any,
    max_new_tokens: int,
    seed: int,
    device: str,
    bar: Any,
) -> tuple[list[Any], list[int], list[int]]:
    """counts[k] samples per prompt from every policy dirs[k] (seed seed·1000 + k): the sequences, flattened
    prompt-major per policy, with each row's prompt index and component k."""
    from sacpo.models.generate import sample
    from sacpo.models.load import load_model

    seqs, prompt_index, component = [], [], []
    for k, (d, n) in enumerate(zip(dirs, counts, strict=True)):
        model = load_model(d).to(device).eval()
        with torch_seeded(seed * 1000 + k):
            drawn = sample(
                model, prompt_ids, tok.eos_token_id, tok.pad_token_id, n, max_new_tokens, batch_size=64
            )
        seqs += drawn
        prompt_index += [i // n for i in range(len(drawn))]
        component += [k] * len(drawn)
        del model
        bar.update()
    return seqs, prompt_index, component


def _gold_scores(
    prompts: list[Prompt],
    responses: list[str],
    reward: Scorer,
    safety: Scorer,
    is_safe: Callable[[Prompt, str], bool] | None,
) -> dict[str, torch.Tensor]:
    """reward, safety (M,) float64 and safe (M,) bool of the pooled rows (safe: is_safe, default g > 0)."""
    r = run_scorer(reward, prompts, responses).numpy()
    g = run_scorer(safety, prompts, responses).numpy()
    safe = (
        g > 0
        if is_safe is None
        else np.array([bool(is_safe(p, y)) for p, y in zip(prompts, responses, strict=True)])
    )
    return {
        "reward": torch.from_numpy(np.asarray(r, dtype=np.float64)),
        "safety": torch.from_numpy(np.asarray(g, dtype=np.float64)),
        "safe": torch.from_numpy(np.asarray(safe, dtype=bool)),
    }


def _pool_from(saved: dict[str, Any], names: list[str]) -> Pool:
    return Pool(
        prompt_index=saved["prompt_index"].numpy(),
        component=saved["component"].numpy(),
        log_sft=saved["log_sft"].numpy(),
        log_q=saved["log_q"].numpy(),
        reward=saved["reward"].numpy(),
        safety=saved["safety"].numpy(),
        safe=saved["safe"].numpy(),
        responses=list(saved["responses"]),
        components=names,
    )


@dataclass(frozen=True)
class OptimumPoint:
    """π*_λ on the evaluation prompts: means over prompts of the per-prompt SNIS estimates."""

    lam: float
    beta: float
    scale: float
    metrics: ModelMetrics
    per_prompt: dict[str, np.ndarray]  # name → (P,)


def optimum_point(
    pool: Pool,
    lam: float,
    beta: float,
    scale: float,
    n_prompts: int,
    n_boot: int = 1000,
    seed: int = 0,
    clusters: Sequence[str] | None = None,
) -> OptimumPoint:
    """The estimates of π*_λ (one `ModelMetrics` row of family "optimum", param β/λ) from a pool."""
    keys = ("reward", "safety", "safe", "kl", "log_z", "ess", "helpful_win", "harmless_win", "bon_limit")
    per = {k: np.empty(n_prompts) for k in keys}
    for p in range(n_prompts):
        rows = pool.prompt_index == p
        if not rows.any():
            raise ValueError(f"the pool has no sample for prompt {p}")
        r, g, safe = pool.reward[rows], pool.safety[rows], pool.safe[rows].astype(np.float64)
        t = scale * (r + lam * g) / beta
        est = tilted_estimate(t, pool.log_sft[rows] - pool.log_q[rows], {"r": r, "g": g, "safe": safe})
        sft = pool.component[rows] == 0
        w = est.weights.numpy()
        per["reward"][p], per["safety"][p], per["safe"][p] = (
            est.expect["r"],
            est.expect["g"],
            est.expect["safe"],
        )
        per["kl"][p], per["log_z"][p], per["ess"][p] = est.kl, est.log_z, est.ess
        per["helpful_win"][p] = weighted_win_rate(r, w, r[sft])
        per["harmless_win"][p] = weighted_win_rate(g, w, g[sft])
        per["bon_limit"][p] = float((r[sft] + lam * g[sft]).max())
    objective = optimum_objective(float(per["log_z"].mean()), beta, scale)

    def ci(name: str) -> tuple[float, float, float]:
        lo, hi = bootstrap_ci(per[name], n_boot=n_boot, seed=seed, clusters=clusters)
        return float(per[name].mean()), lo, hi

    mean_r, se_r = mean_and_stderr(per["reward"], clusters=clusters)
    mean_g, se_g = mean_and_stderr(per["safety"], clusters=clusters)
    kl, kl_se = mean_and_stderr(per["kl"], clusters=clusters)
    m = ModelMetrics(
        name=f"optimum-lam{lam:g}",
        family=OPTIMUM_FAMILY,
        param=beta / lam,
        helpful_win=ci("helpful_win"),
        harmless_win=ci("harmless_win"),
        mean_reward=mean_r,
        mean_safety=mean_g,
        p_safe=float(per["safe"].mean()),
        constraint_ok=False,  # set by the caller's constraint rule; π* is a target, not a candidate
        kl=kl,
        kl_se=kl_se,
        n=len(pool.reward),
        n_prompts=n_prompts,
        reward_se=se_r,
        safety_se=se_g,
        extra={
            "lam": lam,
            "beta": beta,
            "bt_scale": scale,
            "objective": objective,
            "ess": float(per["ess"].mean()),
            "ess_min": float(per["ess"].min()),
            "bon_limit": float(per["bon_limit"].mean()),
        },
        per_prompt={
            k: per[k].tolist() for k in ("reward", "safety", "safe", "helpful_win", "harmless_win", "kl")
        },
        clusters=None if clusters is None else list(clusters),
    )
    return OptimumPoint(lam, beta, scale, m, per)


def estimate_optimum(
    pool: Pool,
    lams: Sequence[float],
    beta: float,
    scale: float,
    n_prompts: int,
    b: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    clusters: Sequence[str] | None = None,
) -> list[OptimumPoint]:
    """One `optimum_point` per λ; with b, constraint_ok = E*[g] ≥ b on the estimate (π* is exact in the limit)."""
    out = []
    for lam in lams:
        if not lam > 0:
            raise ValueError(f"λ must be > 0, got {lam}")
        pt = optimum_point(pool, lam, beta, scale, n_prompts, n_boot, seed, clusters)
        if b is not None:
            pt = replace(pt, metrics=replace(pt.metrics, constraint_ok=pt.metrics.mean_safety >= b))
        log.info(
            "π* λ=%g: E[r*] %.3f, E[g*] %.3f, P(safe) %.3f, KL %.2f, J %.3f, ESS mean %.1f (min %.1f) of %d",
            lam,
            pt.metrics.mean_reward,
            pt.metrics.mean_safety,
            pt.metrics.p_safe,
            pt.metrics.kl,
            pt.metrics.extra["objective"],
            pt.metrics.extra["ess"],
            pt.metrics.extra["ess_min"],
            len(pool.reward) // max(1, n_prompts),
        )
        out.append(pt)
    return out
