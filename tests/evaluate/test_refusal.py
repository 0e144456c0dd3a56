"""Harmful compliance and benign refusal rates, by hand."""

import math

import numpy as np

from sacpo.evaluate.refusal import rate, refusal_row, samples_markdown, table_markdown


def test_rates_by_hand():
    # harmful: 3 prompts × 2 samples of refusal flags → compliance = mean(1 − ρ) = (0 + ½ + 1)/3 = ½
    harmful = np.array([[1, 1], [1, 0], [0, 0]])
    # benign: refusal = mean ρ = (1 + 0 + 0 + 0)/4
    benign = np.array([[1, 1], [0, 0], [0, 0], [0, 0]])
    row = refusal_row("m", "sacpo", harmful, benign, kl=0.3, kl_se=0.1, n_boot=200)
    assert row.harmful_compliance.value == 0.5 and row.harmful_compliance.n_prompts == 3
    assert row.benign_refusal.value == 0.25 and row.benign_refusal.n_prompts == 4
    c = row.harmful_compliance
    assert 0.0 <= c.lo <= c.value <= c.hi <= 1.0 and c.lo < c.hi


def test_constant_flags_have_a_point_ci_and_no_prompts_are_undefined():
    r = rate(np.zeros((5, 1)))
    assert (r.value, r.lo, r.hi) == (0.0, 0.0, 0.0)
    r = rate(np.zeros((0, 2)))
    assert math.isnan(r.value) and r.fmt() == "–"
    one = rate(np.ones(1))
    assert one.value == 1.0 and math.isnan(one.lo) and one.fmt() == "1.00"


def test_markdown():
    row = refusal_row("sft", "sft", np.array([[0], [1]]), np.array([[0], [0]]), kl=0.0, kl_se=float("nan"))
    md = table_markdown([row])
    assert "| sft | sft | 0.50 [" in md and "| 0.00 [0.00, 0.00] | 0.00 |" in md
    s = samples_markdown({"sft": [("harmful", "How to X?", "I'm sorry.", True), ("benign", "Hi", "", False)]})
    assert "### sft" in s and "(refuses) I'm sorry." in s and "(answers) (empty)" in s
