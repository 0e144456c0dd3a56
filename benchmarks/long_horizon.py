"""Controlled decoding vs best-of-n at equal compute on the toyworld's long-horizon family; writes a markdown table.

    python -m benchmarks.long_horizon                 # world, scorers, best-of-n, the CD grid, then the table
    python -m benchmarks.long_horizon --report-only   # the table from the runs already there

Every run is one `sacpo` command on a config of configs/ (printed as it starts, skipped when its output is
complete with the same command), so each row of the table can be reproduced by hand:

- the world: `ToyWorldConfig(family="long")` in runs/toy-long (plans of 8–14 steps, 48–128 tokens);
- CD-FUDGE prefix scorers of r* and g* (configs/cd_long_scorer.yaml);
- best-of-n by the gold reward r*, n ≤ 64, and constrained best-of-n by r* + λ·g* (configs/bon_long.yaml);
- plain sampling, best-of-K by the prefix scorer (one block of M = max_new_tokens), blockwise CD over (K, M),
  token-wise CD over β, and constrained CD V_r + λ·V_g (configs/cd_long_block.yaml, configs/cd_long_token.yaml);
- the trained SACPO models of the same task (`sacpo demo world.family=long out=runs/demo-long ablations=false`)
  and `sacpo report` of them with every run above included (runs/report-long; two figures copied to benchmarks/).

Compute per response: base-model tokens sampled, scorer calls (values computed; best-of-n: n), and tokens through
forward passes of the base model and the scorer. Paired differences are over prompts (the same 96 test prompts,
4 samples each, averaged per prompt first).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs"
OUT = ROOT / "benchmarks" / "LONG_HORIZON.md"
WORLD = RUNS / "toy-long"
DEMO = RUNS / "demo-long"
BLOCK, TOKEN = "configs/cd_long_block.yaml", "configs/cd_long_token.yaml"
SAFETY = "safety_scorer=runs/cd-long/scorer-safety"

BON_KS = (2, 4, 8, 16, 32, 64)  # best-of-K by the prefix scorer
BLOCKS = ((2, 8), (4, 8), (8, 8), (4, 4), (4, 16), (16, 8))  # blockwise (K, M)
BETAS = (3.0, 1.0, 0.3)  # token-wise


def commands() -> list[tuple[str, list[str]]]:
    """(output dir relative to runs/, sacpo arguments) of every run, in order."""
    cd = "cd-long"
    out: list[tuple[str, list[str]]] = [
        (f"{cd}/scorer-fudge", ["cd-scorer", "configs/cd_long_scorer.yaml"]),
        (f"{cd}/scorer-safety", ["cd-scorer", "configs/cd_long_scorer.yaml", "reward=toyworld-safety",
                                 "n_rollouts=4096", "steps=3000", f"output_dir=runs/{cd}/scorer-safety"]),
        ("bon-long/oracle", ["bon", "configs/bon_long.yaml"]),
        (f"{cd}/base", ["cd", BLOCK, "K=1", "M=128", f"output_dir=runs/{cd}/base"]),
    ]  # fmt: skip
    out += [
        (f"{cd}/bon-k{k}", ["cd", BLOCK, f"K={k}", "M=128", f"output_dir=runs/{cd}/bon-k{k}"]) for k in BON_KS
    ]
    out += [
        (f"{cd}/block-k{k}-m{m}", ["cd", BLOCK, f"K={k}", f"M={m}", f"output_dir=runs/{cd}/block-k{k}-m{m}"])
        for k, m in BLOCKS
    ]
    out += [
        (f"{cd}/token-b{b:g}", ["cd", TOKEN, f"beta={b}", f"output_dir=runs/{cd}/token-b{b:g}"])
        for b in BETAS
    ]
    for lam in (0.5, 2.0):
        out.append((f"{cd}/block-k4-m8-lam{lam:g}",
                    ["cd", BLOCK, SAFETY, f"lam={lam}", f"output_dir=runs/{cd}/block-k4-m8-lam{lam:g}"]))  # fmt: skip
        out.append((f"{cd}/token-b1-lam{lam:g}",
                    ["cd", TOKEN, SAFETY, f"lam={lam}", f"output_dir=runs/{cd}/token-b1-lam{lam:g}"]))  # fmt: skip
    return out


def build_world() -> None:
    from sacpo.worlds.toyworld import ToyWorldConfig, build_world

    build_world(WORLD, ToyWorldConfig(family="long"))


def demo(threads: int) -> None:
    """The trained SACPO models of the same task: `sacpo demo world.family=long` (its world is a copy of
    runs/toy-long: the same config and seed build the same world, so it is not built twice)."""
    import os

    if (DEMO / "eval" / "results.json").exists():
        return
    if not (DEMO / "world" / "DONE").exists():
        shutil.copytree(WORLD, DEMO / "world", dirs_exist_ok=True)
    args = ["demo", "world.family=long", f"out={DEMO.relative_to(ROOT)}", "ablations=false"]
    print(f"$ sacpo {' '.join(args)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    subprocess.run([sys.executable, "-m", "sacpo.cli", *args], check=True, cwd=ROOT, env=env)


def combined_report() -> None:
    """`sacpo report` of the demo's models with best-of-n and the CD runs of one curve per family included (blocks
    of M = 8 over K, token-wise over β; the M sweep and the constrained CD runs are in the table only: a report
    curve joins a family's rows in order of K or β); its gold-reward-vs-KL and win-rate-vs-KL figures are copied
    next to the table."""

    def on_a_curve(rel: str) -> bool:
        name = rel.rsplit("/", 1)[1]
        return "lam" not in name and (not name.startswith("block-") or name.endswith("-m8"))

    runs = [str(RUNS / "bon-long" / "oracle")] + [
        str(RUNS / rel)
        for rel, args in commands()
        if args[0] == "cd" and on_a_curve(rel) and (RUNS / rel / "results.json").exists()
    ]
    out = RUNS / "report-long"
    args = ["report", str(DEMO / "eval"), "--include", *runs, "--out", str(out)]
    subprocess.run([sys.executable, "-m", "sacpo.cli", *args], check=True, cwd=ROOT)
    for name in ("gold_vs_kl.png", "helpful_vs_kl.png"):
        shutil.copyfile(out / name, ROOT / "benchmarks" / f"long_horizon_{name}")


def run_all(threads: int) -> dict[str, float]:
    """Run every missing command; returns seconds per run (this invocation)."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    seconds: dict[str, float] = {}
    for rel, args in commands():
        out = RUNS / rel
        stamp = out / "long_horizon_command.json"
        done = (out / "summary.json").exists() or (out / "prefix_scorer.json").exists()
        if done and stamp.exists() and json.loads(stamp.read_text()) == args:
            continue
        print(f"$ sacpo {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sacpo.cli", *args], check=True, cwd=ROOT, env=env)
        seconds[rel] = time.perf_counter() - t0
        stamp.write_text(json.dumps(args))
        (out / "long_horizon_seconds.txt").write_text(f"{seconds[rel]:.1f}\n")
    return seconds


# ------------------------------------------------------------------------------------------------ the table
def _per_prompt(path: Path, field: str = "gold_reward") -> dict[int, float]:
    """Mean of `field` per prompt_index over a samples.jsonl."""
    acc: dict[int, list[float]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        acc.setdefault(int(r["prompt_index"]), []).append(float(r[field]))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    """Mean ± standard error over prompts of a − b (prompts present in both)."""
    d = [a[k] - b[k] for k in sorted(a.keys() & b.keys())]
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else math.nan
    return m, se


def _seconds(d: Path) -> str:
    f = d / "long_horizon_seconds.txt"
    return f"{float(f.read_text()):.0f}" if f.exists() else "–"


def cd_row(rel: str) -> dict[str, Any] | None:
    d = RUNS / rel
    if not (d / "summary.json").exists():
        return None
    s = json.loads((d / "summary.json").read_text())
    rows = s["n_rows"]
    c = s["cost"]
    kl_bound = s.get("kl_bound") or {}
    label = (
        f"token-wise β={s['beta']:g}" if s["mode"] == "token"
        else "plain sampling" if s["K"] == 1
        else f"best-of-{s['K']} by V" if s["M"] >= 128
        else f"blockwise K={s['K']}, M={s['M']}"
    )  # fmt: skip
    if s.get("lam"):
        label += f", V_r + {s['lam']:g}·V_g"
    kind = s["kl"]["kind"].split(":")[0]
    return {
        "label": label,
        "reward": (s["gold_reward"]["mean"], s["gold_reward"]["stderr"]),
        "p_safe": s["safe_fraction"],
        "win": s.get("baseline", {}).get("gold_win_rate"),
        "kl": (s["kl"]["mean"], s["kl"]["stderr"], kind),
        "kl_bound": kl_bound.get("mean"),
        "sampled": c["base_sampled_tokens"] / rows,
        "calls": c["scorer_calls"] / rows,
        "forward": (c["base_forward_tokens"] + c["scorer_forward_tokens"]) / rows,
        "tokens": s["mean_response_tokens"],
        "seconds": _seconds(d),
        "samples": d / "samples.jsonl",
    }


def bon_rows(rel: str = "bon-long/oracle") -> list[dict[str, Any]]:
    d = RUNS / rel
    if not (d / "summary.json").exists():
        return []
    s = json.loads((d / "summary.json").read_text())
    out = []
    for st in s["bon"]:
        cost = st.get("cost", {})
        out.append({
            "label": f"best-of-{st['n']} by r* (oracle)",
            "reward": (st["gold_reward"]["mean"], st["gold_reward"]["se"]),
            "p_safe": st["gold_p_safe"],
            "win": st["gold_win_rate"]["mean"],
            "kl": (st["kl"]["estimate"], st["kl"]["estimate_se"], "ε / level estimate"),
            "kl_bound": st["kl"]["bound"],
            "sampled": cost.get("base_sampled_tokens", math.nan),
            "calls": float(st["n"]),
            "forward": math.nan,  # the base model's forward tokens ≈ those sampled (KV cache); r* is no model
            "tokens": st["mean_response_tokens"],
            "seconds": "–",
            "samples": d / "samples" / f"bon-n{st['n']}" / "samples.jsonl",
        })  # fmt: skip
    return out


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | E[r\\*] ± se | P(safe) | win rate vs SFT | KL (kind) | KL bound | base tokens sampled / "
            "response | scorer calls / response | forward tokens / response | response tokens | seconds |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        kl, se, kind = r["kl"]
        kl_text = f"{kl:.2f}" + (f" ± {se:.2f}" if not math.isnan(se) else "") + f" ({kind})"
        lines.append(
            f"| {r['label']} | {r['reward'][0]:.2f} ± {r['reward'][1]:.2f} | {_f(r['p_safe'])} | {_f(r['win'])} | "
            f"{kl_text} | {_f(r['kl_bound'])} | {_f(r['sampled'], 0)} | {_f(r['calls'], 0)} | "
            f"{_f(r['forward'], 0)} | {_f(r['tokens'], 1)} | {r['seconds']} |"
        )
    return "\n".join(lines)


def comparisons(cd: dict[str, dict[str, Any]], bon: list[dict[str, Any]]) -> str:
    """Blockwise K vs best-of-K by the same scorer (paired over prompts), and the smallest best-of-N (by V and by
    r*) whose E[r*] reaches each blockwise run's."""
    lines = ["| blockwise run | E[r\\*] | vs best-of-K by V (paired Δ ± se) | smallest best-of-N by V reaching it | "
             "smallest best-of-N by r\\* reaching it |", "|---|---|---|---|---|"]  # fmt: skip
    by_v = sorted((int(k.split("bon-k")[1]), r) for k, r in cd.items() if "/bon-k" in k and r is not None)
    by_r = [(int(r["label"].split("-of-")[1].split()[0]), r) for r in bon]
    for key, r in cd.items():
        if r is None or "/block-" not in key or "lam" in key:
            continue
        k = int(key.split("block-k")[1].split("-")[0])
        same = cd.get(f"cd-long/bon-k{k}")
        delta = "–"
        if same is not None:
            m, se = paired(_per_prompt(r["samples"]), _per_prompt(same["samples"]))
            delta = f"{m:+.2f} ± {se:.2f}"

        def reach(cands: list[tuple[int, dict[str, Any]]], target: float) -> str:
            hit = [n for n, c in cands if c["reward"][0] >= target]
            top = max((n for n, _ in cands), default=0)
            return f"N = {hit[0]}" if hit else f"none up to N = {top}"

        lines.append(f"| {r['label']} | {r['reward'][0]:.2f} | {delta} | {reach(by_v, r['reward'][0])} | "
                     f"{reach(by_r, r['reward'][0])} |")  # fmt: skip
    return "\n".join(lines)


def report() -> str:
    cd = {rel: cd_row(rel) for rel, args in commands() if args[0] == "cd"}
    bon = bon_rows()
    world = json.loads((WORLD / "world.json").read_text()) if (WORLD / "world.json").exists() else {}
    stats = world.get("stats", {})
    parts = [
        "# Controlled decoding vs best-of-n on the long-horizon task (toyworld plans)",
        "",
        f"Generated by `python -m benchmarks.long_horizon` on {time.strftime('%Y-%m-%d')}. World: "
        f"runs/toy-long (SFT mean r\\* {_f(stats.get('sft_mean_gold_reward'))}, P(safe) "
        f"{_f(stats.get('sft_p_safe'))} on its preference samples). 96 test prompts × 4 samples.",
        "",
        table([r for r in cd.values() if r is not None] + bon),
        "",
        comparisons(cd, bon),
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report-only", action="store_true", help="only write the table from existing runs")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads of each run")
    ap.add_argument("--out", type=Path, default=OUT, help="markdown table written here")
    args = ap.parse_args(argv)
    if not args.report_only:
        build_world()
        run_all(args.threads)
        demo(args.threads)
    if (DEMO / "eval" / "results.json").exists():
        combined_report()
    args.out.write_text(report())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
