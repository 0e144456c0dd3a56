"""`sacpo cd`: controlled decoding with prefix scorers, token-wise (`sacpo.infer.cd_token`) or blockwise
(`sacpo.infer.cd_block`; M ≥ max_new_tokens = best-of-K by the scorer).

Several objectives (inference-time SACPO): with a second, safety prefix scorer V_g and λ > 0 every value is
V = V_r + λ·V_g (`combine: cost` for a cost scorer: V_r − λ·V_c), the decoding analogue of π ∝ π_ref·exp((r+λg)/β).

Cost: tokens processed by forward passes (prompt prefill included, padding excluded), of the base model and of
the scorer(s), and tokens *sampled* from the base model, each also per generated token; `plain_sampling_tokens` is
what ancestral sampling of the same responses would process, so cost_ratio = total / plain. Blockwise here
re-encodes the prefix every block (no cache kept across `sample` calls), so its forward count is that of this
implementation; its sampled-token count (K per generated token) is implementation-independent.

Outputs (the directory replaced atomically): samples.jsonl — rows readable by
`sacpo.evaluate.generate.read_samples` (prompt, response, sample, logp_policy = log q(y) for token-wise CD or None,
logp_ref = log π_base(y), prompt_index, response_tokens, finished, roundtrip, plus value, kl (token-wise: the
exact per-token sum; blockwise: the per-block ε-estimate `sacpo.math.decoding.blockwise_kl_estimate`), kl_bound,
gold scores …) —,
summary.json and config.yaml. With an oracle (and `baseline_samples`, the default) also baseline.jsonl — n_samples
plain ancestral samples per prompt from the base model (seed + 1), the win-rate opponents: sample s of CD against
base sample s of the same prompt, as `sacpo eval` pairs a model with SFT — and results.json (`sacpo.recipes.
cd_report.cd_results`). Gold scores are rounded to float32, as CD has always reported them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sacpo.config import ConfigError, to_yaml
from sacpo.data.prompt_format import log_first_prompt
from sacpo.data.prompts import load_prompts
from sacpo.data.records import Prompt
from sacpo.data.tokenize import encode_prompt
from sacpo.infer.cd_block import block_cd
from sacpo.infer.cd_config import CDConfig
from sacpo.infer.cd_output import CDOutput
from sacpo.infer.cd_stream import combined_final_values
from sacpo.infer.cd_token import token_cd
from sacpo.math.decoding import blockwise_kl_estimate
from sacpo.models.generate import sample
from sacpo.models.load import (
    ModelLoadError,
    check_model_dir,
    fingerprint_tokenizer,
    load_model,
    load_tokenizer,
)
from sacpo.models.logprobs import batched_response_token_logps
from sacpo.models.modules import resolve_device
from sacpo.models.prefix_value import META_FILE, PrefixScorer, decode_response
from sacpo.recipes.cd_report import cd_results, cd_summary, mean_se, write_cd_outputs
from sacpo.rng import torch_seeded
from sacpo.scoring import get_oracle, run_scorer

log = logging.getLogger("sacpo.cd")


def _decode_token(cfg: CDConfig, base: Any, scorers: list[PrefixScorer], prompts, eos, pad, show_progress):
    """Token-wise CD; its draws come from a generator seeded with cfg.seed on the base model's device."""
    generator = torch.Generator(device=next(base.parameters()).device).manual_seed(cfg.seed)
    return token_cd(
        base, scorers, prompts, eos, pad, cfg.beta, cfg.top_k, cfg.max_new_tokens, cfg.lam, cfg.combine,
        cfg.batch_size, show_progress=show_progress, generator=generator,
    )  # fmt: skip


def _decode_block(cfg: CDConfig, base: Any, scorers: list[PrefixScorer], prompts, eos, pad, show_progress):
    """Blockwise CD; `sacpo.models.generate.sample` draws from the global RNG, seeded with cfg.seed inside
    fork_rng so that the caller's RNG state is left as it was."""
    with torch_seeded(cfg.seed):
        return block_cd(
            base, scorers, prompts, eos, pad, cfg.K, cfg.M, cfg.max_new_tokens, cfg.lam, cfg.combine,
            cfg.batch_size, show_progress=show_progress,
        )  # fmt: skip


DECODERS: dict[str, Callable[..., CDOutput]] = {"token": _decode_token, "block": _decode_block}


def run_cd(cfg: CDConfig, show_progress: bool = True) -> dict[str, Any]:
    """Decode n_samples responses per prompt with controlled decoding and write samples.jsonl, summary.json and
    config.yaml (+ baseline.jsonl, results.json with an oracle) to cfg.output_dir (atomically). Returns the
    summary."""
    check_model_dir(cfg.model)
    scorer_dirs = [cfg.scorer] + ([cfg.safety_scorer] if cfg.safety_scorer and cfg.lam > 0 else [])
    for d in scorer_dirs:
        check_scorer_dir(d)
    prompts = load_prompts(cfg.prompts, cfg.prompts_split, cfg.max_prompts)
    tokenizer = load_tokenizer(cfg.model)
    tok_fp = fingerprint_tokenizer(tokenizer)
    for d in scorer_dirs:
        check_scorer_dir(d, tok_fp)
    started = time.time()
    device = resolve_device(cfg.device)
    base = load_model(cfg.model).to(device).eval()
    scorers = [PrefixScorer.load(d, device) for d in scorer_dirs]
    fmt = cfg.prompt_format()
    log_first_prompt(log, tokenizer, prompts[0], fmt)
    for s in scorers:
        if _format_id(s.meta.get("prompt_format")) != _format_id(fmt.to_json()):
            log.warning(
                "%s was trained on prompts in another prompt format (%s)", s.name, s.meta.get("prompt_format")
            )
    prompt_ids = [encode_prompt(tokenizer, p, prompt_limit(base, cfg), fmt=fmt) for p in prompts]
    row_prompts = [ids for ids in prompt_ids for _ in range(cfg.n_samples)]  # prompt-major
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    t0 = time.perf_counter()
    out = DECODERS[cfg.mode](cfg, base, scorers, row_prompts, eos, pad, show_progress)
    decode_seconds = time.perf_counter() - t0
    if cfg.mode == "block":
        token_logps = batched_response_token_logps(base, out.seqs, pad, cfg.batch_size)
        out.logp_base = [float(t.sum()) for t in token_logps]
        out.kl = [blockwise_kl_estimate(t, cfg.M, cfg.K) for t in token_logps]
    rows = cd_rows(cfg, out, scorers, tokenizer, prompts)
    summary = cd_summary(cfg, out, rows, [str(d) for d in scorer_dirs], len(prompts), decode_seconds)
    summary["seconds"] = round(time.time() - started, 3)
    summary["prompt_format"] = fmt.to_json()
    results, baseline = None, []
    if cfg.oracle is not None:
        summary["gold_reward"] = mean_se([r["gold_reward"] for r in rows])
        summary["gold_safety"] = mean_se([r["gold_safety"] for r in rows])
        summary["safe_fraction"] = sum(r["gold_safe"] for r in rows) / len(rows)
        if cfg.baseline_samples:
            baseline = baseline_rows(cfg, base, tokenizer, prompts, prompt_ids)
            results = cd_results(cfg, rows, baseline, summary)
            summary["baseline"] = {
                "gold_reward": mean_se([r["gold_reward"] for r in baseline]),
                "safe_fraction": sum(r["gold_safe"] for r in baseline) / len(baseline),
                "gold_win_rate": results[1]["helpful_win"][0],
                "gold_harmless_win_rate": results[1]["harmless_win"][0],
            }
    write_cd_outputs(Path(cfg.output_dir), rows, summary, to_yaml(cfg), baseline, results)
    return summary


def _format_id(recorded: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(system_prompt, template sha256) of a recorded `PromptFormat.to_json()`; a scorer without one: default."""
    recorded = recorded or {}
    return recorded.get("system_prompt"), (recorded.get("chat_template") or {}).get("sha256")


def check_scorer_dir(path: str, base_tokenizer_fp: str | None = None) -> None:
    """A prefix scorer directory (its META_FILE), with the base model's tokenizer when a fingerprint is given."""
    p = check_model_dir(path)
    if not (p / META_FILE).is_file():
        raise ModelLoadError(
            f"{p}: no {META_FILE} — not a prefix scorer (train one with train_prefix_scorer)"
        )
    if base_tokenizer_fp is not None and fingerprint_tokenizer(load_tokenizer(p)) != base_tokenizer_fp:
        raise ModelLoadError(
            f"{p}: the prefix scorer's tokenizer differs from the base model's; values would be "
            "computed on different token ids"
        )


def prompt_limit(base: Any, cfg: CDConfig) -> int:
    """Prompt tokens kept (left-truncated): max_prompt_length, within the context minus max_new_tokens."""
    context = getattr(base.config, "n_positions", None) or getattr(
        base.config, "max_position_embeddings", None
    )
    limit = (
        cfg.max_prompt_length if context is None else min(cfg.max_prompt_length, context - cfg.max_new_tokens)
    )
    if limit < 1:
        raise ConfigError(
            f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in context {context}"
        )
    return limit


def gold_scores(oracle: str, prompts: Sequence[Prompt], texts: Sequence[str]) -> dict[str, list[float]]:
    """The oracle's gold reward and safety of each response, rounded to float32 (what CD has always reported)."""
    o = get_oracle(oracle)
    return {
        "gold_reward": run_scorer(o.reward, prompts, texts).float().double().tolist(),
        "gold_safety": run_scorer(o.safety, prompts, texts).float().double().tolist(),
    }


def cd_rows(
    cfg: CDConfig, out: CDOutput, scorers: list[PrefixScorer], tokenizer: Any, prompts: list[Prompt]
) -> list[dict[str, Any]]:
    """samples.jsonl rows (prompt-major, n_samples per prompt): text, log-probs, values, KLs and gold scores."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    combined, each = combined_final_values(scorers, out.seqs, pad, cfg.lam, cfg.combine, cfg.batch_size)
    texts, finished = zip(
        *(decode_response(tokenizer, s.input_ids[s.prompt_len :], eos) for s in out.seqs), strict=True
    )
    row_prompts = [prompts[i // cfg.n_samples] for i in range(len(out.seqs))]
    gold = gold_scores(cfg.oracle, row_prompts, list(texts)) if cfg.oracle is not None else {}
    rows = []
    for i, s in enumerate(out.seqs):
        response_ids = list(s.input_ids[s.prompt_len :])
        text_ids = response_ids[:-1] if finished[i] else response_ids
        row = {
            "prompt": row_prompts[i] if isinstance(row_prompts[i], str) else list(row_prompts[i]),
            "response": texts[i],
            "sample": i % cfg.n_samples,
            "logp_policy": out.logp_policy[i],
            "logp_ref": out.logp_base[i],
            "prompt_index": i // cfg.n_samples,
            "response_tokens": len(response_ids),
            "finished": finished[i],
            "roundtrip": tokenizer(texts[i], add_special_tokens=False)["input_ids"] == text_ids,
            "value": combined[i].item(),
            "value_reward": each[0][i].item(),
            "value_safety": each[1][i].item() if len(each) > 1 else None,
            "kl": out.kl[i],
            "kl_topk": out.kl_topk[i],
            "kl_bound": out.kl_bound[i],
            "n_blocks": out.n_blocks[i],
        }
        for name, vals in gold.items():
            row[name] = vals[i]
        if "gold_safety" in gold:
            row["gold_safe"] = gold["gold_safety"][i] > 0
        rows.append(row)
    return rows


def baseline_rows(
    cfg: CDConfig, base: Any, tokenizer: Any, prompts: Sequence[Prompt], prompt_ids: list[list[int]]
) -> list[dict[str, Any]]:
    """n_samples plain ancestral samples per prompt (prompt-major, seed + 1), scored by the gold oracle."""
    assert cfg.oracle is not None
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch_seeded(cfg.seed + 1):  # `sample` draws from the global RNG
        seqs = sample(
            base, prompt_ids, eos, pad, n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
            batch_size=max(1, cfg.batch_size // cfg.n_samples),
        )  # fmt: skip
    texts = [decode_response(tokenizer, s.input_ids[s.prompt_len :], eos)[0] for s in seqs]
    row_prompts = [prompts[i // cfg.n_samples] for i in range(len(seqs))]
    gold = gold_scores(cfg.oracle, row_prompts, texts)
    r, g = gold["gold_reward"], gold["gold_safety"]
    return [
        {
            "prompt": p if isinstance(p, str) else list(p),
            "response": y,
            "sample": i % cfg.n_samples,
            "prompt_index": i // cfg.n_samples,
            "response_tokens": s.response_len,
            "gold_reward": r[i],
            "gold_safety": g[i],
            "gold_safe": g[i] > 0,
        }
        for i, (p, y, s) in enumerate(zip(row_prompts, texts, seqs, strict=True))
    ]
