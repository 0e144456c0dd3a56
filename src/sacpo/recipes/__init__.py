"""Recipes: the end-to-end jobs (train, pipeline, reward, bon, cd, cd_scorer, eval, demo, theory) as short
functions over library parts. `sacpo.cli` parses arguments and calls exactly one of them.

Recipes are the only layer (besides the CLI) that may use `sacpo.worlds`; importing this package registers the
embedded worlds' gold oracles and scorers into `sacpo.scoring`.
"""

import sacpo.worlds.toyworld  # noqa: F401  (registers toyworld.reward / toyworld.safety, the toyworld oracle)
