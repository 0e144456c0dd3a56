"""π*_λ estimated from a pool of policy samples, checked against exact enumeration: with one new token the
response space is the vocabulary, and π*(v) = π_SFT(v)·exp(t(v)) / Z exactly."""

import math

import pytest
import torch

from sacpo.data.tokenize import encode_prompt
from sacpo.evaluate.optimum import OPTIMUM_FAMILY, estimate_optimum, sample_pool
from sacpo.models.load import load_model, load_tokenizer
from sacpo.scoring.base import FunctionScorer

PROMPTS = ["How do I bake bread?", "Tell me a joke."]


def reward(prompt, response):
    return 1.0 if response[:1] in set("aeiou") else 0.0


def safety(prompt, response):
    return -1.0 if response[:1] in set("xyz!?") else 0.5


def exact(model_dir, prompt, lam, beta, scale):
    tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    ids = torch.tensor([encode_prompt(tok, prompt, 64)])
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)  # (V,)
    texts = [tok.decode([v], skip_special_tokens=True).strip() for v in range(p.numel())]
    r = torch.tensor([reward(prompt, y) for y in texts], dtype=torch.float64)
    g = torch.tensor([safety(prompt, y) for y in texts], dtype=torch.float64)
    t = scale * (r + lam * g) / beta
    pstar = p * t.exp() / (p * t.exp()).sum()
    kl = float((pstar * (pstar / p).log()).nansum())
    return float((pstar * r).sum()), float((pstar * g).sum()), kl, float((p * t.exp()).sum().log())


def test_pool_estimate_matches_exact_enumeration(tiny_model, tmp_path):
    lam, beta, scale = 1.0, 0.5, 1.0
    torch.manual_seed(11)
    rng_before = torch.random.get_rng_state()
    pool = sample_pool(
        tiny_model,
        PROMPTS,
        FunctionScorer("r", reward),
        FunctionScorer("g", safety),
        tmp_path / "opt",
        proposals={"same": tiny_model},  # a second component exercises the mixture density
        n_sft=3000,
        n_proposal=1000,
        max_new_tokens=1,
        show_progress=False,
    )
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # seeded draws leave the caller's RNG alone
    (pt,) = estimate_optimum(pool, [lam], beta, scale, len(PROMPTS), b=0.0)
    m = pt.metrics
    assert m.family == OPTIMUM_FAMILY and m.param == pytest.approx(beta / lam)
    ex = [exact(tiny_model, p, lam, beta, scale) for p in PROMPTS]
    assert m.mean_reward == pytest.approx(sum(e[0] for e in ex) / 2, abs=0.04)
    assert m.mean_safety == pytest.approx(sum(e[1] for e in ex) / 2, abs=0.04)
    assert m.kl == pytest.approx(sum(e[2] for e in ex) / 2, abs=0.05)
    assert m.extra["objective"] == pytest.approx(beta / scale * sum(e[3] for e in ex) / 2, abs=0.02)
    assert 1.0 <= m.extra["ess_min"] <= 4000 and not math.isnan(m.helpful_win[0])
    # a second call reuses the cached pool (no model is loaded: same arrays)
    again = sample_pool(
        tiny_model,
        PROMPTS,
        FunctionScorer("r", reward),
        FunctionScorer("g", safety),
        tmp_path / "opt",
        proposals={"same": tiny_model},
        n_sft=3000,
        n_proposal=1000,
        max_new_tokens=1,
        show_progress=False,
    )
    assert (again.log_q == pool.log_q).all()
