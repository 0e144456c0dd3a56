"""`sacpo` command line: train one stage, run a SACPO pipeline, merge models, build a tiny model, run the demo.

    sacpo train CONFIG [key=value ...] [--resume]
    sacpo pipeline CONFIG [key=value ...] [--force]
    sacpo merge CONFIG [key=value ...]
    sacpo reward CONFIG [key=value ...]
    sacpo eval CONFIG [key=value ...]
    sacpo report DIR [--include DIR ...] [--out DIR]
    sacpo label CONFIG [key=value ...]        sample pairs from a policy, label them with judges (PKU schema)
    sacpo bon CONFIG [key=value ...]          best-of-n, optionally constrained (λ calibrated)
    sacpo cd-scorer CONFIG [key=value ...]    train a prefix value model (CD-FUDGE / CD-Q)
    sacpo cd CONFIG [key=value ...]           controlled decoding: token-wise or blockwise
    sacpo theory [--out DIR]                  exact checks on finite spaces (SACPO = constrained optimum, BoN)
    sacpo import SRC OUT [--dtype auto|bf16|fp16|fp32]   a GGUF file or HF model dir → HF safetensors dir
    sacpo tiny-model OUT_DIR [--seed N]
    sacpo demo [--out DIR] [--quick]
    sacpo demo-real [CONFIG] [key=value ...]  SmolLM2-135M, refusal judges: compliance vs over-refusal

Every CONFIG (optional: overrides alone may give every field) is YAML for a frozen dataclass; `key=value` overrides
(YAML values, dotted keys) apply on top; `--help-config` lists every field with its help text.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from sacpo.config import (
    ConfigError,
    deep_update,
    describe,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)

# The config class of every command that takes a CONFIG file ("module:Class", imported when the command runs).
CONFIG_CLASSES = {
    "train": "sacpo.recipes.train:CommandTrainConfig",
    "pipeline": "sacpo.recipes.pipeline:PipelineConfig",
    "merge": "sacpo.recipes.merge:MergeConfig",
    "reward": "sacpo.train.reward_model:RewardConfig",
    "eval": "sacpo.recipes.eval:EvalConfig",
    "label": "sacpo.recipes.label:LabelConfig",
    "bon": "sacpo.infer.bon_config:BonConfig",
    "cd": "sacpo.infer.cd_config:CDConfig",
    "cd-scorer": "sacpo.train.prefix_scorer:TrainScorerConfig",
    "demo": "sacpo.recipes.demo_config:DemoConfig",
    "demo-real": "sacpo.recipes.demo_real:DemoRealConfig",
}


def config_class(command: str) -> type:
    """The config dataclass that `sacpo COMMAND CONFIG` loads."""
    module, name = CONFIG_CLASSES[command].split(":")
    return getattr(importlib.import_module(module), name)


def split_config_args(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """(CONFIG path or None, overrides): the first positional is a key=value override, not a file name, when it
    has a '=' and no such file exists (`sacpo train policy=… data.source=… output_dir=…` needs no YAML)."""
    if config is not None and "=" in config and not Path(config).is_file():
        return None, [config, *overrides]
    return config, list(overrides)


def _config_command(args: argparse.Namespace):
    cls = config_class(args.command)
    if args.help_config:
        print(f"{cls.__name__} fields:\n{describe(cls)}")
        raise SystemExit(0)
    path, overrides = split_config_args(args.config, args.overrides)
    try:
        return load_config(cls, path, overrides)
    except ConfigError as e:
        if path is not None or "missing required key" not in str(e):
            raise
        raise ConfigError(
            f"{e}\n(no CONFIG file given: set the missing fields as key=value overrides, or give a YAML config; "
            f"`sacpo {args.command} --help-config` lists every field)"
        ) from None


def cmd_train(args: argparse.Namespace) -> None:
    from sacpo.train.loop import train

    cfg = _config_command(args)
    result = train(cfg, resume=args.resume, show_progress=not args.quiet)
    print(
        json.dumps(
            {
                "model": str(result.model_dir),
                "steps": result.steps,
                "reference_pass": result.reference_pass,
                "final": result.final_metrics,
            },
            indent=2,
        )
    )


def cmd_pipeline(args: argparse.Namespace) -> None:
    from sacpo.recipes.pipeline import run_pipeline

    cfg = _config_command(args)
    result = run_pipeline(cfg, show_progress=not args.quiet, force=args.force)
    _print_pipeline(result)


def _print_pipeline(result: dict) -> None:
    print(
        f"{'stage':<28} {'loss':<5} {'beta':>8} {'ref pass':>9} {'loss(end)':>10} {'acc':>6} "
        f"{'KL(π‖π_ref) ± se':>17}"
    )
    for r in result["stages"]:
        final = r["summary"].get("final", {})
        print(
            f"{r['name']:<28} {r['loss']:<5} {r['beta']:>8.4g} {r['summary']['reference_pass']:>9} "
            f"{final.get('loss', float('nan')):>10.4f} {final.get('rewards/accuracy', float('nan')):>6.2f} "
            f"{final.get('eval/kl', float('nan')):>8.3f} ± {final.get('eval/kl_stderr', float('nan')):<6.3f}"
        )
    for m in result["merges"]:
        kind = " (adapter)" if m.get("format") == "adapter" else ""
        print(f"merge {m['name']}: (1−{m['q']:g})·{m['a']} + {m['q']:g}·{m['b']} → {m['model']}{kind}")
    outputs = result.get("outputs") or {}
    if outputs.get("adapter_only"):
        print(f"every stage and merge wrote only a LoRA adapter, on {outputs['shared_base']}")
    c = result["reference_passes"]
    print(
        f"reference passes: {c['computed']} computed, {c['cached']} from cache, "
        f"{c['skipped_stages']} finished stages skipped"
    )


def cmd_merge(args: argparse.Namespace) -> None:
    from sacpo.recipes.merge import run_merge

    for r in run_merge(_config_command(args)):
        print(f"q={r['q']:g}: {r['model']}" + (" (adapter)" if r.get("output") == "adapter" else ""))


def cmd_import(args: argparse.Namespace) -> None:
    from sacpo.models.convert import import_model
    from sacpo.models.dtypes import checkpoint_dtype, dtype_name

    out = import_model(args.src, args.out, dtype=args.dtype)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{out} ({dtype_name(checkpoint_dtype(out))}, {size / 1e6:.1f} MB of safetensors)")


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from sacpo.models.tiny import build_tiny_gpt2

    print(build_tiny_gpt2(args.out_dir, seed=args.seed))


def cmd_reward(args: argparse.Namespace) -> None:
    from sacpo.train.reward_model import train_reward_model

    r = train_reward_model(_config_command(args), show_progress=not args.quiet)
    summary = {k: v for k, v in r.metrics.items() if k not in ("members", "history")}
    print(json.dumps({"output_dir": str(r.output_dir), "kind": r.kind, **summary}, indent=2, default=str))


def cmd_eval(args: argparse.Namespace) -> None:
    from sacpo.recipes.eval import run_eval

    cfg = _config_command(args)
    run_eval(cfg, show_progress=not args.quiet)
    print(f"report: {Path(cfg.output_dir) / 'report.md'}")


def cmd_label(args: argparse.Namespace) -> None:
    from sacpo.recipes.label import run_label

    path = run_label(_config_command(args), show_progress=not args.quiet)
    print(f"preferences: {path}\nreport: {path.with_name('labels.md')}")


def cmd_report(args: argparse.Namespace) -> None:
    from sacpo.recipes.eval import report_from_dir

    paths = report_from_dir(args.dir, args.title, include=args.include, dest=args.out)
    print("\n".join(str(p) for p in paths.values()))


def cmd_bon(args: argparse.Namespace) -> None:
    from sacpo.recipes.bon import run_bon
    from sacpo.recipes.bon_report import format_summary

    cfg = _config_command(args)
    summary = run_bon(cfg, show_progress=not args.quiet)
    print(format_summary(summary))
    print(f"outputs: {cfg.output_dir} (summary.json, results.json for `sacpo report`, samples/)")


def cmd_cd(args: argparse.Namespace) -> None:
    from sacpo.recipes.cd import run_cd
    from sacpo.recipes.cd_report import format_summary

    cfg = _config_command(args)
    summary = run_cd(cfg, show_progress=not args.quiet)
    print(format_summary(summary))
    print(f"outputs: {cfg.output_dir} (samples.jsonl, summary.json, results.json when an oracle is set)")


def cmd_cd_scorer(args: argparse.Namespace) -> None:
    from sacpo.train.prefix_scorer import train_prefix_scorer

    cfg = _config_command(args)
    r = train_prefix_scorer(cfg, show_progress=not args.quiet)
    m = r.metrics
    std = m.get("reward_std")
    before, after = m["heldout_before"], m["heldout_after"]
    print(
        f"prefix scorer ({m['method']}, reward {m['reward']!r}) → {r.output_dir}\n"
        f"  {m['n_rollouts']} rollouts ({m['n_train']} train, {m['n_heldout']} held out), reward mean "
        f"{m['reward_mean']:.3f}, var {'–' if std is None else f'{std**2:.4f}'} (MSE of the best constant)\n"
        f"  held-out MSE to the return at every prefix: {_opt(before['mse_to_return'])} → "
        f"{_opt(after['mse_to_return'])}; at the full response: {_opt(before['terminal_mse'])} → "
        f"{_opt(after['terminal_mse'])}  ({m['steps']} steps, {m['seconds']:.0f} s)"
    )


def _opt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def cmd_theory(args: argparse.Namespace) -> None:
    from sacpo.recipes.theory import run_theory

    res = run_theory(args.out, show_progress=not args.quiet, seed=args.seed)
    print(
        f"SACPO two-step DPO vs the constrained optimum, {len(res['sacpo'])} checks: max total variation "
        f"{res['max_tv']:.2e} ({'✓' if res['max_tv'] <= 1e-3 else '✗'} ≤ 1e-3)"
    )
    print("report: " + ", ".join(res["files"][k] for k in sorted(res["files"])))


def cmd_demo(args: argparse.Namespace) -> None:
    from sacpo.recipes.demo import run_demo
    from sacpo.recipes.demo_config import DemoConfig, quick

    if args.help_config:
        print(f"DemoConfig fields:\n{describe(DemoConfig)}")
        return
    overrides = parse_overrides(args.overrides)
    # --quick is a preset: the key=value overrides apply on top of it
    base = to_dict(quick(DemoConfig(out=args.out))) if args.quick else {"out": args.out}
    cfg = from_dict(DemoConfig, deep_update(base, overrides))
    summary = run_demo(cfg, show_progress=not args.quiet)
    for f in summary["findings"]:
        print(f"{'✓' if f['holds'] else '✗'} {f['claim']}\n    {f['evidence']}")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["times"].items()))
    print(f"report: {summary['report']['report.md']} (and report.html)")


def cmd_demo_real(args: argparse.Namespace) -> None:
    from sacpo.recipes.demo_real import run_demo_real

    summary = run_demo_real(_config_command(args), show_progress=not args.quiet)
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["times"].items()))
    print(f"report: {summary['report']} (full evaluation: {summary['eval_report']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sacpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument(
            "config", nargs="?", help="YAML config file (optional: overrides may give every field)"
        )
        p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys, YAML values)")
        p.add_argument("--help-config", action="store_true", help="list every config field and exit")
        return p

    p = config_parser("train", "train one stage (DPO / IPO / KTO)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.set_defaults(func=cmd_train)
    p = config_parser("pipeline", "run a SACPO pipeline: stages, λ sweeps, merges")
    p.add_argument("--force", action="store_true", help="retrain finished stages")
    p.set_defaults(func=cmd_pipeline)
    config_parser("merge", "P-SACPO: θ = (1−q)·θ_a + q·θ_b for several q").set_defaults(func=cmd_merge)
    config_parser("reward", "train a Bradley–Terry reward or cost model (ensembles)").set_defaults(
        func=cmd_reward
    )
    config_parser("eval", "evaluate models: win rates vs SFT, gold/learned scores, KL, report").set_defaults(
        func=cmd_eval
    )
    config_parser("label", "sample response pairs from a policy and label them with judges").set_defaults(
        func=cmd_label
    )
    p = sub.add_parser(
        "report", help="rebuild report.md/.html and plots from an eval directory's results.json"
    )
    p.add_argument("dir")
    p.add_argument("--title", default="SACPO evaluation")
    p.add_argument(
        "--include",
        nargs="+",
        default=None,
        metavar="DIR",
        help="more results.json directories (`sacpo bon` / `sacpo cd` outputs) on the same axes; default: "
        "the eval config's include list",
    )
    p.add_argument("--out", default=None, help="write the report here instead of DIR")
    p.set_defaults(func=cmd_report)
    config_parser(
        "bon", "best-of-n with KL bound / ε-estimator; constrained best-of-n (λ calibrated)"
    ).set_defaults(func=cmd_bon)
    config_parser("cd-scorer", "train a prefix value model V(x, y^t) for controlled decoding").set_defaults(
        func=cmd_cd_scorer
    )
    config_parser("cd", "controlled decoding with a prefix scorer: token-wise or blockwise").set_defaults(
        func=cmd_cd
    )
    p = sub.add_parser(
        "theory", help="exact checks on finite output spaces (SACPO optimum, best-of-n curves)"
    )
    p.add_argument("--out", default="runs/theory", help="output directory (theory.md + PNG figures)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_theory)
    p = sub.add_parser(
        "import", help="a GGUF file or an HF model directory → an HF safetensors directory (with tokenizer)"
    )
    p.add_argument(
        "src", help="a .gguf file (de-quantised) or an HF model directory with safetensors weights"
    )
    p.add_argument("out", help="output model directory (written atomically)")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="dtype of the saved weights; auto = the source's own (float32 for a quantised GGUF)",
    )
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("tiny-model", help="build a tiny GPT-2 + byte tokenizer locally (no hub)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)
    config_parser("demo-real", "SACPO on SmolLM2-135M with refusal judges (make demo-real)").set_defaults(
        func=cmd_demo_real
    )
    p = sub.add_parser("demo", help="run the embedded default end to end")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="a small preset (about a minute), for tests")
    p.add_argument("overrides", nargs="*", help="DemoConfig key=value overrides (e.g. lams='[0.5,1]')")
    p.add_argument("--help-config", action="store_true", help="list every demo setting and exit")
    p.set_defaults(func=cmd_demo)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input (or a server it names): printed as one line, exit code 2 (no traceback)."""
    from sacpo.data.formats import DataError
    from sacpo.math.merging import MergeError
    from sacpo.models.load import ModelLoadError
    from sacpo.scoring.api_client import ApiError
    from sacpo.train.checkpoint import NonFiniteError

    return (ConfigError, DataError, MergeError, ModelLoadError, NonFiniteError, ApiError)


def _quiet_libraries() -> None:
    """sacpo shows its own progress; silence per-file progress bars of transformers/datasets when loaded, and the
    HTTP clients' per-request lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name in ("httpx", "httpx2", "openai"):  # one INFO line per HTTP request otherwise (judges, generator)
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    _quiet_libraries()
    import sacpo.recipes  # noqa: F401  (registers the embedded worlds' gold oracles and scorers in sacpo.scoring)

    try:
        args.func(args)
    except _user_errors() as e:
        print(f"sacpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
