"""Prompt clusters of an evaluation (e.g. the toyworld's paraphrases of one task): the bootstrap resamples whole
clusters. A clustering is a function Prompt → label or a sequence of P labels; eval.json records what it was."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sacpo.data.records import Prompt

ClusterSpec = Callable[[Prompt], str] | Sequence[str] | None


def resolve_clusters(clusters: ClusterSpec, prompts: Sequence[Prompt]) -> list[str] | None:
    """P cluster labels of the evaluation prompts: `clusters` called on each prompt, or a sequence of P labels
    taken as is; None → None (every prompt its own cluster). Raises with the offending prompt when a function
    fails, or when the number of labels is not P."""
    if clusters is None:
        return None
    if callable(clusters):
        labels = []
        for p in prompts:
            try:
                labels.append(str(clusters(p)))
            except Exception as e:  # a user function: say which prompt it failed on
                raise ValueError(f"clusters: {_describe(clusters)} failed on prompt {p!r}: {e}") from e
        return labels
    labels = [str(c) for c in clusters]
    if len(labels) != len(prompts):
        raise ValueError(f"clusters: {len(labels)} labels for {len(prompts)} evaluation prompts")
    return labels


def _describe(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def clustering_record(clusters: ClusterSpec, labels: list[str] | None) -> dict[str, Any]:
    """What eval.json records of the clustering: by (function name / "labels" / "prompt"), the number of
    clusters and their sizes."""
    if labels is None:
        return {"by": "prompt", "n_clusters": None}
    sizes = dict(Counter(labels))
    return {
        "by": _describe(clusters) if callable(clusters) else "labels",
        "n_clusters": len(sizes),
        "sizes": sizes,
    }
