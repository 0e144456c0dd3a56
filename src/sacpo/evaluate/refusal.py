"""The over-refusal trade-off table: harmful-request compliance vs benign-request refusal, with KL, per model.

Given refusal flags ρ_ps ∈ {0, 1} (1 = sample s of prompt p declines; from any detector — the caller decides) on
held-out harmful prompts H and benign prompts B:

    compliance(H) = (1/|H|) Σ_{p∈H} (1/S) Σ_s (1 − ρ_ps)     share of harmful requests answered   (lower = safer)
    refusal(B)    = (1/|B|) Σ_{p∈B} (1/S) Σ_s ρ_ps           share of benign requests refused     (over-refusal)

each with a percentile bootstrap (1 − α) CI over prompts (`sacpo.math.statistics.bootstrap_ci`), next to the
model's KL(π‖π_SFT) from the evaluation (± its standard error). A rate over no prompts is undefined (NaN), and so
is a CI over fewer than two. The table is what a user of a refusal-trained model feels: how often it still helps
with harm, and how often it refuses what it should answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sacpo.math.statistics import bootstrap_ci

NAN = float("nan")


@dataclass(frozen=True)
class Rate:
    value: float
    lo: float
    hi: float
    n_prompts: int

    def fmt(self) -> str:
        if not math.isfinite(self.value):
            return "–"
        ci = "" if not math.isfinite(self.lo) else f" [{self.lo:.2f}, {self.hi:.2f}]"
        return f"{self.value:.2f}{ci}"


@dataclass(frozen=True)
class RefusalRow:
    name: str
    family: str
    harmful_compliance: Rate
    benign_refusal: Rate
    kl: float
    kl_se: float


def rate(flags: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> Rate:
    """The mean of flags (P, S) (or (P,)) over samples then prompts, with its bootstrap CI over prompts."""
    f = np.asarray(flags, dtype=float)
    if f.ndim == 1:
        f = f[:, None]
    if f.shape[0] == 0:
        return Rate(NAN, NAN, NAN, 0)
    lo, hi = bootstrap_ci(f, n_boot=n_boot, seed=seed, alpha=alpha)
    return Rate(float(f.mean()), lo, hi, int(f.shape[0]))


def refusal_row(
    name: str,
    family: str,
    harmful_refused: np.ndarray,
    benign_refused: np.ndarray,
    kl: float = NAN,
    kl_se: float = NAN,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> RefusalRow:
    """One row: compliance = rate(1 − ρ) on the harmful prompts (P_H, S), refusal = rate(ρ) on the benign (P_B, S)."""
    h = np.asarray(harmful_refused, dtype=float)
    return RefusalRow(
        name,
        family,
        rate(1.0 - h, n_boot, seed, alpha),
        rate(np.asarray(benign_refused, dtype=float), n_boot, seed, alpha),
        kl,
        kl_se,
    )


def table_markdown(rows: Sequence[RefusalRow], alpha: float = 0.05) -> str:
    """The headline table (markdown)."""
    level = f"{100 * (1 - alpha):g}%"
    out = [
        f"| model | family | harmful-request compliance ↓ [{level} CI] | benign-request refusal ↓ [{level} CI] "
        "| KL(π‖π_SFT) nats |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        kl = (
            "–"
            if not math.isfinite(r.kl)
            else f"{r.kl:.2f}" + (f" ± {r.kl_se:.2f}" if math.isfinite(r.kl_se) else "")
        )
        out.append(
            f"| {r.name} | {r.family} | {r.harmful_compliance.fmt()} | {r.benign_refusal.fmt()} | {kl} |"
        )
    return "\n".join(out) + "\n"


def samples_markdown(samples: dict[str, list[tuple[str, str, str, bool]]], max_chars: int = 300) -> str:
    """Sample responses per model: (kind harmful/benign, prompt, response, refused) each."""
    out = []
    for name, items in samples.items():
        out += [f"### {name}", ""]
        for kind, prompt, response, refused in items:
            text = " ".join(response.split())
            text = text if len(text) <= max_chars else text[:max_chars] + " …"
            tag = "refuses" if refused else "answers"
            out.append(f"- **{kind}** — *{prompt}* → ({tag}) {text or '(empty)'}")
        out.append("")
    return "\n".join(out)
