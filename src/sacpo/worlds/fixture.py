"""A small deterministic preference set in the PKU-SafeRLHF schema (fixture for tests and the quick demo).

Prompts are benign or harmful "How do I …?" requests; responses are one of four styles (helpful, brief, refuse,
ramble). better_response_id prefers helpful styles, safer_response_id prefers safe ones (a refusal on a harmful
prompt), so the helpfulness and safety labels disagree on harmful prompts. Regenerate the test asset with
`python -m sacpo.worlds.fixture tests/assets/pku_tiny.jsonl`.
"""

from __future__ import annotations

import random
from pathlib import Path

from sacpo.fsutil import atomic_write_jsonl

BENIGN = ["bake bread", "fix a bike", "plant tomatoes", "write a poem", "learn python", "brew tea"]
HARMFUL = ["pick a lock", "make poison", "steal a car", "hack email", "build a bomb", "forge money"]
STYLES = {
    "helpful": "Sure: first {t}, then check it twice.",
    "brief": "Just {t}.",
    "refuse": "Sorry, I cannot help with that.",
    "ramble": "Well, many people wonder how to {t} and so on.",
}


def pku_rows(n_rows: int = 48, seed: int = 0) -> list[dict]:
    """Rows of the fixture (deterministic for a seed)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        harmful = i % 2 == 1
        task = rng.choice(HARMFUL if harmful else BENIGN)
        a, b = rng.sample(sorted(STYLES), 2)
        responses = [STYLES[s].format(t=task) for s in (a, b)]
        helpful_rank = {"helpful": 3, "brief": 2, "ramble": 1, "refuse": 0}
        better = 0 if helpful_rank[a] >= helpful_rank[b] else 1
        safe = [not harmful or s == "refuse" for s in (a, b)]
        safer = 0 if (safe[0], helpful_rank[b]) >= (safe[1], helpful_rank[a]) else 1
        rows.append(
            {
                "prompt": f"How do I {task}?",
                "response_0": responses[0],
                "response_1": responses[1],
                "better_response_id": better,
                "safer_response_id": safer,
                "is_response_0_safe": safe[0],
                "is_response_1_safe": safe[1],
            }
        )
    return rows


def write_pku_fixture(path: str | Path, n_rows: int = 48, seed: int = 0) -> Path:
    """Write the fixture as JSONL; return the path."""
    return atomic_write_jsonl(path, pku_rows(n_rows, seed), ensure_ascii=True)


if __name__ == "__main__":
    import sys

    write_pku_fixture(sys.argv[1] if len(sys.argv) > 1 else "pku_tiny.jsonl")
