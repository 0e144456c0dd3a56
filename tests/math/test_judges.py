"""sacpo.math.judges: position-swap outcomes, win rates with ties and invalid pairs, consistency and agreement,
against hand-computed values."""

import math

import numpy as np
import pytest

from sacpo.math.judges import (
    agreement,
    consistency_rate,
    judged_win_rate,
    pair_outcome,
    prompt_means,
    score_outcome,
)

NAN = float("nan")


@pytest.mark.parametrize(
    "ab, ba, outcome, consistent",
    [
        ("A", "B", 1.0, True),  # model first and preferred; model second and preferred
        ("B", "A", 0.0, True),
        ("tie", "tie", 0.5, True),
        ("A", "A", 0.5, False),  # position bias: always the first
        ("B", "B", 0.5, False),  # always the second
        ("A", "tie", 0.5, False),
        ("tie", "B", 0.5, False),
    ],
)
def test_pair_outcome(ab, ba, outcome, consistent):
    r = pair_outcome(ab, ba)
    assert (r.outcome, r.consistent, r.valid) == (outcome, consistent, True)


def test_invalid_pairs_are_never_guessed():
    for ab, ba in [(None, "B"), ("A", None), (None, None)]:
        r = pair_outcome(ab, ba)
        assert math.isnan(r.outcome) and not r.valid and not r.consistent
    with pytest.raises(ValueError, match="unknown verdict"):
        pair_outcome("a", "B")


def test_win_rate_by_hand():
    # prompt 0: verdicts (A,B) win, (A,A) disagreement → tie;  prompt 1: (B,A) loss, (None,B) invalid;
    # prompt 2: both invalid → left out
    verdicts = [[("A", "B"), ("A", "A")], [("B", "A"), (None, "B")], [(None, None), ("A", None)]]
    o = np.array([[pair_outcome(*v).outcome for v in row] for row in verdicts])
    np.testing.assert_array_equal(prompt_means(o)[:2], [0.75, 0.0])
    assert math.isnan(prompt_means(o)[2])
    rate, lo, hi = judged_win_rate(o, n_boot=200, seed=0)
    assert rate == pytest.approx(0.375)  # (0.75 + 0) / 2 over the two prompts with a valid pair
    assert 0.0 <= lo <= rate <= hi <= 0.75
    valid = np.isfinite(o)
    consistent = np.array([[pair_outcome(*v).consistent for v in row] for row in verdicts])
    assert consistency_rate(consistent, valid) == pytest.approx(2 / 3)  # 3 valid pairs, 2 consistent
    assert all(math.isnan(x) for x in judged_win_rate(np.full((2, 2), NAN)))
    assert math.isnan(consistency_rate(np.zeros(3, bool), np.zeros(3, bool)))


def test_win_rate_with_clusters_drops_empty_prompts():
    o = np.array([[1.0], [NAN], [0.0], [1.0]])
    rate, _, _ = judged_win_rate(o, n_boot=100, clusters=["a", "a", "b", "b"])
    assert rate == pytest.approx(2 / 3)


def test_score_outcome_and_agreement():
    np.testing.assert_array_equal(score_outcome([1.0, 2.0, 3.0], [2.0, 2.0, 1.0]), [0.0, 0.5, 1.0])
    assert math.isnan(score_outcome([NAN], [1.0])[0])
    a = agreement([1, 0, 0.5, NAN], [1, 1, 0.5, 0])
    assert a.rate == pytest.approx(2 / 3) and a.decisive_rate == pytest.approx(0.5)
    assert (a.n, a.n_decisive) == (3, 2)
    none = agreement([NAN], [1.0])
    assert math.isnan(none.rate) and none.n == 0
