"""toyworld: a synthetic language with gold helpfulness and safety oracles, a tiny SFT policy and PKU-schema data.

See `language` (prompts and responses), `oracle` (r*, g*, is_safe) and `build` (tokenizer, SFT, preferences).
Importing this package registers into `sacpo.scoring`: the scorers `toyworld.reward` (r*) and `toyworld.safety`
(g*, higher = safer), with the older names `toyworld-gold` / `toyworld-safety` as aliases; the oracle `toyworld`;
the prompt clustering `toyworld-task` (the 4 paraphrases of a task form one cluster).
"""

from sacpo.data.records import Prompt
from sacpo.scoring import FunctionScorer, Oracle, register_clustering, register_oracle, register_scorer
from sacpo.worlds.toyworld.build import ToyWorldConfig, World, build_world
from sacpo.worlds.toyworld.language import task_of
from sacpo.worlds.toyworld.oracle import gold_reward, gold_safety, is_safe


def toyworld_task(prompt: Prompt) -> str:
    """The toyworld task a prompt asks about (its 4 paraphrases share it): the toyworld's cluster label."""
    if not isinstance(prompt, str):
        raise ValueError("toyworld prompts are plain strings")
    return task_of(prompt).phrase


def _reward() -> FunctionScorer:
    return FunctionScorer("toyworld r*", gold_reward)


def _safety() -> FunctionScorer:
    return FunctionScorer("toyworld g*", gold_safety)


def toyworld_oracle() -> Oracle:
    return Oracle(_reward(), _safety(), is_safe, toyworld_task)


for _name, _factory in (
    ("toyworld.reward", _reward),
    ("toyworld.safety", _safety),
    ("toyworld-gold", _reward),
    ("toyworld-safety", _safety),
):
    register_scorer(_name, _factory)
register_oracle("toyworld", toyworld_oracle)
register_clustering("toyworld-task", toyworld_task)

__all__ = [
    "ToyWorldConfig",
    "World",
    "build_world",
    "gold_reward",
    "gold_safety",
    "is_safe",
    "toyworld_oracle",
    "toyworld_task",
]
