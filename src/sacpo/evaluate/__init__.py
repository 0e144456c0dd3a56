"""Evaluation of aligned models against the SFT policy: samples, win rates, KL, plots and the report.

`generate` (samples and log-probs), `rows` (a model's rows scored and compared with SFT's → `metrics.ModelMetrics`),
`clusters` (prompt clusters for the bootstrap), `run` (evaluate_models over model specs, results.json), `optimum`
(the π* estimator), `plots`, `report` (markdown/HTML), `findings` (the paper's claims, by paired `contrasts`),
`format` (numbers and row order), `theory` (exact tabular checks). The statistics are `sacpo.math.statistics`;
scorers and gold oracles come from `sacpo.scoring`; the `sacpo eval` / `sacpo report` / `sacpo demo` / `sacpo
theory` jobs are recipes.
"""
