"""Best-of-n sampling: one batched `sample` call (n=8 for 16 prompts) vs a per-prompt loop (16 calls of n=8), and
HF `generate(num_return_sequences=8)` on the same batch for reference (sacpo's sampler before it prefilled each
prompt once); controlled decoding (token-wise and blockwise) cost per generated token relative to plain sampling.

All arms use `sacpo.models.generate.sample` (ancestral, no truncation) on the same prompts and max_new_tokens, with
the RNG reseeded before each arm; they alternate within this child after one untimed warm-up call each. Lengths are
random (a response ends at EOS), so throughput is compared as generated tokens per second.

Controlled decoding uses `sacpo.infer.cd_token.token_cd` / `sacpo.infer.cd_block.block_cd` with an untrained prefix
scorer built from the same model (`PrefixScorer.from_base`: the cost of a scorer does not depend on its weights). If
that module or API is missing, the result says so and the table shows a TODO row.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import child_main, paired_rows


def _prompts(spec: dict[str, Any], tokenizer: Any) -> list[list[int]]:
    from sacpo.data.tokenize import encode_prompt

    rows = paired_rows(spec["n_prompts"], spec["model"], seed=2)
    return [encode_prompt(tokenizer, r["prompt"], spec["max_prompt_length"]) for r in rows]


def _timed(fn: Any, seed: int) -> tuple[float, Any]:
    import torch

    torch.manual_seed(seed)
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def _new_tokens(seqs: list[Any]) -> int:
    return sum(s.response_len for s in seqs)


def hf_generate(
    model: Any, prompts: list[list[int]], eos_id: int, pad_id: int, n: int, max_new_tokens: int
) -> list:
    """What `sample` did before it prefilled each prompt once: one `generate(num_return_sequences=n)` call, which
    repeats every prompt n times before its prefill (same ancestral sampling: no top-k/top-p)."""
    import torch

    from sacpo.data.tokenize import Encoded
    from sacpo.models.generate import left_pad

    ids, attn = left_pad(prompts, pad_id)
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            num_return_sequences=n, eos_token_id=eos_id, pad_token_id=pad_id,
        )  # fmt: skip
    seqs = []
    for j, toks in enumerate(gen[:, ids.shape[1] :].tolist()):
        toks = toks[: toks.index(eos_id) + 1] if eos_id in toks else toks
        seqs.append(Encoded(tuple(prompts[j // n]) + tuple(toks), len(prompts[j // n])))
    return seqs


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from sacpo.models.generate import sample
    from sacpo.models.load import load_model, load_tokenizer

    model = load_model(spec["policy"]).eval()
    tokenizer = load_tokenizer(spec["policy"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = _prompts(spec, tokenizer)
    n, m = spec["n"], spec["max_new_tokens"]

    def batched():
        return sample(model, prompts, eos, pad, n=n, max_new_tokens=m, batch_size=len(prompts))

    def loop():
        return [s for p in prompts for s in sample(model, [p], eos, pad, n=n, max_new_tokens=m, batch_size=1)]

    def hf():
        return hf_generate(model, prompts, eos, pad, n=n, max_new_tokens=m)

    arms = {"batched": batched, "loop": loop, "hf_generate": hf}
    result: dict[str, Any] = {"bon": {k: [] for k in arms}}
    # untimed warm-up (allocator, kernels): every arm on 2 prompts, 2 samples, 4 tokens
    sample(model, prompts[:2], eos, pad, n=2, max_new_tokens=4, batch_size=2)
    sample(model, prompts[:1], eos, pad, n=2, max_new_tokens=4, batch_size=1)
    hf_generate(model, prompts[:2], eos, pad, n=2, max_new_tokens=4)
    min_seconds = spec.get("min_seconds", 1.0)
    for rep in range(spec["reps"]):
        names = list(arms) if rep < spec.get("hf_reps", spec["reps"]) else ["batched", "loop"]
        names = names if rep % 2 == 0 else names[::-1]  # the arms alternate
        for name in names:
            # one timed sample = as many whole calls as fill min_seconds (a tiny model's call takes ~0.1 s, where
            # one scheduler hiccup would decide the ratio); seeds differ per call
            row = {"seconds": 0.0, "tokens": 0, "sequences": 0, "calls": 0}
            while row["calls"] == 0 or row["seconds"] < min_seconds:
                seconds, seqs = _timed(arms[name], seed=1000 * rep + row["calls"])
                row["seconds"] += seconds
                row["tokens"] += _new_tokens(seqs)
                row["sequences"] += len(seqs)
                row["calls"] += 1
            result["bon"][name].append(row)
    if spec.get("cd", True):
        result["cd"] = controlled(spec, model, tokenizer, prompts)
    return result


def controlled(spec: dict[str, Any], model: Any, tokenizer: Any, prompts: list[list[int]]) -> dict[str, Any]:
    """Seconds per generated token of token-wise CD, blockwise CD and plain sampling (one response per prompt)."""
    try:
        from sacpo.infer.cd_block import block_cd
        from sacpo.infer.cd_token import token_cd
        from sacpo.models.prefix_value import PrefixScorer
    except ImportError as e:
        return {"error": f"controlled decoding module not available ({e})"}
    from sacpo.models.generate import sample

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    m, bs = spec["max_new_tokens"], len(prompts)
    try:
        scorer = PrefixScorer.from_base(spec["policy"], tokenizer, seed=0)
        scorer.model.eval()
        arms = {
            "plain": lambda: sample(model, prompts, eos, pad, n=1, max_new_tokens=m, batch_size=bs),
            "token": lambda: token_cd(
                model,
                [scorer],
                prompts,
                eos,
                pad,
                beta=1.0,
                top_k=spec["cd_top_k"],
                max_new_tokens=m,
                batch_size=bs,
            ),
            "block": lambda: block_cd(
                model,
                [scorer],
                prompts,
                eos,
                pad,
                K=spec["cd_K"],
                M=spec["cd_M"],
                max_new_tokens=m,
                batch_size=bs,
            ),
        }
        out: dict[str, Any] = {k: [] for k in arms}
        for fn in arms.values():
            _timed(fn, seed=999)
        for rep in range(spec["reps"]):
            for name in list(arms) if rep % 2 == 0 else list(arms)[::-1]:
                seconds, res = _timed(arms[name], seed=rep)
                seqs = res if isinstance(res, list) else res.seqs
                row = {"seconds": seconds, "tokens": _new_tokens(seqs)}
                if not isinstance(res, list):
                    row["per_generated_token"] = res.cost.per_generated_token()
                out[name].append(row)
        out["settings"] = {"top_k": spec["cd_top_k"], "beta": 1.0, "K": spec["cd_K"], "M": spec["cd_M"]}
        return out
    except (AttributeError, TypeError) as e:  # the module exists but its API changed under us
        return {"error": f"controlled decoding API not usable ({type(e).__name__}: {e})"}


if __name__ == "__main__":
    child_main(run)
