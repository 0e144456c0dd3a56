"""Canonical preference records. Every loader produces these; everything downstream consumes only these.

A prompt is either a plain string or a conversation (a list of {"role", "content"} messages); responses are plain
strings (the assistant's turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Message = dict[str, str]
Prompt = Union[str, tuple[Message, ...]]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class PairedExample:
    """A preference pair: `chosen` is preferred to `rejected` for `prompt` (DPO, IPO)."""

    prompt: Prompt
    chosen: str
    rejected: str


@dataclass(frozen=True)
class BinaryExample:
    """A single completion labelled desirable or undesirable (KTO)."""

    prompt: Prompt
    completion: str
    desirable: bool
