"""Scoring: one registry of everything that maps (prompts, responses) to one float per response.

`base`: the `Scorer` protocol, `FunctionScorer`, `run_scorer` (shape and finiteness checks).
`registry`: scorers, gold oracles and prompt clusterings by name; `resolve_scorer` also takes reward/cost model
directories. `reward_model`: `RewardModelScorer` (imported lazily: it needs transformers).
"""

from sacpo.scoring.base import FunctionScorer, Scorer, check_lengths, run_scorer
from sacpo.scoring.registry import (
    CLUSTERINGS,
    MODEL_PREFIX,
    ORACLES,
    SCORERS,
    Oracle,
    check_scorer_spec,
    get_clustering,
    get_oracle,
    load_plugins,
    oracle_names,
    register_clustering,
    register_oracle,
    register_scorer,
    resolve_scorer,
    spec_list,
)

__all__ = [
    "CLUSTERINGS",
    "MODEL_PREFIX",
    "ORACLES",
    "SCORERS",
    "FunctionScorer",
    "Oracle",
    "Scorer",
    "check_lengths",
    "check_scorer_spec",
    "get_clustering",
    "get_oracle",
    "load_plugins",
    "oracle_names",
    "register_clustering",
    "register_oracle",
    "register_scorer",
    "resolve_scorer",
    "run_scorer",
    "spec_list",
]
