"""toyworld: a synthetic language with gold helpfulness and safety oracles, a tiny SFT policy and PKU-schema data.

See `language` (prompts and responses), `oracle` (r*, g*, is_safe) and `build` (tokenizer, SFT, preferences).
"""

from sacpo.scoring import FunctionScorer, register_scorer
from sacpo.worlds.toyworld.build import ToyWorldConfig, World, build_world
from sacpo.worlds.toyworld.oracle import gold_reward, gold_safety, is_safe

register_scorer("toyworld.reward", lambda: FunctionScorer("toyworld r*", gold_reward))
register_scorer("toyworld.safety", lambda: FunctionScorer("toyworld g*", gold_safety))

__all__ = ["ToyWorldConfig", "World", "build_world", "gold_reward", "gold_safety", "is_safe"]
