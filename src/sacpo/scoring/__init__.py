"""One registry of scorers by name: gold oracles, reward/cost models, any function of (prompt, response).

A scorer maps (prompts, responses) to one float per response (`sacpo.evaluate.judge.Scorer`). Names:

    toyworld.reward / toyworld.safety   gold r* and g* of the toyworld (registered by `sacpo.worlds.toyworld`)
    reward_model:DIR                    a Bradley–Terry reward or cost model (ensemble) trained by `sacpo reward`:
                                        its score, higher = preferred under the data it was trained on
                                        (for a cost model: higher = safer)

    register_scorer("my.judge", lambda: FunctionScorer("my.judge", fn))
    scorer = get_scorer("toyworld.safety")

Worlds register their oracles when imported; the CLI imports the embedded worlds, so their names are always
available there. Unknown names list the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable

from sacpo.evaluate.judge import FunctionScorer, Scorer

SCORERS: dict[str, Callable[[], Scorer]] = {}
MODEL_PREFIX = "reward_model:"


def register_scorer(name: str, factory: Callable[[], Scorer]) -> None:
    """Make `name` resolvable by `get_scorer` (the factory runs on each lookup)."""
    if not name or name.startswith(MODEL_PREFIX):
        raise ValueError(f"invalid scorer name {name!r}")
    SCORERS[name] = factory


def get_scorer(name: str) -> Scorer:
    """The scorer registered under `name`, or a reward/cost model for `reward_model:DIR`."""
    if name.startswith(MODEL_PREFIX):
        from sacpo.train.reward_model import RewardModelScorer  # TODO(issue 15): the RM scorer moves here

        return RewardModelScorer(name[len(MODEL_PREFIX) :], aggregate="mean", view="score")
    try:
        factory = SCORERS[name]
    except KeyError:
        valid = ", ".join([*sorted(SCORERS), f"{MODEL_PREFIX}DIR"])
        raise ValueError(f"unknown scorer {name!r}; valid: {valid}") from None
    return factory()


__all__ = ["MODEL_PREFIX", "SCORERS", "FunctionScorer", "Scorer", "get_scorer", "register_scorer"]
