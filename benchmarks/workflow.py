"""The whole SACPO workflow in one process: sacpo's pipeline + eval vs the same workflow written with TRL 1.x,
peft and transformers.

Workflow (both sides, same data, model, batch size, 1 epoch per stage, max_length, fused AdamW at a constant lr,
no weight decay, clip 1.0, fp32, full fine-tuning or LoRA r=8 with peft's default targets):

1. step 1: DPO on the helpful pairs at β from the SFT policy (reference = SFT);
2. step 2: for each λ of the sweep, DPO on the safety pairs at β/λ from the step-1 policy (reference = step 1);
3. P-SACPO: θ = (1−q)·θ_1 + q·θ_2 for each q, θ_2 = the step-2 policy of the largest λ;
4. evaluation of every model (SFT, step 1, each λ, each merge) on the same prompts: S samples per prompt
   (temperature 1, no top-k / top-p, ≤ max_new_tokens new tokens, `batch` prompts per generation call), then the
   log-probability of every sampled sequence under the model and under SFT (`batch` sequences per forward).

sacpo (`mode: sacpo`): `run_pipeline` with stages [helpful β, safe λ=[...]] and one MergeSpec (output `auto`:
adapters merge into an adapter on the shared base, full models tensor by tensor), then `evaluate_models` on the
models of its pipeline.json (no gold oracle or judge: samples, log-probs, KL vs SFT, results.json; the report
figures of `sacpo eval` are not drawn, TRL's side has none). The step-1 reference log-probs are one cached pass,
the λ branches share one more.

TRL (`mode: trl`): a `DPOTrainer` for step 1 and a fresh one per λ (`benchmarks.sweep.trl_stage`: the step-1
model as policy, TRL's default reference = a live copy of it, or for LoRA the adapter-disabled policy), each
followed by `save_model`. LoRA: the step-1 adapter is merged into its base (`merge_and_unload`, saved with
`save_pretrained`) to be the policy and reference of step 2, which trains a new adapter on it. Merging: both
models loaded with transformers (a LoRA step-2 model: its adapter applied to the merged step-1 model with peft and
`merge_and_unload`), their state dicts combined linearly for each q, `save_pretrained` (a full model per q).
Evaluation: HF `generate(do_sample=True, temperature=1, top_k=0, top_p=1, num_return_sequences=S)` on the same
rendered prompts (left-padded, `batch` prompts per call), then a forward pass per `batch` sequences under the
model and under SFT (kept in memory, as sacpo keeps it) summing the response tokens' log-probs (EOS included).
The SFT row's log-probs under SFT are computed once (sacpo's eval runs that pass twice).

Wall time runs from the start of step 1 (libraries already imported, as in sweep.py) to the last evaluation
output written; the result also has the seconds of each phase and the tokens generated. `mode: parity` runs
dpo_step's first-batch loss check on the workflow's step-1 data at β (TRL live and precomputed reference) and
on its step-2 data at β/λ_max (TRL live).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import StepClock, child_main, max_rss_mb, read_rows
from benchmarks.sweep import _pipeline_config, preload, trl_stage

FAMILIES = {"helpful": "dpo-helpful", "safe": "sacpo", "psacpo": "p-sacpo"}


def prompts_of(spec: dict[str, Any]) -> list[str]:
    """The evaluation prompts: the first n_prompts prompts of the eval rows (the same file both sides read)."""
    return [r["prompt"] for r in read_rows(spec["eval_data"])][: spec["eval"]["n_prompts"]]


# ----------------------------------------------------------------------------------------------------- sacpo
def timed(module: Any, name: str) -> list[float]:
    """Replace module.name by a wrapper that appends the seconds of every call to the returned list."""
    fn, seconds = getattr(module, name), []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t0)

    setattr(module, name, wrapper)
    return seconds


def run_sacpo(spec: dict[str, Any]) -> dict[str, Any]:
    import sacpo.recipes.pipeline as pipeline_mod
    import sacpo.train.ref_cache as ref_cache
    from sacpo.evaluate.run import evaluate_models, specs_from_pipeline
    from sacpo.recipes.pipeline import MergeSpec, run_pipeline

    out = Path(spec["work"]) / "workflow" / spec["tag"] / "sacpo"
    shutil.rmtree(
        out, ignore_errors=True
    )  # every repetition runs the whole workflow, reference passes included
    lam_max = max(spec["lams"])
    merge = MergeSpec(name="psacpo", a="helpful", b=f"safe-lam{lam_max:g}", qs=spec["qs"])
    cfg = _pipeline_config(spec, stages=2, output_dir=out / "pipeline", merges=[merge])
    ev = spec["eval"]
    merge_s = timed(pipeline_mod, "merge_dirs")  # measurement only: the seconds of each call
    ref_s = timed(ref_cache, "compute_ref_logps")
    started = time.perf_counter()
    result = run_pipeline(cfg, show_progress=False)
    trained = time.perf_counter()
    sft, specs = specs_from_pipeline(out / "pipeline", FAMILIES)
    rss_train = max_rss_mb()
    metrics = evaluate_models(
        specs,
        sft,
        prompts_of(spec),
        None,
        None,
        0.0,
        out / "eval",
        n_samples=ev["n_samples"],
        max_new_tokens=ev["max_new_tokens"],
        seed=0,
        show_progress=False,
        n_boot=ev["n_boot"],
        batch_size=ev["batch"],
        max_prompt_length=spec["max_prompt_length"],
        device="cpu",
    )
    seconds = time.perf_counter() - started
    stages = result["stages"]
    generated = 0
    for name in [m.name for m in metrics]:
        d = out / "eval" / "samples" / name
        rows = read_rows(d / "samples.jsonl") if (d / "samples.jsonl").is_file() else []
        generated += sum(r.get("response_tokens") or 0 for r in rows)
    step1 = stages[0]["summary"]["seconds"]
    step2 = [s["summary"]["seconds"] for s in stages[1:]]
    return {
        "seconds": seconds,
        "phases": {
            "step1": step1,
            "step2": step2,
            "merge": sum(merge_s),
            "eval": seconds - (trained - started),
            # loading, config checks and bookkeeping of run_pipeline outside train() and the merges
            "other": (trained - started) - step1 - sum(step2) - sum(merge_s),
        },
        "merge_s": merge_s,
        "ref_pass_s": ref_s,
        "models_evaluated": len(metrics),
        "generated_tokens": generated,
        "reference_passes": result["reference_passes"],
        "steps": [s["summary"]["steps"] for s in stages],
        "formats": sorted({s["format"] for s in stages} | {m["format"] for m in result["merges"]}),
        "rss_train_mb": rss_train,
    }


# ------------------------------------------------------------------------------------------------------- TRL
def _dense(path: Path, adapter: Path | None = None):
    """A transformers model from `path`; with `adapter`, that peft adapter applied and merged into it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def trl_merges(a: Path, b: tuple[Path, Path | None], qs: list[float], out: Path) -> dict[str, Path]:
    """θ = (1−q)·θ_a + q·θ_b with transformers: both state dicts in memory, lerp, save_pretrained per q."""
    import torch
    from transformers import AutoTokenizer

    model = _dense(a)
    sa = {k: v.clone() for k, v in model.state_dict().items()}
    sb = _dense(*b).state_dict()
    tokenizer = AutoTokenizer.from_pretrained(a)
    dirs = {}
    for q in qs:
        with torch.no_grad():
            model.load_state_dict({k: torch.lerp(v, sb[k], q) for k, v in sa.items()})
        target = out / f"psacpo-q{q:g}"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        dirs[f"psacpo-q{q:g}"] = target
    return dirs


def hf_sequence_logps(model: Any, seqs: list[list[int]], prompt_lens: list[int], pad: int, batch: int):
    """Σ log π(response tokens | prompt) of each sequence (prompt + response, EOS included), right-padded."""
    import torch

    out = []
    for i in range(0, len(seqs), batch):
        chunk, plens = seqs[i : i + batch], prompt_lens[i : i + batch]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        pos = torch.arange(1, width)[None, :]
        mask = (pos >= torch.tensor(plens)[:, None]) & (attn[:, 1:] > 0)
        out += (logp * mask).sum(-1).tolist()
    return out


def hf_evaluate(
    models: dict[str, Any], sft_dir: Path, prompts: list[str], spec: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Sample S responses per prompt from every model with HF generate, log-probs under it and SFT; one jsonl
    of samples per model. models: name → zero-argument loader (SFT first)."""
    import torch
    from transformers import AutoTokenizer

    from sacpo.data.tokenize import render_prompt

    ev = spec["eval"]
    tok = AutoTokenizer.from_pretrained(sft_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    prompt_ids = [
        tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"][-spec["max_prompt_length"] :]
        for p in prompts
    ]
    sft = None
    generated = 0
    for name, load in models.items():
        model = load().eval()
        if sft is None:
            sft = model  # SFT comes first and stays loaded: the reference of every model
        torch.manual_seed(0)
        seqs, plens = [], []
        for i in range(0, len(prompt_ids), ev["batch"]):
            chunk = prompt_ids[i : i + ev["batch"]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.no_grad():
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=attn,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=ev["max_new_tokens"],
                    num_return_sequences=ev["n_samples"],
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            for j, row in enumerate(gen.tolist()):
                p = chunk[j // ev["n_samples"]]
                resp = row[width:]
                if eos in resp:
                    resp = resp[: resp.index(eos) + 1]
                seqs.append(p + resp)
                plens.append(len(p))
                generated += len(resp)
        lp_policy = hf_sequence_logps(model, seqs, plens, pad, ev["batch"])
        lp_ref = lp_policy if model is sft else hf_sequence_logps(sft, seqs, plens, pad, ev["batch"])
        where = out / name
        where.mkdir(parents=True, exist_ok=True)
        with open(where / "samples.jsonl", "w") as f:
            for s, pl, a, b in zip(seqs, plens, lp_policy, lp_ref, strict=True):
                text = tok.decode(s[pl:], skip_special_tokens=True)
                f.write(json.dumps({"response": text, "logp_policy": a, "logp_ref": b}) + "\n")
        if model is not sft:
            del model
    return {"generated_tokens": generated, "models_evaluated": len(models)}


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    out = Path(spec["work"]) / "workflow" / spec["tag"] / "trl"
    shutil.rmtree(out, ignore_errors=True)
    sft = Path(spec["policy"])
    helpful, safe = read_rows(spec["helpful_data"]), read_rows(spec["safe_data"])
    peft_config = None
    if spec.get("lora"):
        from peft import LoraConfig

        from benchmarks.dpo_step import LORA

        peft_config = LoraConfig(
            task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"]
        )
    started = time.perf_counter()
    trainer = trl_stage(spec, sft, helpful, spec["beta"], out / "helpful", peft_config)
    steps = [trainer.state.global_step]
    step1_dir = out / "helpful" / "model"
    if peft_config is not None:  # step 2 trains a new adapter on the merged step-1 model
        step1_dir = out / "helpful" / "merged"
        trainer.model.merge_and_unload().save_pretrained(step1_dir)
        AutoTokenizer.from_pretrained(sft).save_pretrained(step1_dir)
    del trainer
    step1 = time.perf_counter() - started
    step2, stage_dirs = [], {}
    for lam in spec["lams"]:
        t0 = time.perf_counter()
        trainer = trl_stage(spec, step1_dir, safe, spec["beta"] / lam, out / f"safe-lam{lam:g}", peft_config)
        steps.append(trainer.state.global_step)
        del trainer
        stage_dirs[f"safe-lam{lam:g}"] = out / f"safe-lam{lam:g}" / "model"
        step2.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    lam_max = f"safe-lam{max(spec['lams']):g}"
    b = (step1_dir, stage_dirs[lam_max]) if peft_config is not None else (stage_dirs[lam_max], None)
    merged = trl_merges(step1_dir, b, spec["qs"], out / "merges")
    merge = time.perf_counter() - t0
    rss_train = max_rss_mb()
    t0 = time.perf_counter()

    def loader(path: Path, adapter: Path | None = None):
        return lambda: _dense(path, adapter)

    models = {"sft": loader(sft), "helpful": loader(step1_dir)}
    for name, d in stage_dirs.items():
        models[name] = loader(step1_dir, d) if peft_config is not None else loader(d)
    models.update({name: loader(d) for name, d in merged.items()})
    ev = hf_evaluate(models, sft, prompts_of(spec), spec, out / "eval")
    end = time.perf_counter()
    return {
        "seconds": end - started,
        "phases": {"step1": step1, "step2": step2, "merge": merge, "eval": end - t0, "other": 0.0},
        "steps": steps,
        "rss_train_mb": rss_train,
        **ev,
    }


# ---------------------------------------------------------------------------------------------------- parity
def run_parity(spec: dict[str, Any]) -> dict[str, Any]:
    """dpo_step's first-batch loss check (sacpo BatchLoss vs TRL compute_loss, reference = a perturbed copy of
    the policy) on the workflow's step-1 rows at β and on its step-2 rows at β/λ_max."""
    from benchmarks.dpo_step import run_parity as step_parity

    lam = max(spec["lams"])
    out = {}
    for stage, data, beta, modes in (
        ("step1", spec["helpful_data"], spec["beta"], ("live", "precompute")),
        (f"step2 (λ {lam:g})", spec["safe_data"], spec["beta"] / lam, ("live",)),  # the TRL default only
    ):
        n = len(read_rows(data))
        sub = {
            **spec,
            "data": data,
            "n_rows": n,
            "steps": n // spec["batch_size"],
            "beta": beta,
            "lora": False,
            "ref": "live",
            "parity_modes": modes,
            "cache_dir": str(Path(spec["work"]) / "refcache"),
        }
        res = step_parity(sub)
        out[stage] = {**res, "beta": beta}
    return {"stages": out}


def step_seconds(times: list[float], per_stage: list[int]) -> dict[str, Any]:
    """The optimizer steps' share of the wall time: step k's time is end(k) − end(k−1) within a stage (a stage's
    first step also carries its set-up and is left out), so the steps took ≈ n_steps · median. times: every step's
    end (StepClock), per_stage: the number of steps of each stage in order."""
    import statistics

    if len(times) != sum(per_stage) or not times:
        return {"n": len(times), "error": f"{len(times)} step ends for stages of {per_stage} steps"}
    intervals, i = [], 0
    for n in per_stage:
        intervals += [b - a for a, b in zip(times[i : i + n - 1], times[i + 1 : i + n], strict=True)]
        i += n
    median = statistics.median(intervals) if intervals else None
    return {
        "n": len(times),
        "median_s": median,
        "total_s": median * len(times) if median is not None else None,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    mode = spec["mode"]
    if mode == "parity":
        return run_parity(spec)
    imports = preload(mode)
    with StepClock() as clock:
        result = run_sacpo(spec) if mode == "sacpo" else run_trl(spec)
    return {**result, **imports, "optimizer_steps": step_seconds(clock.times, result["steps"])}


if __name__ == "__main__":
    child_main(run)
