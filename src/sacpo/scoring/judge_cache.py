"""On-disk cache of judge answers: one small JSON file per answer, each written atomically.

    cache = JudgmentCache("runs/eval/judge_cache")
    key = judgment_key({"model": "gpt-4o", ...}, prompt, first, second, attempt=0)
    cache.get(key) or cache.put(key, {"text": ..., "verdict": ...})

An answer is stored as <root>/<key[:2]>/<key>.json through `sacpo.fsutil.atomic_write_json` (temp file, fsync,
rename) the moment it arrives, so a crash — even SIGKILL — loses only the requests in flight, and a rerun sends no
request whose answer is on disk. The key is the sha256 of the judge's identity (server, model, template digest,
sampling settings), the prompt, the two responses in the order shown, and the attempt number (a malformed verdict
is re-asked as attempt 1, 2, …). Files that do not parse (a foreign file, a torn copy from another tool) are
ignored and counted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sacpo.data.prompts import prompt_to_json
from sacpo.data.records import Prompt
from sacpo.fsutil import atomic_write_json


def judgment_key(identity: dict[str, Any], prompt: Prompt, first: str, second: str, attempt: int) -> str:
    """sha256 (hex) of everything an answer depends on; `first` is the response shown as A."""
    payload = {
        "judge": identity,
        "prompt": prompt_to_json(prompt),
        "first": first,
        "second": second,
        "attempt": int(attempt),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JudgmentCache:
    """Answers by key under `root` (created on the first write). hits / writes count this object's lookups."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.writes = 0
        self.unreadable = 0
        self._entries: dict[str, dict[str, Any]] = {}
        if self.root.is_dir():
            for f in self.root.glob("*/*.json"):
                try:
                    self._entries[f.stem] = json.loads(f.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    self.unreadable += 1

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
        return entry

    def put(self, key: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.root / key[:2] / f"{key}.json", record, indent=None)
        self._entries[key] = record
        self.writes += 1
