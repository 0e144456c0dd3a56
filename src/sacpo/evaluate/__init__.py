"""Evaluation of aligned models against the SFT policy: samples, win rates, KL, plots and the report.

`generate` (samples and log-probs), `metrics` (win rates, CIs, KL), `run` (evaluate_models over model specs),
`optimum` (the π* estimator), `plots`, `report` (markdown/HTML and findings), `theory` (exact tabular checks).
Scorers and gold oracles come from `sacpo.scoring`; the `sacpo eval` job itself is a recipe.
"""
