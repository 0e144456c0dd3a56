"""The on-disk candidate cache of best-of-n: candidates.jsonl (+ candidates.meta.json) in the output directory.

One record per prompt: all M responses, their base log-probs, token counts, scores and the selections. The meta
file's `key` (sha256 of the model and tokenizer fingerprints, the prompts, the prompt format and the sampling
settings) lets a later run with other scorers / targets reuse the candidates without loading the model
(`read_cached_pool`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sacpo.data.prompt_format import DEFAULT_FORMAT, PromptFormat
from sacpo.data.records import Prompt
from sacpo.infer.pool import CandidatePool, Scores

log = logging.getLogger("sacpo.bon")

CANDIDATES_FILE = "candidates.jsonl"
CANDIDATES_META = "candidates.meta.json"
KEY_VERSION = "sacpo-bon-candidates-v1"
SCORE_FIELDS = ("reward", "safety", "gold_reward", "gold_safety", "gold_safe")


def prompt_json(p: Prompt) -> Any:
    """A prompt as written to JSON: the text, or the list of chat messages."""
    return p if isinstance(p, str) else [dict(m) for m in p]


def candidates_key(
    model_fp: str,
    tok_fp: str,
    prompts: Sequence[Prompt],
    n_draws: int,
    group_size: int,
    max_new_tokens: int,
    max_prompt_length: int,
    seed: int,
    prompt_format: PromptFormat = DEFAULT_FORMAT,
) -> str:
    """sha256 hex of everything the candidates depend on (not the scorers, targets or n's used on them); the prompt
    format only when it is not the default (keys from before it existed stay valid)."""
    h = hashlib.sha256(KEY_VERSION.encode())
    for part in (model_fp, tok_fp, json.dumps([prompt_json(p) for p in prompts], ensure_ascii=False)):
        h.update(part.encode())
    settings = {
        "n_draws": n_draws,
        "group_size": group_size,
        "max_new_tokens": max_new_tokens,
        "max_prompt_length": max_prompt_length,
        "seed": seed,
        "temperature": 1.0,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    if not prompt_format.is_default:
        h.update(f"prompt-format:{prompt_format.fingerprint()}".encode())
    return h.hexdigest()


def read_cached_pool(out: Path, key: str, prompts: list[Prompt], s: int, n: int) -> CandidatePool | None:
    """The pool cached in `out` when its key matches (and its shape fits S = s draws of N = n), else None."""
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


def candidate_records(
    pool: CandidatePool,
    scores: Scores,
    split: list[str] | None,
    selections: dict[str, dict[int, torch.Tensor]],
) -> list[dict[str, Any]]:
    """candidates.jsonl rows, one per prompt; `chosen` holds the global column of each draw's selection per
    family (bon, bon-safe) and n."""
    records = []
    for i, prompt in enumerate(pool.prompts):
        rec: dict[str, Any] = {
            "prompt_index": i,
            "prompt": prompt_json(prompt),
            "split": split[i] if split is not None else None,
            "responses": pool.responses[i],
            "logp_ref": pool.logp[i].tolist(),
            "response_tokens": pool.response_tokens[i].tolist(),
            "finished": pool.finished[i].tolist(),
            "roundtrip": pool.roundtrip[i].tolist(),
            "base_samples": list(range(pool.n_draws * pool.group_size, pool.width)),
            "reward": scores.reward[i].tolist(),
        }
        for name in SCORE_FIELDS[1:]:
            t = getattr(scores, name)
            if t is not None:
                rec[name] = t[i].tolist()
        rec["chosen"] = {
            fam: {str(n): pool.global_index(c)[i].tolist() for n, c in per_n.items()}
            for fam, per_n in selections.items()
            if per_n
        }
        records.append(rec)
    return records


def candidates_meta(key: str, model: str, pool: CandidatePool) -> dict[str, Any]:
    """candidates.meta.json: the cache key and the layout."""
    return {
        "key": key,
        "model": model,
        "n_prompts": len(pool.prompts),
        "n_draws": pool.n_draws,
        "group_size": pool.group_size,
        "layout": "candidate j of draw s at s·N + j; base sample s at S·N + s",
    }
