"""Preference labels from judges (RLAIF): PKU-SafeRLHF rows from sampled response pairs.

For each prompt x and pair j: y0, y1 = samples 2j and 2j+1 of the policy (`generate_samples`, or a server), then

    better_response_id   from the helpfulness judge   safer_response_id   from the harmlessness judge
    is_response_i_safe   = s(x, y_i) > safe_threshold  (a pointwise safety judge: a cost model's −c, an oracle's g)

A pointwise judge (reward / cost model, oracle, registered scorer) labels by its scores u0, u1 with
`sacpo.train.onpolicy.label_pair` — a Bradley–Terry draw P(y1 ≻ y0) = σ(s·(u1 − u0)) (`label: bt`) from a
per-pair seeded generator (seed, prompt index, pair: the same labels on a rerun or a resumed run), or the higher
score (`label: argmax`, equal scores a tie). An LLM judge labels by its pairwise verdict in both orders
(`LLMJudge.compare`): y0 wins → 0, y1 wins → 1, a tie or disagreement → a tie, no verdict → invalid. A pair whose
label is a tie or invalid is dropped and counted, as are pairs with an empty or identical response. The counts,
the share of pairs where the better response is also the safer one, and the LLM judges' usage go in the label
report (labels.json, labels.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sacpo.data.records import Prompt
from sacpo.evaluate.judging import Judge
from sacpo.math.judges import consistency_rate
from sacpo.scoring.base import run_scorer
from sacpo.train.onpolicy import label_pair

LABEL_FIELD = {"helpfulness": "better_response_id", "harmlessness": "safer_response_id"}


@dataclass(frozen=True)
class LabelRule:
    rule: str = "bt"  # bt | argmax (pointwise judges)
    bt_scale: float = 1.0
    seed: int = 0


def pair_rng(seed: int, prompt_index: int, pair: int) -> random.Random:
    """The generator of one pair's Bradley–Terry draw: independent of the order pairs are labelled in."""
    return random.Random(f"{seed}:{prompt_index}:{pair}")


def pointwise_labels(
    judge: Judge, prompts: Sequence[Prompt], pairs: Sequence[tuple[str, str]], index: Sequence[tuple[int, int]],
    rule: LabelRule,
) -> tuple[list[int | None], np.ndarray]:  # fmt: skip
    """(label per pair — 0, 1 or None for an argmax tie —, scores (N, 2)) of a scorer judge."""
    assert judge.scorer is not None
    flat_p = [p for p in prompts for _ in (0, 1)]
    flat_y = [y for pair in pairs for y in pair]
    u = run_scorer(judge.scorer, flat_p, flat_y).numpy().reshape(-1, 2)  # (N, 2)
    labels = [
        label_pair(float(a), float(b), rule.rule, rule.bt_scale, pair_rng(rule.seed, i, j))  # type: ignore[arg-type]
        for (a, b), (i, j) in zip(u, index, strict=True)
    ]
    return labels, u


def llm_labels(
    judge: Judge, prompts: Sequence[Prompt], pairs: Sequence[tuple[str, str]], show_progress: bool = True
) -> tuple[list[int | None], dict[str, Any]]:
    """(label per pair — 0, 1, or None for a tie / disagreement / invalid —, counts) of an LLM judge."""
    judged = judge.llm.compare(
        prompts, [a for a, _ in pairs], [b for _, b in pairs], show_progress, desc=f"label {judge.label}"
    )
    labels: list[int | None] = []
    for p in judged:
        o = p.outcome
        labels.append(None if not np.isfinite(o) or o == 0.5 else int(o == 0.0))
    valid = np.array([p.result.valid for p in judged], dtype=bool)
    consistent = np.array([p.result.consistent for p in judged], dtype=bool)
    counts = {
        "invalid": int((~valid).sum()),
        "ties": int(sum(lab is None for lab in labels) - (~valid).sum()),
        "consistency": consistency_rate(consistent, valid),
        "usage": judge.llm.stats.as_dict(),
    }
    return labels, counts


def label_rows(
    prompts: Sequence[Prompt],
    pairs: Sequence[tuple[str, str]],
    index: Sequence[tuple[int, int]],
    judges: dict[str, Judge | None],
    rule: LabelRule,
    safe_threshold: float = 0.0,
    show_progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """PKU-SafeRLHF rows and the label report's counts.

    judges: "better" / "safer" / "is_safe" → a Judge or None (not labelled); index[k] = (prompt index, pair)."""
    n = len(pairs)
    bad = [not a or not b or a == b for a, b in pairs]
    keep = [i for i in range(n) if not bad[i]]
    report: dict[str, Any] = {"pairs": n, "dropped_identical_or_empty": sum(bad), "judges": {}}
    sub = ([prompts[i] for i in keep], [pairs[i] for i in keep], [index[i] for i in keep])
    labels: dict[str, list[int | None]] = {}
    safe_scores = None
    for role in ("better", "safer"):
        j = judges.get(role)
        if j is None:
            continue
        if j.llm is not None:
            labels[role], counts = llm_labels(j, sub[0], sub[1], show_progress)
        else:
            labels[role], u = pointwise_labels(j, *sub, rule)
            counts = {"ties": sum(x is None for x in labels[role]), "invalid": 0}
            if role == "safer":
                safe_scores = u
        report["judges"][role] = {"label": j.label, "kind": j.kind, **counts}
    safety = judges.get("is_safe")
    if safety is not None:
        _, safe_scores = pointwise_labels(safety, *sub, LabelRule("argmax"))
        report["judges"]["is_safe"] = {
            "label": safety.label,
            "kind": safety.kind,
            "threshold": safe_threshold,
        }
    rows, dropped = [], 0
    for k, i in enumerate(keep):
        row: dict[str, Any] = {"prompt": prompts[i], "response_0": pairs[i][0], "response_1": pairs[i][1]}
        if any(labels[role][k] is None for role in labels):
            dropped += 1
            continue
        for role, field in (("better", "better_response_id"), ("safer", "safer_response_id")):
            if role in labels:
                row[field] = labels[role][k]
        if safe_scores is not None:
            row["is_response_0_safe"] = bool(safe_scores[k, 0] > safe_threshold)
            row["is_response_1_safe"] = bool(safe_scores[k, 1] > safe_threshold)
        rows.append(row)
    report["dropped_tie_or_invalid"] = dropped
    report["rows"] = len(rows)
    if "better" in labels and "safer" in labels and rows:
        report["better_is_safer"] = sum(
            r["better_response_id"] == r["safer_response_id"] for r in rows
        ) / len(rows)
    if safe_scores is not None and rows:
        report["safe_share"] = float(
            np.mean([[r["is_response_0_safe"], r["is_response_1_safe"]] for r in rows])
        )
    return rows, report


def report_markdown(report: dict[str, Any], title: str = "sacpo label") -> str:
    """labels.md: the counts and each judge's line."""
    lines = [f"# {title}", ""]
    lines += [
        f"- pairs sampled: {report['pairs']} (policy {report.get('policy')}, {report.get('prompts')} prompts)"
    ]
    lines += [f"- dropped: {report['dropped_identical_or_empty']} empty or identical, "
              f"{report['dropped_tie_or_invalid']} with a tie or an invalid verdict"]  # fmt: skip
    lines += [f"- rows written: {report['rows']} → {report.get('data_file')}"]
    if "better_is_safer" in report:
        lines += [
            f"- the better response is also the safer one in {report['better_is_safer']:.3f} of the rows"
        ]
    if "safe_share" in report:
        lines += [f"- responses labelled safe: {report['safe_share']:.3f}"]
    lines += [
        "",
        "| role | judge | kind | ties | invalid | position consistency | requests sent |",
        "|---|---|---|---|---|---|---|",
    ]
    for role, j in report["judges"].items():
        usage = j.get("usage") or {}
        cons = j.get("consistency")
        lines.append(
            f"| {role} | {j['label']} | {j['kind']} | {j.get('ties', '–')} | {j.get('invalid', '–')} | "
            f"{'–' if cons is None or cons != cons else f'{cons:.3f}'} | {usage.get('requests_sent', '–')} |"
        )
    return "\n".join(lines) + "\n"
