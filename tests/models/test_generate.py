"""`sample`: one prefill per prompt with the cache repeated n times draws the same process as `generate`."""

import pytest
import torch

from sacpo.models import generate
from sacpo.models.generate import draw, left_pad, next_token_probs, sample
from sacpo.models.load import load_model, load_tokenizer


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    return load_model(tiny_model).eval(), load_tokenizer(tiny_model)


def _prompts(tok):
    return [tok("hello there")["input_ids"], tok("a much longer prompt, with padding")["input_ids"], [65]]


def test_same_draws_as_generate_with_the_same_seed(model_tok, monkeypatch):
    """With the token drawn by `torch.multinomial` (HF's draw) instead of `draw` (inversion), ancestral
    sampling with HF's own loop (prompts repeated n times before the prefill) gives the same tokens as ours on
    the tiny GPT-2: the prefill-once cache and the masks give the same logits, and the RNG is consumed
    identically. (`draw` itself is checked against the model's distribution below.)"""
    monkeypatch.setattr(generate, "draw", lambda probs: torch.multinomial(probs, 1).squeeze(-1))
    model, tok = model_tok
    prompts = _prompts(tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids, attn = left_pad(prompts, pad)
    torch.manual_seed(3)
    gen = model.generate(
        input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=12,
        num_return_sequences=4, eos_token_id=eos, pad_token_id=pad,
    )[:, ids.shape[1]:].tolist()  # fmt: skip
    torch.manual_seed(3)
    ours = sample(model, prompts, eos, pad, n=4, max_new_tokens=12, batch_size=8)
    assert len(ours) == 12
    for j, (seq, toks) in enumerate(zip(ours, gen, strict=True)):
        toks = toks[: toks.index(eos) + 1] if eos in toks else toks
        assert seq.prompt_len == len(prompts[j // 4])
        assert list(seq.input_ids[: seq.prompt_len]) == prompts[j // 4]
        assert list(seq.input_ids[seq.prompt_len :]) == toks


def test_batching_does_not_change_the_distribution_shape(model_tok):
    model, tok = model_tok
    prompts = _prompts(tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    out = sample(model, prompts, eos, pad, n=3, max_new_tokens=5, batch_size=2)
    assert [s.input_ids[: s.prompt_len] for s in out] == [tuple(p) for p in prompts for _ in range(3)]
    for s in out:
        resp = list(s.input_ids[s.prompt_len :])
        assert 1 <= len(resp) <= 5 and (eos not in resp[:-1])


def test_next_token_frequencies_follow_the_tempered_model(model_tok):
    """One new token, 20 000 draws at temperature 0.3: Pearson's χ² against softmax(z / 0.3) stays within the
    χ²(V−1) range, and the same counts are far from the untempered softmax (the check can fail)."""
    model, tok = model_tok
    prompt = tok("hello")["input_ids"]
    torch.manual_seed(0)
    out = sample(
        model, [prompt], tok.eos_token_id, tok.pad_token_id, n=20_000, max_new_tokens=1, temperature=0.3
    )
    counts = torch.bincount(torch.tensor([s.input_ids[-1] for s in out]), minlength=len(tok)).double()
    with torch.no_grad():
        z = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()

    def chi2(p):
        expected = counts.sum() * p
        return float(((counts - expected) ** 2 / expected).sum())

    df = len(tok) - 1
    assert chi2(torch.softmax(z / 0.3, -1)) < df + 6 * (2 * df) ** 0.5
    assert chi2(torch.softmax(z, -1)) > df + 20 * (2 * df) ** 0.5


@pytest.mark.parametrize(
    "kw",
    [
        {"n": 0},
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"batch_size": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
    ],
)
def test_bad_arguments_are_refused(model_tok, kw):
    model, tok = model_tok
    with pytest.raises(ValueError):
        sample(model, [[65]], tok.eos_token_id, tok.pad_token_id, **kw)


def test_draw_picks_each_token_with_its_probability():
    """`draw` on a fixed (2, 5) table, 40 000 rows each: frequencies within 5 standard errors of p (zeros never
    drawn), and far from the uniform distribution (the check can fail)."""
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125, 0.0], [0.05, 0.05, 0.1, 0.3, 0.5]])
    torch.manual_seed(0)
    z = draw(p.repeat_interleave(40_000, 0))  # (80 000,)
    for row in range(2):
        freq = torch.bincount(z[row * 40_000 : (row + 1) * 40_000], minlength=5).double() / 40_000
        se = (p[row].double() * (1 - p[row].double()) / 40_000).sqrt()
        assert bool((freq - p[row]).abs().le(5 * se + 1e-12).all()), (freq, p[row])
        assert (freq - 0.2).abs().max() > 0.1
    assert not bool((z[:40_000] == 4).any())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_draw_refuses_non_finite_or_empty_rows(bad):
    with pytest.raises(ValueError, match="cannot sample"):
        draw(torch.tensor([[0.5, bad, 0.5]]))
    with pytest.raises(ValueError, match="cannot sample"):
        draw(torch.zeros(2, 3))


def test_next_token_probs_top_p_and_greedy_by_hand():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]))
    torch.testing.assert_close(
        next_token_probs(z, top_p=0.6), torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.3, 0.5]])
    )
    torch.testing.assert_close(
        next_token_probs(z, top_p=0.5), torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.5]])
    )
    torch.testing.assert_close(next_token_probs(z), torch.softmax(z, -1))
    torch.testing.assert_close(next_token_probs(z, temperature=0.0), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    t = next_token_probs(z, temperature=0.5)
    torch.testing.assert_close(t, torch.softmax(2 * z, -1))


def test_greedy_sampling_is_the_argmax_path(model_tok):
    model, tok = model_tok
    a = sample(model, [[65, 66]], tok.eos_token_id, tok.pad_token_id, n=3, max_new_tokens=5, temperature=0.0)
    assert len({s.input_ids for s in a}) == 1  # every sample is the same greedy path
    ids = list(a[0].input_ids[:2])
    with torch.no_grad():
        for t in a[0].input_ids[2:]:
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            assert nxt == t
            ids.append(nxt)
