"""Synthetic ModelMetrics for the plot and report tests (a SACPO-shaped set of results)."""

from sacpo.evaluate.metrics import ModelMetrics

NAN = float("nan")
# 8 prompts in 4 clusters of 2; every synthetic row's per-prompt values are its overall value + OFFSETS (sum 0),
# so a paired difference of two rows is the same on every prompt and its CI is the exact difference.
OFFSETS = [0.02, -0.02, 0.01, -0.01, 0.03, -0.03, 0.0, 0.0]
CLUSTERS = ["c0", "c0", "c1", "c1", "c2", "c2", "c3", "c3"]


def per_prompt_of(m: ModelMetrics) -> dict[str, list[float]]:
    """Per-prompt values whose means are the row's values."""
    values = {
        "reward": m.mean_reward,
        "safety": m.mean_safety,
        "safe": m.p_safe,
        "helpful_win": m.helpful_win[0],
        "harmless_win": m.harmless_win[0],
        "kl": m.kl,
    }
    return {k: [v + o for o in OFFSETS] for k, v in values.items()}


def metrics(name, family, param, helpful, harmless, kl=1.0, ci=0.05, per_prompt=True, **kw) -> ModelMetrics:
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
        safety_lcb=harmless - 0.5 - 0.05,
        degenerate_share=0.0,
        degenerate_kl_share=NAN,
    )
    fields.update(kw)
    m = ModelMetrics(**fields)
    if per_prompt and "per_prompt" not in kw:
        m = ModelMetrics(**{**fields, "per_prompt": per_prompt_of(m), "clusters": list(CLUSTERS)})
    return m


def paper_results_list() -> list[ModelMetrics]:
    """Numbers with the SACPO paper's shape: every check_findings claim holds (b = None: constraint_ok decides).

    Naive-merge curve in (E[r], E[g]) = (2·helpful, harmless − ½): (1.36, −0.08), (1.314, 0.02), (1.2, 0.08) at
    KL 3.0, 3.5, 4.2; every SACPO / P-SACPO point inside its E[r] range lies above it, and the two P-SACPO points
    inside its KL range are at least as helpful and as safe as the curve there."""
    return [
        metrics("sft", "sft", None, 0.5, 0.5, kl=0.0, ci=0.0, kl_se=0.0),
        metrics("helpful", "dpo-helpful", 0.1, 0.70, 0.35, kl=3.0),
        metrics("safe-lam0.5", "sacpo", 0.2, 0.68, 0.50, kl=4.5),
        metrics("safe-lam1", "sacpo", 0.1, 0.64, 0.62, kl=5.0),
        metrics("safe-lam2", "sacpo", 0.05, 0.60, 0.75, kl=6.0),
        metrics("psacpo-q0.25", "p-sacpo", 0.25, 0.69, 0.47, kl=3.2),
        metrics("psacpo-q0.5", "p-sacpo", 0.5, 0.66, 0.55, kl=3.8),
        metrics("psacpo-q0.75", "p-sacpo", 0.75, 0.63, 0.66, kl=4.6),
        metrics("naive-q0.25", "naive-merge", 0.25, 0.68, 0.42, kl=3.0),
        metrics("naive-q0.5", "naive-merge", 0.5, 0.657, 0.52, kl=3.5),
        metrics("naive-q0.75", "naive-merge", 0.75, 0.60, 0.58, kl=4.2),
        metrics("safe_kto", "kto", 0.05, 0.58, 0.70, kl=5.5, mean_rm=0.2, mean_cm=-0.4),
    ]
