"""The report's judge tables, from judges.json: per-judge win rates vs SFT, LLM judge health, judge agreement."""

from __future__ import annotations

from typing import Any, NamedTuple

from sacpo.evaluate.format import fmt_ci, num


class Table(NamedTuple):
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str


WIN_NOTE = (
    "Each model's sample s against SFT's sample s of the same prompt. LLM judges are asked in both orders (the "
    "model's response shown first, then second); when the two verdicts disagree the pair is a tie; a pair whose "
    "answer had no parsable verdict after the retries is invalid and left out (the win rate is over valid pairs). "
    "Reward / cost models and oracles compare the two scores (a lower cost wins; equal scores tie). CIs: bootstrap "
    "over prompts (or clusters) with at least one valid pair."
)
HEALTH_NOTE = (
    "position consistency: share of valid pairs whose two orders agree (a judge that always prefers the first "
    "response scores 0). invalid orders: answers still without a verdict after every retry; malformed: all "
    "answers without a verdict, retries included. requests: sent to the server this run (retries included); "
    "answers from the cache were not asked again."
)
AGREE_NOTE = (
    "Over every model's pairs judged by both: agreement = share with the same outcome (win / tie / loss); "
    "decisive = the same among pairs both judges call a winner. Against a gold oracle this is the judge's accuracy."
)


def judge_tables(record: dict[str, Any]) -> list[Table]:
    """The three tables of a judges.json record (agreement only when two judges share a criterion)."""
    judges = record.get("judges", [])
    models = record.get("models", {})
    labels = [j["label"] for j in judges]
    header = ["model", *(f"{j['label']} ({j['criterion']})" for j in judges)]
    rows = []
    for m, by in models.items():
        cells = [m]
        for label in labels:
            r = by.get(label)
            if r is None:
                cells.append("–")
                continue
            win = tuple(float("nan") if v is None else v for v in r["win"])
            extra = f"; {r['invalid']} invalid" if r.get("invalid") else ""
            cells.append(f"{fmt_ci(win)} (n={r['n_valid']}{extra})")
        rows.append(cells)
    tables = [Table("Judges: win rate vs SFT", header, rows, WIN_NOTE)]
    llm = [j for j in judges if j["kind"] == "llm"]
    if llm:
        h = ["judge", "model", "position consistency", "ties by disagreement", "invalid pairs"]
        body = []
        for j in llm:
            for m, by in models.items():
                r = by.get(j["label"], {})
                body.append([j["label"], m, num(r.get("consistency")), str(r.get("ties_by_disagreement", "–")),
                             str(r.get("invalid", "–"))])  # fmt: skip
        usage = "; ".join(_usage(j) for j in llm)
        tables.append(
            Table("LLM judges: position consistency and validity", h, body, f"{HEALTH_NOTE} {usage}")
        )
    agree = record.get("agreement", [])
    if agree:
        h = ["judge A", "judge B", "criterion", "agreement", "decisive agreement", "pairs (decisive)"]
        body = [[a["a"], a["b"], a["criterion"], num(a["rate"]), num(a["decisive_rate"]),
                 f"{a['n']} ({a['n_decisive']})"] for a in agree]  # fmt: skip
        tables.append(Table("Judge agreement", h, body, AGREE_NOTE))
    return tables


def _usage(j: dict[str, Any]) -> str:
    u = j.get("usage") or {}
    return (
        f"{j['label']}: {u.get('answers', 0)} answers, {u.get('from_cache', 0)} from the cache, "
        f"{u.get('requests_sent', 0)} requests sent ({u.get('retries', 0)} retries), "
        f"{u.get('malformed_answers', 0)} malformed, {u.get('invalid_orders', 0)} invalid orders, tokens "
        f"{u.get('prompt_tokens', 0)} prompt + {u.get('completion_tokens', 0)} completion"
    )
