"""TrainConfig: the auto rule of average_logprobs, kl_budget's validation, and which saved configs still describe
the same computation."""

import dataclasses
import math
from typing import get_args

import pytest
import torch
import yaml

from sacpo.config import ConfigError, from_dict, to_yaml
from sacpo.train.config import (
    DataFormat,
    KlEstimator,
    Loss,
    TrainConfig,
    comparable,
    resolve_average_logprobs,
    same_computation,
)

FORMAT = {"dpo": "pku_helpful", "ipo": "pku_safe", "kto": "pku_safe_kto"}


def cfg(loss="dpo", **kw) -> TrainConfig:
    fields = {"policy": "p", "output_dir": "o", "data": {"source": "d.jsonl", "format": FORMAT[loss]}}
    return from_dict(TrainConfig, {**fields, "loss": loss, **kw})


@pytest.mark.parametrize(
    "loss, value, expected",
    [
        ("ipo", None, True),  # TRL's IPO length-normalises
        ("dpo", None, False),  # TRL's DPO and KTO sum
        ("kto", None, False),
        ("ipo", False, False),  # an explicit value always wins
        ("dpo", True, True),
        ("kto", True, True),
    ],
)
def test_average_logprobs_auto_rule(loss, value, expected):
    assert resolve_average_logprobs(loss, value) is expected
    c = cfg(loss, average_logprobs=value)
    assert c.average_logprobs is value and c.resolved_average_logprobs is expected


def test_average_logprobs_defaults_to_auto_and_round_trips_through_yaml():
    c = cfg("ipo")
    assert c.average_logprobs is None and c.resolved_average_logprobs
    text = to_yaml(c)
    assert "average_logprobs: null" in text and "kl_budget: null" in text
    assert from_dict(TrainConfig, yaml.safe_load(text)) == c
    for value in (True, False):
        explicit = cfg("ipo", average_logprobs=value, kl_budget=3.5, kl_every=2)
        again = from_dict(TrainConfig, yaml.safe_load(to_yaml(explicit)))
        assert again == explicit and again.resolved_average_logprobs is value and again.kl_budget == 3.5
    with pytest.raises(ConfigError, match="average_logprobs"):
        cfg("ipo", average_logprobs="yes")


def _saved_before_this_change(c: TrainConfig, average_logprobs: bool) -> str:
    """config.yaml as written before average_logprobs became auto and kl_budget existed."""
    lines = to_yaml(c).splitlines(True)
    lines = [line for line in lines if not line.startswith("kl_budget:")]
    return "".join(
        f"average_logprobs: {str(average_logprobs).lower()}\n"
        if line.startswith("average_logprobs:")
        else line
        for line in lines
    )


def test_old_saved_configs_are_current_unless_the_auto_rule_changed_their_computation():
    # dpo and kto summed before and sum now: a finished stage is still current
    for loss in ("dpo", "kto"):
        assert same_computation(_saved_before_this_change(cfg(loss), False), cfg(loss))
        assert not same_computation(_saved_before_this_change(cfg(loss), True), cfg(loss))
    # ipo summed by default before and length-averages now: stale, unless the user pins the old value
    assert not same_computation(_saved_before_this_change(cfg("ipo"), False), cfg("ipo"))
    assert same_computation(_saved_before_this_change(cfg("ipo"), False), cfg("ipo", average_logprobs=False))
    assert same_computation(_saved_before_this_change(cfg("ipo"), True), cfg("ipo"))
    # a budget is part of the computation: a stage run without one is stale once one is set
    budget = cfg("dpo", kl_budget=5.0, kl_every=10)
    assert not same_computation(to_yaml(cfg("dpo", kl_every=10)), budget)
    assert same_computation(to_yaml(budget), budget)


def test_comparable_resolves_and_drops_added_fields():
    old = {"loss": "ipo", "average_logprobs": False, "lr": 1.0, "malloc_tuning": True}
    assert comparable(old) == {"loss": "ipo", "average_logprobs": False, "lr": 1.0, "malloc_tuning": True}
    new = {"loss": "ipo", "average_logprobs": None, "kl_budget": None, "lr": 1.0}
    assert comparable(new) == {"loss": "ipo", "average_logprobs": True, "lr": 1.0}
    assert comparable({**new, "kl_budget": 2.0})["kl_budget"] == 2.0
    assert comparable(old, ignore=frozenset({"malloc_tuning"})) == {
        "loss": "ipo",
        "average_logprobs": False,
        "lr": 1.0,
    }


@pytest.mark.parametrize("budget", [0.0, -1.0, math.nan, math.inf])
def test_kl_budget_must_be_positive_and_finite(budget):
    with pytest.raises(ConfigError, match=r"kl_budget must be > 0 and finite"):
        cfg(kl_budget=budget, kl_every=5)


@pytest.mark.parametrize(
    "fields",
    [{"kl_every": 0}, {"kl_every": 5, "kl_prompts": 0}, {"kl_every": 5, "eval_fraction": 0.0}],
)
def test_kl_budget_needs_the_periodic_kl_estimate(fields):
    with pytest.raises(ConfigError, match=r"kl_budget=2\.0 needs .*kl_every > 0, kl_prompts > 0") as e:
        cfg(kl_budget=2.0, **fields)
    for name, value in fields.items():
        assert f"{name}={value}" in str(e.value)  # the error names the fields and their values
    assert cfg(kl_budget=2.0, kl_every=5).kl_budget == 2.0


def test_declared_choices_are_the_registries():
    from sacpo.data.formats import FORMATS
    from sacpo.math.kl import KL_ESTIMATORS
    from sacpo.math.preference import LOSSES

    assert get_args(DataFormat) == tuple(FORMATS) and get_args(Loss) == tuple(LOSSES)
    assert get_args(KlEstimator) == tuple(KL_ESTIMATORS)


def test_kl_estimator_is_wired_and_old_stages_stay_current(tiny_model, pku_tiny, tmp_path):
    """estimate_kl applies the named estimator to the same samples (k3 ≥ 0; k1 = mean log-ratio), and a saved
    config without kl_estimator is the same computation as today's default k1 (a finished stage is not stale)."""
    from sacpo.models.load import load_model, load_tokenizer
    from sacpo.train.kl_eval import estimate_kl

    policy, ref = load_model(tiny_model), load_model(tiny_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tok = load_tokenizer(tiny_model)
    prompts = [tok("hello there").input_ids, tok("how do I").input_ids]
    args = (policy, ref, prompts, tok.eos_token_id, tok.pad_token_id, 3, 8)
    k1, k3 = estimate_kl(*args, estimator="k1"), estimate_kl(*args, estimator="k3")
    assert k1["kl_n"] == k3["kl_n"] == 6 and k3["kl"] >= 0 and k1["kl"] != k3["kl"]
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        estimate_kl(*args, estimator="k9")
    cfg = from_dict(
        TrainConfig,
        {"policy": str(tiny_model), "data": {"source": str(pku_tiny)}, "output_dir": str(tmp_path)},
    )
    saved = yaml.safe_load(to_yaml(cfg))
    del saved["kl_estimator"]
    assert same_computation(yaml.safe_dump(saved), cfg)
    assert not same_computation(to_yaml(cfg), dataclasses.replace(cfg, kl_estimator="k3"))
