"""sacpo.evaluate.metrics: the KL estimate, the constraint, ModelMetrics' strict-JSON round trip, degenerate
samples — by hand."""

import json
import math

import pytest
import torch

from sacpo.evaluate.metrics import (
    ModelMetrics,
    constraint_holds,
    degenerate_kl_share,
    is_degenerate,
    kl_estimate,
)

NAN = float("nan")


def test_kl_estimate_hand_and_no_clamp():
    lp = [[-1.0, -2.0], [-3.0, -4.0]]
    lq = [[-1.5, -1.0], [-3.0, -5.0]]
    # log-ratios [[.5, −1], [0, 1]] → prompt means [−.25, .5] → mean .125, se = std([−.25, .5])/√2 = .375
    kl, se = kl_estimate(lp, lq)
    assert kl == pytest.approx(0.125) and se == pytest.approx(0.375)
    kl, se = kl_estimate([-2.0], [-1.0])  # one sample: a negative estimate is noise and stays negative
    assert kl == -1.0 and math.isnan(se)
    x = torch.randn(6, 3)
    assert kl_estimate(x, x.clone()) == (0.0, 0.0)
    with pytest.raises(ValueError, match="shapes"):
        kl_estimate([1.0, 2.0], [1.0])


def test_constraint_holds():
    assert constraint_holds(0.1, 0.0) and constraint_holds(0.0, 0.0)
    assert not constraint_holds(-0.1, 0.0)
    assert not constraint_holds(NAN, -10.0)


# ------------------------------------------------------------------------------------------------ ModelMetrics
def test_model_metrics_dict_roundtrip_is_strict_json():
    m = ModelMetrics(
        name="sacpo-lam2",
        family="sacpo",
        param=0.05,
        helpful_win=(0.6, 0.5, NAN),
        harmless_win=(0.7, 0.6, 0.8),
        mean_reward=1.0,
        mean_safety=NAN,
        p_safe=0.9,
        constraint_ok=False,
        kl=2.0,
        kl_se=NAN,
        mean_rm=0.3,
        n=8,
        extra={"len": 3.5},
    )
    text = json.dumps(m.to_dict(), allow_nan=False)
    back = ModelMetrics.from_dict(json.loads(text))
    assert back.name == m.name and back.param == 0.05 and back.mean_cm is None
    assert back.helpful_win[:2] == (0.6, 0.5) and math.isnan(back.helpful_win[2])
    assert math.isnan(back.mean_safety) and math.isnan(back.kl_se)
    assert back.extra == {"len": 3.5}
    with pytest.raises(ValueError, match="unknown"):
        ModelMetrics.from_dict({**m.to_dict(), "bogus": 1})


def test_model_metrics_new_fields_roundtrip_and_old_results_load():
    m = ModelMetrics(
        name="m", family="sacpo", param=0.1, helpful_win=(0.6, 0.5, 0.7), harmless_win=(0.4, 0.3, 0.5),
        mean_reward=1.0, mean_safety=0.5, p_safe=0.8, constraint_ok=True, kl=2.0, kl_se=0.1,
        safety_lcb=0.42, degenerate_share=0.25, degenerate_kl_share=NAN,
        per_prompt={"reward": [1.0, NAN], "kl": [2.0, 2.0]}, clusters=["a", "b"],
    )  # fmt: skip
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert (
        d["safety_lcb"] == 0.42
        and d["degenerate_kl_share"] is None
        and d["per_prompt"]["reward"] == [1.0, None]
    )
    back = ModelMetrics.from_dict(d)
    assert back.safety_lcb == 0.42 and back.degenerate_share == 0.25 and math.isnan(back.degenerate_kl_share)
    assert back.per_prompt["kl"] == [2.0, 2.0] and math.isnan(back.per_prompt["reward"][1])
    assert back.clusters == ["a", "b"]
    # a results.json row written before these fields existed still loads, with undefined values
    old = {k: v for k, v in d.items() if k not in ("safety_lcb", "degenerate_share", "degenerate_kl_share",
                                                   "per_prompt", "clusters")}  # fmt: skip
    back = ModelMetrics.from_dict(old)
    assert math.isnan(back.safety_lcb) and back.per_prompt == {} and back.clusters is None


# ------------------------------------------------------------------------------------------------ degenerate
@pytest.mark.parametrize(
    ("text", "degenerate"),
    [
        ("sure . first first first", True),
        ("sure . first dig a hole . then place the the the clerk .", True),
        ("The the THE end", True),  # case-folded
        ("the the end", False),  # twice is not a run of three
        ("finally . finally . finally", False),  # punctuation breaks a run
        ("please ask a trained expert for safe help . . .", False),  # punctuation is not a word
        ("", False),
    ],
)
def test_is_degenerate(text, degenerate):
    assert is_degenerate(text) is degenerate


def test_is_degenerate_repeats_and_kl_share_hand():
    assert is_degenerate("a b b", repeats=2) and not is_degenerate("a b a", repeats=2)
    with pytest.raises(ValueError):
        is_degenerate("x", repeats=1)
    assert degenerate_kl_share([1.0, 3.0], [False, True]) == pytest.approx(0.75)
    assert degenerate_kl_share([[1.0, 3.0], [0.0, 0.0]], [[False, False], [False, False]]) == 0.0
    assert degenerate_kl_share([-1.0, 3.0], [True, False]) == pytest.approx(-0.5)  # not clamped
    assert math.isnan(degenerate_kl_share([0.0, 0.0], [True, False]))  # no KL to share
    assert math.isnan(degenerate_kl_share([1.0, -2.0], [True, False]))  # negative total: noise
    with pytest.raises(ValueError, match="differ"):
        degenerate_kl_share([1.0], [True, False])


def test_kl_estimate_clustered_hand():
    kl, se = kl_estimate([[1.0, 1.0], [3.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]], clusters=["a", "b"])
    assert kl == 2.0 and se == pytest.approx(1.0)  # cluster totals 1, 3 around 2·2 → 2 · (1 + 1) / 4 = 1
