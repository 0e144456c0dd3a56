"""Evaluation of aligned models against the SFT policy: samples, scorers, win rates, KL, plots and the report.

results = evaluate_models(specs, sft_dir, prompts, reward, safety, b, out_dir)
write_report(results, out_dir, title, notes)
"""

from sacpo.evaluate.config import EvalConfig, Oracle, register_oracle, report_from_dir, run_eval
from sacpo.evaluate.generate import Generation, SampleRow, generate_samples, read_samples
from sacpo.evaluate.judge import FunctionScorer, Scorer, run_scorer
from sacpo.evaluate.metrics import (
    ModelMetrics,
    bootstrap_ci,
    constraint_holds,
    kl_estimate,
    mean_and_stderr,
    spearman,
    win_rate,
)
from sacpo.evaluate.plots import make_plots, plot_gold_vs_kl, plot_helpful_vs_kl, plot_win_rates
from sacpo.evaluate.report import Finding, check_findings, write_report
from sacpo.evaluate.run import ModelSpec, evaluate_models, load_results, save_results, specs_from_pipeline

__all__ = [
    "EvalConfig",
    "Finding",
    "FunctionScorer",
    "Generation",
    "ModelMetrics",
    "ModelSpec",
    "Oracle",
    "SampleRow",
    "Scorer",
    "bootstrap_ci",
    "check_findings",
    "constraint_holds",
    "evaluate_models",
    "generate_samples",
    "kl_estimate",
    "load_results",
    "make_plots",
    "mean_and_stderr",
    "plot_gold_vs_kl",
    "plot_helpful_vs_kl",
    "plot_win_rates",
    "read_samples",
    "register_oracle",
    "report_from_dir",
    "run_eval",
    "run_scorer",
    "save_results",
    "spearman",
    "specs_from_pipeline",
    "win_rate",
    "write_report",
]
