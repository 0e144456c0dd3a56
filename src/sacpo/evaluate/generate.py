"""Sample responses from a model on evaluation prompts and record their log-probs under the policy and the SFT model.

For every prompt x_p, draw S responses y_ps ~ π(·|x_p) by ancestral sampling (`sacpo.models.generate.sample`;
by default temperature 1 and no top-p, so samples follow π exactly — `temperature` / `top_p` / greedy (temperature
0) are decoding rules a protocol may ask for, whose samples follow a modified q instead), seeded; then score the
*sampled token ids* (prompt ids + response ids, the EOS included when one was generated) under π and π_SFT:

    logp_policy = log π(y|x) = Σ_t log π(y_t | x, y_<t),    logp_ref = log π_SFT(y|x)

At temperature 1 without top-p, log π comes from the sampler itself (`sacpo.models.generate.sample_with_logps`:
the log-softmax of the logits each token was drawn from); otherwise from a forward pass over the sampled ids.
log π_SFT comes from a forward pass under the reference with each prompt run once (`sacpo.models.prefix_logps`),
the reference loaded, fingerprinted and prefilled once per evaluation (`sacpo.evaluate.reference.Reference`); the
SFT policy's own rows take logp_ref = logp_policy (the same model). All of these equal one full forward pass per
sequence to float rounding (tested); the meta records which one gave each column.

Log-probs come from the sampled ids, never from re-encoding the decoded text: decoding can be lossy (a byte-level
tokenizer cut mid-character, a tokenizer whose encoding of the text differs from the sampled segmentation), and
the KL estimator needs the probability of what was actually sampled. Each row records `roundtrip`: whether
re-encoding the response text gives back the sampled ids — consumers that re-tokenize text (training on samples,
learned scorers) should check it. A response cut at max_new_tokens has no EOS (`finished` false); its log-probs
are those of the truncated sequence, which is what an estimator of KL between truncated distributions needs.

Rows are written to <out_dir>/samples.jsonl (prompt-major: row = prompt_index·S + sample) with a sidecar
samples.meta.json holding a cache key: sha256 of the model and reference fingerprints (weights + config), the
tokenizer, the prompts, n_samples, max_new_tokens, max_prompt_length and the sampling seed. A directory whose key
matches is reused without loading any model. The batch size and device are not in the key: they change which
samples a seed draws, not whether they are valid samples of π.

Independent streams: models sampled with the same seed share their per-token uniforms (common random numbers), so
sample s of two similar models is far more often the same text than independent draws would be. `generate_samples(
…, stream=name)` draws with `stream_seed(seed, name)` — a stable sha256 of (seed, name) — so every model of an
evaluation has its own stream and cross-model win rates estimate P(r(Y) > r(Y′)) for independent draws.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sacpo.data.prompt_format import DEFAULT_FORMAT, PromptFormat
from sacpo.data.prompts import prompt_from_json, prompt_to_json
from sacpo.data.records import Prompt
from sacpo.data.tokenize import Encoded, encode_prompt
from sacpo.evaluate.reference import Reference
from sacpo.fsutil import atomic_write_jsonl, atomic_write_text
from sacpo.models.generate import sample_with_logps
from sacpo.models.load import (
    fingerprint_model,
    load_model,
    load_tokenizer_with_fingerprint,
    tokenizer_fingerprint,
)
from sacpo.models.prefix_logps import PromptCachedLogps
from sacpo.rng import torch_seeded

log = logging.getLogger("sacpo.evaluate")

SAMPLES_FILE = "samples.jsonl"
META_FILE = "samples.meta.json"
KEY_VERSION = "sacpo-eval-samples-v1"


@dataclass(frozen=True)
class SampleRow:
    """One sampled response. logp_* are None when unknown (e.g. an artifact produced without log-probs)."""

    prompt: Prompt
    response: str
    sample: int
    logp_policy: float | None
    logp_ref: float | None
    prompt_index: int = -1
    response_tokens: int | None = None
    finished: bool | None = None  # ended with EOS (False: cut at max_new_tokens)
    roundtrip: bool | None = None  # re-encoding `response` gives the sampled ids

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt"] = prompt_to_json(self.prompt)
        for k in ("logp_policy", "logp_ref"):
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "") -> SampleRow:
        """Read a row; `prompt`, `response` and `sample` are required, everything else optional."""
        missing = [k for k in ("prompt", "response", "sample") if k not in d]
        if missing:
            raise ValueError(f"{where}: sample row lacks field(s) {missing}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["prompt"] = prompt_from_json(d["prompt"])
        known.setdefault("logp_policy", None)
        known.setdefault("logp_ref", None)
        return cls(**known)


def stream_seed(seed: int, name: str) -> int:
    """The sampling seed of stream `name` under base seed `seed`: the first 8 bytes of sha256("seed:name") as an
    integer below 2⁶³ — stable across processes and Python versions (unlike hash()), different for every name."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def prompt_id(prompt: Prompt) -> str:
    """Canonical text of a prompt, used to match artifact rows to evaluation prompts."""
    return json.dumps(prompt_to_json(prompt), sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Generation:
    rows: list[SampleRow]
    path: Path
    cached: bool  # True: read from out_dir, no model loaded
    meta: dict[str, Any]


def samples_key(
    model_fingerprint: str,
    ref_fingerprint: str,
    tokenizer_fingerprint: str,
    prompts: Sequence[Prompt],
    n_samples: int,
    max_new_tokens: int,
    seed: int,
    max_prompt_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prompt_format: PromptFormat = DEFAULT_FORMAT,
) -> str:
    """sha256 of everything the samples and their log-probs depend on (a non-default prompt format folded in
    last, so keys of samples made before prompt formats existed stay valid)."""
    h = hashlib.sha256()
    h.update(KEY_VERSION.encode())
    for part in (model_fingerprint, ref_fingerprint, tokenizer_fingerprint):
        h.update(part.encode())
    h.update(json.dumps([prompt_to_json(p) for p in prompts], ensure_ascii=False).encode())
    h.update(
        json.dumps(
            {
                "n_samples": n_samples,
                "max_new_tokens": max_new_tokens,
                "seed": seed,
                "max_prompt_length": max_prompt_length,
                "temperature": temperature,
                **({"top_p": top_p} if top_p != 1.0 else {}),
            }
        ).encode()
    )
    key = h.hexdigest()
    if prompt_format.is_default:
        return key
    return hashlib.sha256(f"{key}:prompt-format:{prompt_format.fingerprint()}".encode()).hexdigest()


def read_samples(path: str | Path) -> list[SampleRow]:
    """Rows of a samples.jsonl (ours or an artifact made elsewhere, e.g. best-of-n)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no samples file")
    rows = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(SampleRow.from_json(json.loads(line), where=f"{p}:{i}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{i}: invalid JSON: {e}") from None
    return rows


def cached_samples(out: Path, key: str, n_rows: int) -> tuple[list[SampleRow], dict[str, Any]] | None:
    meta_path, samples_path = out / META_FILE, out / SAMPLES_FILE
    if not (meta_path.is_file() and samples_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        rows = read_samples(samples_path)
    except (ValueError, OSError) as e:
        log.warning("%s: unreadable samples cache (%s); regenerating", out, e)
        return None
    if len(rows) != n_rows:
        log.warning("%s: samples cache has %d rows, expected %d; regenerating", out, len(rows), n_rows)
        return None
    return rows, meta


def max_positions(model: Any) -> int | None:
    """The model's context length from its config, when it declares one."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def _roundtrip(tokenizer: Any, response_ids: list[int], text: str) -> bool:
    return tokenizer(text, add_special_tokens=False)["input_ids"] == response_ids


def generate_samples(
    model_dir: str | Path,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    ref_dir: str | Path,
    n_samples: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    max_prompt_length: int = 256,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    reference: Reference | None = None,
    stream: str | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prompt_format: PromptFormat = DEFAULT_FORMAT,
) -> Generation:
    """Sample n_samples responses per prompt from `model_dir`, log-probs under it and under `ref_dir` (SFT).

    Writes <out_dir>/samples.jsonl (+ samples.meta.json) or reuses them when the cache key matches. `reference`
    (`Reference.load(ref_dir, device, dtype)`, made here when None) shares the reference's tokenizer, fingerprint,
    model and prompt prefills across the models of an evaluation; it must be ref_dir's.
    Prompts are rendered with the tokenizer's chat template when it has one and left-truncated to
    min(max_prompt_length, context − max_new_tokens) tokens. stream: draw with `stream_seed(seed, stream)` (an
    independent random stream per model; recorded in the meta as stream and sampling_seed) instead of `seed`.
    temperature (0 = greedy) and top_p: the decoding rule (`sacpo.models.generate.next_token_probs`); log-probs
    are always those of π and π_SFT themselves.
    prompt_format: system prompt and chat template of the prompts (in the cache key and the meta when not the
    default).
    """
    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"n_samples and max_new_tokens must be ≥ 1, got {n_samples}, {max_new_tokens}")
    if not prompts:
        raise ValueError("no evaluation prompts")
    out = Path(out_dir)
    reference = reference or Reference.load(ref_dir, device, dtype)
    if reference.dir.resolve() != Path(ref_dir).resolve():
        raise ValueError(f"reference {reference.dir} is not ref_dir {ref_dir}")
    reference.check_tokenizer(model_dir)
    tokenizer, tok_fp = reference.tokenizer, reference.tokenizer_fingerprint
    ref_fp = reference.fingerprint
    model_fp = (
        ref_fp if Path(model_dir).resolve() == reference.dir.resolve() else fingerprint_model(model_dir)
    )
    sampling_seed = seed if stream is None else stream_seed(seed, stream)
    key = samples_key(
        model_fp, ref_fp, tok_fp, prompts, n_samples, max_new_tokens, sampling_seed, max_prompt_length,
        temperature, top_p, prompt_format,
    )  # fmt: skip
    n_rows = len(prompts) * n_samples
    hit = cached_samples(out, key, n_rows)
    if hit is not None:
        log.info("samples: cache hit %s (no model loaded)", out / SAMPLES_FILE)
        return Generation(hit[0], out / SAMPLES_FILE, True, hit[1])

    t0 = time.perf_counter()
    same_as_ref = model_fp == ref_fp
    policy = reference.model() if same_as_ref else load_model(model_dir, dtype=dtype).to(reference.device)
    policy.eval()
    limit = _prompt_limit(policy, max_prompt_length, max_new_tokens)
    prompt_ids = [encode_prompt(tokenizer, p, limit, fmt=prompt_format) for p in prompts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch_seeded(sampling_seed):
        seqs, sampled = sample_with_logps(
            policy, prompt_ids, eos, pad, n_samples, max_new_tokens, temperature, batch_size, top_p
        )
    from_sampler = temperature == 1 and top_p == 1  # the draw's distribution is π itself
    if from_sampler:
        logp_policy = sampled.float()  # (P·S,)
    else:
        logp_policy = PromptCachedLogps(policy, pad, max_cache_bytes=0)(seqs, batch_size).float()  # (P·S,)
    if same_as_ref:
        logp_ref = logp_policy  # the same model and ids
    else:
        del policy
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
        logp_ref = reference.scorer()(seqs, batch_size).float()  # (P·S,)

    rows = _decode_rows(tokenizer, seqs, prompts, n_samples, logp_policy, logp_ref)
    meta = {
        "key": key,
        "model_dir": str(model_dir),
        "ref_dir": str(ref_dir),
        "model_fingerprint": model_fp,
        "ref_fingerprint": ref_fp,
        "n_prompts": len(prompts),
        "n_samples": n_samples,
        "max_new_tokens": max_new_tokens,
        "max_prompt_length": max_prompt_length,
        "prompt_token_limit": limit,
        "seed": seed,
        "stream": stream,
        "sampling_seed": sampling_seed,
        "temperature": temperature,
        "top_p": top_p,
        "prompt_format": prompt_format.to_json(),
        "logp_policy_from": "sampler" if from_sampler else "forward pass",
        "logp_ref_from": "logp_policy (the reference itself)" if same_as_ref else "forward pass",
        **_row_stats(rows, model_dir),
        "seconds": time.perf_counter() - t0,
    }
    (out / META_FILE).unlink(missing_ok=True)  # a stale key must never vouch for the new rows
    atomic_write_jsonl(out / SAMPLES_FILE, [r.to_json() for r in rows])
    # written last: its key marks the samples as complete
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False))
    return Generation(rows, out / SAMPLES_FILE, False, meta)


def shared_tokenizer(model_dir: str | Path, ref_dir: str | Path) -> tuple[Any, str]:
    """The model's tokenizer and its fingerprint; raises when the reference's tokenizer differs (the reference's
    fingerprinted without a load when its files were loaded before: `tokenizer_fingerprint`)."""
    tokenizer, tok_fp = load_tokenizer_with_fingerprint(model_dir)
    if tokenizer_fingerprint(ref_dir) != tok_fp:
        raise ValueError(
            f"{model_dir} and the reference {ref_dir} have different tokenizers: the log-ratio of sequences "
            "tokenized differently is not a KL estimate"
        )
    return tokenizer, tok_fp


def _prompt_limit(policy: Any, max_prompt_length: int, max_new_tokens: int) -> int:
    """Prompt tokens kept: min(max_prompt_length, context − max_new_tokens); raises when nothing is left."""
    context = max_positions(policy)
    limit = max_prompt_length if context is None else min(max_prompt_length, context - max_new_tokens)
    if limit < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in context {context}")
    return limit


def _decode_rows(
    tokenizer: Any,
    seqs: Sequence[Encoded],
    prompts: Sequence[Prompt],
    n_samples: int,
    logp_policy: torch.Tensor,
    logp_ref: torch.Tensor,
) -> list[SampleRow]:
    """One SampleRow per sampled sequence (prompt-major, P·S): the response text without its EOS, its log-probs
    (P·S,) under the policy and the reference, and whether the text re-encodes to the sampled ids."""
    eos = tokenizer.eos_token_id
    rows = []
    for i, seq in enumerate(seqs):
        response_ids = list(seq.input_ids[seq.prompt_len :])
        finished = bool(response_ids) and response_ids[-1] == eos
        text_ids = response_ids[:-1] if finished else response_ids
        text = tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        rows.append(
            SampleRow(
                prompt=prompts[i // n_samples],
                response=text,
                sample=i % n_samples,
                logp_policy=float(logp_policy[i]),
                logp_ref=float(logp_ref[i]),
                prompt_index=i // n_samples,
                response_tokens=len(response_ids),
                finished=finished,
                roundtrip=_roundtrip(tokenizer, text_ids, text),
            )
        )
    return rows


def _row_stats(rows: Sequence[SampleRow], model_dir: str | Path) -> dict[str, float]:
    """The meta's shares of responses that re-encode to their sampled ids and that ended with EOS, and the mean
    response length in tokens; warns when some responses do not re-encode."""
    n_bad = sum(not r.roundtrip for r in rows)
    if n_bad:
        log.warning(
            "%s: %d/%d responses do not re-encode to their sampled ids (log-probs use the sampled ids)",
            model_dir,
            n_bad,
            len(rows),
        )
    return {
        "roundtrip_fraction": 1 - n_bad / len(rows),
        "finished_fraction": sum(bool(r.finished) for r in rows) / len(rows),
        "mean_response_tokens": sum(r.response_tokens or 0 for r in rows) / len(rows),
    }
