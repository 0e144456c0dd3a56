"""Synthetic ModelMetrics for the plot and report tests (a SACPO-shaped set of results)."""

from sacpo.evaluate.metrics import ModelMetrics

NAN = float("nan")


def metrics(name, family, param, helpful, harmless, kl=1.0, ci=0.05, **kw) -> ModelMetrics:
    fields = dict(
        name=name,
        family=family,
        param=param,
        helpful_win=(helpful, helpful - ci, helpful + ci),
        harmless_win=(harmless, harmless - ci, harmless + ci),
        mean_reward=helpful * 2,
        mean_safety=harmless - 0.5,
        p_safe=harmless,
        constraint_ok=harmless >= 0.5,
        kl=kl,
        kl_se=0.1,
        n=16,
        n_prompts=8,
        reward_se=0.05,
        safety_se=0.05,
    )
    fields.update(kw)
    return ModelMetrics(**fields)


def paper_results_list() -> list[ModelMetrics]:
    """Numbers with the SACPO paper's shape: every check_findings claim holds."""
    return [
        metrics("sft", "sft", None, 0.5, 0.5, kl=0.0, ci=0.0, kl_se=0.0),
        metrics("helpful", "dpo-helpful", 0.1, 0.70, 0.35, kl=3.0),
        metrics("safe-lam0.5", "sacpo", 0.2, 0.68, 0.50, kl=4.0),
        metrics("safe-lam1", "sacpo", 0.1, 0.64, 0.62, kl=5.0),
        metrics("safe-lam2", "sacpo", 0.05, 0.60, 0.75, kl=6.0),
        metrics("psacpo-q0.25", "p-sacpo", 0.25, 0.69, 0.45, kl=3.2),
        metrics("psacpo-q0.5", "p-sacpo", 0.5, 0.66, 0.55, kl=3.8),
        metrics("psacpo-q0.75", "p-sacpo", 0.75, 0.63, 0.66, kl=4.6),
        metrics("naive-q0.5", "naive-merge", 0.5, 0.657, 0.52, kl=3.5),
        metrics("safe_kto", "kto", 0.05, 0.58, 0.70, kl=5.5, mean_rm=0.2, mean_cm=-0.4),
    ]
