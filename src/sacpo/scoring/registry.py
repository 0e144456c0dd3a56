"""The one registry of scorers, gold oracles and prompt clusterings, by name.

Scorer specs (everywhere a config names a scorer: `sacpo bon`, `sacpo cd`, `sacpo eval`, on-policy labels):

    a registered name          e.g. toyworld.reward / toyworld.safety (registered by `sacpo.worlds.toyworld`)
    reward_model:DIR           a Bradley–Terry reward or cost model (ensemble) trained by `sacpo reward`
    DIR, or [DIR, DIR, ...]    the same without the prefix; several directories form an ensemble

Models are read on their *score* view by default: a reward model's r, a cost model's safety score s = −c
(higher = safer), so a constrained selection is always r + λ·g.

An oracle is a world's gold pair (reward r*, safety g*, optionally is_safe(x, y) and the prompt clustering whose
clusters are paraphrases of one task). Worlds register theirs when imported; a world is found through the
`sacpo.worlds` entry-point group (`load_plugins`, run on a lookup miss), so library code never imports one and a
user's package can add its own judges and oracles. Unknown names list the valid ones.

    register_scorer("my.judge", lambda: FunctionScorer("my.judge", fn))
    scorer = resolve_scorer("toyworld.safety")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from sacpo.config import ConfigError
from sacpo.data.records import Prompt
from sacpo.scoring.base import Scorer

MODEL_PREFIX = "reward_model:"


class Oracle(NamedTuple):
    """Gold scorers: helpfulness r (higher better), safety g (higher safer), optionally is_safe(x, y), and
    optionally the world's prompt clustering cluster(x) → label (prompts of one label are paraphrases)."""

    reward: Scorer
    safety: Scorer
    is_safe: Callable[[Prompt, str], bool] | None = None
    cluster: Callable[[Prompt], str] | None = None


SCORERS: dict[str, Callable[[], Scorer]] = {}
ORACLES: dict[str, Callable[[], Oracle]] = {}
CLUSTERINGS: dict[str, Callable[[Prompt], str]] = {}
RESERVED_CLUSTERINGS = ("oracle", "prompt")
PLUGIN_GROUP = "sacpo.worlds"  # entry points of packages that register scorers/oracles when imported
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module registered under the `sacpo.worlds` entry-point group (once per process), so that a
    world's names resolve without the caller importing it: sacpo's own toyworld is one (pyproject.toml), and any
    installed package can add its judges and oracles the same way. Called on a lookup miss and for name lists."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        ep.load()


def _known(table: dict[str, Any], name: str) -> bool:
    if name not in table:
        load_plugins()
    return name in table


def _unknown(kind: str, name: str, valid: list[str]) -> ConfigError:
    return ConfigError(
        f"unknown {kind} {name!r}; valid: {', '.join(valid) if valid else '(none registered)'}"
    )


def register_scorer(name: str, factory: Callable[[], Scorer]) -> None:
    """Make `name` resolvable by `resolve_scorer` (the factory runs on each lookup)."""
    if not name or name.startswith(MODEL_PREFIX):
        raise ValueError(f"invalid scorer name {name!r}")
    SCORERS[name] = factory


def register_oracle(name: str, factory: Callable[[], Oracle]) -> None:
    """Make an oracle available by name (`oracle:` in eval / bon / cd configs); the factory runs when needed."""
    if not name:
        raise ValueError("invalid oracle name ''")
    ORACLES[name] = factory


def register_clustering(name: str, fn: Callable[[Prompt], str]) -> None:
    """Make a prompt clustering available by name (`clusters:` in eval configs)."""
    if name in RESERVED_CLUSTERINGS:
        raise ConfigError(f"{name!r} is reserved in EvalConfig.clusters")
    CLUSTERINGS[name] = fn


def spec_list(spec: str | list[str]) -> list[str]:
    """A scorer spec as a list of items."""
    return [spec] if isinstance(spec, str) else list(spec)


def scorer_names() -> list[str]:
    load_plugins()
    return [*sorted(SCORERS), f"{MODEL_PREFIX}DIR", "DIR"]


def check_scorer_spec(spec: str | list[str], what: str = "scorer") -> None:
    """Fail before any model loads: a registered name, or existing model directories (else ConfigError)."""
    items = spec_list(spec)
    if not items:
        raise ConfigError(f"{what}: empty scorer list")
    if len(items) == 1 and _known(SCORERS, items[0]):
        return
    bad = [s for s in items if not Path(s.removeprefix(MODEL_PREFIX)).is_dir()]
    if bad:
        raise ConfigError(
            f"{what}: unknown scorer {bad[0]!r}; give one of {', '.join(sorted(SCORERS))} or reward/cost "
            "model director(ies) written by `sacpo reward` (optionally prefixed reward_model:)"
        )


def resolve_scorer(
    spec: str | list[str], aggregate: str = "mean", device: Any = None, view: str = "score"
) -> Scorer:
    """The scorer a spec names (see the module docstring); several directories form an ensemble."""
    items = spec_list(spec)
    if len(items) == 1 and _known(SCORERS, items[0]):
        return SCORERS[items[0]]()
    if len(items) == 1 and not items[0].startswith(MODEL_PREFIX) and not Path(items[0]).is_dir():
        raise _unknown("scorer", items[0], scorer_names())
    from sacpo.scoring.reward_model import RewardModelScorer  # transformers loads only when a model is named

    dirs = [s.removeprefix(MODEL_PREFIX) for s in items]
    return RewardModelScorer(dirs, aggregate=aggregate, device=device, view=view)


def oracle_names() -> list[str]:
    load_plugins()
    return sorted(ORACLES)


def get_oracle(name: str) -> Oracle:
    _known(ORACLES, name)
    try:
        factory = ORACLES[name]
    except KeyError:
        raise _unknown("oracle", name, oracle_names()) from None
    return factory()


def get_clustering(name: str, oracle: Oracle | None = None) -> Callable[[Prompt], str] | None:
    """ "oracle" → the oracle's own clustering (None if it has none), "prompt" → None (every prompt its own
    cluster), else CLUSTERINGS[name]."""
    if name == "oracle":
        return None if oracle is None else oracle.cluster
    if name == "prompt":
        return None
    _known(CLUSTERINGS, name)
    try:
        return CLUSTERINGS[name]
    except KeyError:
        raise _unknown("clusters", name, [*RESERVED_CLUSTERINGS, *sorted(CLUSTERINGS)]) from None
