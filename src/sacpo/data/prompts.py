"""Prompt files for generation (evaluation, best-of-n, controlled decoding, prefix-scorer rollouts).

A prompt is a string or a conversation (list of {role, content} messages). Files:
- `.txt`: one prompt per line (blank lines ignored);
- `.jsonl`: one JSON object per line with a `prompt` field (lines split on "\\n" only: JSON strings may hold
  U+2028/U+0085, which `str.splitlines` would treat as line breaks);
- `.json`: a list of prompts (or of objects with `prompt`), or a mapping of splits such as the toyworld's
  prompts.json ({"train": [...], "test": [...]}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sacpo.config import ConfigError
from sacpo.data.records import Prompt


def prompt_to_json(prompt: Prompt) -> str | list[dict[str, str]]:
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


def prompt_from_json(value: Any) -> Prompt:
    """A string, or a conversation (list of {role, content}) back as a tuple of dicts (the Prompt type)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(m, dict) for m in value):
        return tuple(dict(m) for m in value)
    raise ValueError(f"a prompt must be a string or a list of messages, got {value!r}")


def _lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def load_prompts(path: str | Path, split: str = "test", max_prompts: int | None = None) -> list[Prompt]:
    """Prompts from a .txt / .jsonl / .json file (see the module docstring); `split` selects a split of a .json
    mapping; at most `max_prompts`. Errors (missing file, unknown split, bad prompt, none) are ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: prompts file not found")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".txt":
            items: list[Any] = _lines(text)
        elif p.suffix == ".jsonl":
            items = [json.loads(line).get("prompt") for line in _lines(text)]
        elif p.suffix == ".json":
            obj = json.loads(text)
            if isinstance(obj, dict):
                if split not in obj:
                    raise ConfigError(f"{p}: no split {split!r}; splits: {sorted(obj)}")
                obj = obj[split]
            items = [x.get("prompt") if isinstance(x, dict) else x for x in obj]
        else:
            raise ConfigError(f"{p}: unsupported prompts file type {p.suffix!r}; use .txt, .json or .jsonl")
        prompts = [prompt_from_json(x) for x in items]
    except (ValueError, AttributeError, TypeError) as e:  # not UTF-8 / not JSON / a row that is not an object
        raise ConfigError(f"{p}: {e}") from None
    if not prompts:
        raise ConfigError(f"{p}: no prompts")
    return prompts[:max_prompts] if max_prompts is not None else prompts
