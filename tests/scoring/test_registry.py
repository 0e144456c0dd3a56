"""sacpo.scoring: one registry of scorers, oracles and clusterings; unknown names list the valid ones; model
directories resolve to reward-model scorers; the toyworld registers its names (imported by conftest, as by the
recipes), library code never imports a world."""

import pytest
import torch

from sacpo.config import ConfigError
from sacpo.scoring import (
    MODEL_PREFIX,
    FunctionScorer,
    Oracle,
    check_scorer_spec,
    get_clustering,
    get_oracle,
    register_clustering,
    register_oracle,
    register_scorer,
    resolve_scorer,
    run_scorer,
)
from sacpo.scoring import registry as reg


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(reg, "SCORERS", dict(reg.SCORERS))
    monkeypatch.setattr(reg, "ORACLES", dict(reg.ORACLES))
    monkeypatch.setattr(reg, "CLUSTERINGS", dict(reg.CLUSTERINGS))


def test_register_and_resolve_a_function_scorer(clean_registry):
    register_scorer("len", lambda: FunctionScorer("len", lambda p, r: len(r)))
    scores = run_scorer(resolve_scorer("len"), ["a", "b"], ["xy", "xyz"])
    assert scores.dtype == torch.float64 and scores.tolist() == [2.0, 3.0]
    check_scorer_spec("len")  # no error


def test_unknown_names_list_the_valid_ones(clean_registry, tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown scorer 'nope'; valid: .*toyworld\.reward.*reward_model:DIR"
    ):
        resolve_scorer("nope")
    with pytest.raises(ConfigError, match=r"unknown scorer 'nope'"):
        check_scorer_spec(["nope"], "reward")
    with pytest.raises(ConfigError, match=r"reward: empty scorer list"):
        check_scorer_spec([], "reward")
    with pytest.raises(ConfigError, match=r"unknown oracle 'gold'; valid: toyworld"):
        get_oracle("gold")
    with pytest.raises(ConfigError, match=r"unknown clusters 'x'; valid: oracle, prompt, toyworld-task"):
        get_clustering("x")
    check_scorer_spec(str(tmp_path))  # an existing directory passes the early check (loaded later)
    check_scorer_spec(MODEL_PREFIX + str(tmp_path))


def test_invalid_and_reserved_names(clean_registry):
    with pytest.raises(ValueError):
        register_scorer("", lambda: None)
    with pytest.raises(ValueError):
        register_scorer(MODEL_PREFIX + "x", lambda: None)
    for name in ("oracle", "prompt"):
        with pytest.raises(ConfigError, match="reserved"):
            register_clustering(name, str)


def test_oracles_and_clusterings(clean_registry):
    r = FunctionScorer("r", lambda p, y: 1.0)
    register_oracle("mine", lambda: Oracle(r, r, cluster=lambda p: p[:1]))
    oracle = get_oracle("mine")
    assert oracle.reward is r and oracle.is_safe is None
    assert get_clustering("oracle", oracle)("abc") == "a"
    assert get_clustering("prompt", oracle) is None


def test_the_toyworld_registers_its_names_and_aliases():
    for name in ("toyworld.reward", "toyworld-gold"):
        assert resolve_scorer(name).name == "toyworld r*"
    for name in ("toyworld.safety", "toyworld-safety"):
        assert resolve_scorer(name).name == "toyworld g*"
    oracle = get_oracle("toyworld")
    assert oracle.is_safe is not None and oracle.cluster is get_clustering("toyworld-task")


def test_a_reward_model_directory_resolves_to_a_model_scorer(tiny_model, tmp_path):
    from sacpo.models.load import ModelLoadError

    # a causal LM is not a sequence-classification reward model: the scorer says so (through the prefix too)
    for spec in (str(tiny_model), MODEL_PREFIX + str(tiny_model)):
        with pytest.raises((ModelLoadError, ValueError), match=r"reward_model\.json|sequence-classification"):
            resolve_scorer(spec)


def test_a_fresh_process_finds_the_toyworld_through_its_entry_point():
    """Library code never imports a world: the names resolve through the `sacpo.worlds` entry point."""
    import subprocess
    import sys

    code = (
        "import sys; from sacpo.scoring import get_oracle, resolve_scorer\n"
        "assert 'sacpo.worlds.toyworld' not in sys.modules\n"
        "print(resolve_scorer('toyworld-gold').name, get_oracle('toyworld').safety.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "toyworld r* toyworld g*"
