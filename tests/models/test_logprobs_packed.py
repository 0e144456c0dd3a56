"""Shared-prompt rows (prompt + a + b): the same log-probs and gradients as two padded rows, taken only where the
model reproduces them."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sacpo.data.tokenize import Encoded, pack_pairs, pad_sequences
from sacpo.models.logprobs import packed_pair_logps, sequence_logps, supports_packed_pairs


def _gpt2(vocab: int, attn: str = "sdpa") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    cfg._attn_implementation = attn
    return GPT2LMHeadModel(cfg).eval()


def _llama(vocab: int, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def _pairs(vocab: int) -> list[tuple[Encoded, Encoded]]:
    g = torch.Generator().manual_seed(3)
    pairs = []
    for prompt, la, lb in [(4, 5, 2), (7, 1, 6), (1, 3, 3)]:
        p = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        a = torch.randint(0, vocab, (la,), generator=g).tolist()
        b = torch.randint(0, vocab, (lb,), generator=g).tolist()
        pairs.append((Encoded(tuple(p + a), prompt), Encoded(tuple(p + b), prompt)))
    return pairs


def _both(model, pairs, fused, average=False):
    """(padded, packed) log-probs (2B,) and the gradients of a weighted sum of each."""
    weights = torch.tensor([1.0, -2.0, 0.5, 0.3, 1.5, -1.0])
    out = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        if packed:
            logps = packed_pair_logps(model, pack_pairs(pairs, 0), chunk_size=4, average=average, fused=fused)
        else:
            batch = pad_sequences([a for a, _ in pairs] + [b for _, b in pairs], 0)
            logps = sequence_logps(model, batch, chunk_size=4, average=average, fused=fused)
        (logps * weights).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        out.append((logps.detach(), grads))
    return out


@pytest.mark.parametrize(
    "build, vocab, attn, fused",
    [
        (_gpt2, 300, "sdpa", False),
        (_gpt2, 300, "eager", False),
        (_llama, 300, "sdpa", True),
        (_llama, 300, "eager", None),
    ],
    ids=["gpt2-sdpa-full", "gpt2-eager-full", "llama-sdpa-fused-head", "llama-eager-full"],
)
@pytest.mark.parametrize("average", [False, True])
def test_packed_rows_match_padded_rows_in_value_and_gradient(build, vocab, attn, fused, average):
    model = build(vocab, attn)
    pairs = _pairs(vocab)
    (padded, g_padded), (packed, g_packed) = _both(model, pairs, fused, average)
    assert packed.shape == (6,)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert set(g_packed) == set(g_padded)
    for k in g_padded:
        torch.testing.assert_close(g_packed[k], g_padded[k], rtol=1e-4, atol=1e-6, msg=k)


def test_pack_pairs_layout_by_hand():
    a, b = Encoded((10, 11, 12, 13), 2), Encoded((10, 11, 14, 15, 16), 2)
    c, d = Encoded((20, 21), 1), Encoded((20, 22), 1)
    p = pack_pairs([(a, b), (c, d)], pad_id=0)
    assert p["input_ids"].tolist() == [[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 0, 0, 0, 0]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 1, 0, 0, 0, 0]]
    allowed = p["allowed"][0, 0].int().tolist()
    assert allowed[3] == [1, 1, 1, 1, 0, 0, 0]  # a's last token: prompt and a
    assert allowed[4] == [1, 1, 0, 0, 1, 0, 0]  # b's first token: prompt and itself, not a
    assert allowed[6] == [1, 1, 0, 0, 1, 1, 1]
    assert p["allowed"][1, 0, 4].int().tolist() == [0, 0, 0, 0, 1, 0, 0]  # padding sees itself only
    # (src → label, sequence): a from its previous token, b's first from the prompt's last token (index 1)
    got = list(zip(p["src"].tolist(), p["label"].tolist(), p["seq"].tolist(), strict=True))
    assert got == [(1, 2, 0), (2, 3, 0), (1, 4, 2), (4, 5, 2), (5, 6, 2), (7, 8, 1), (7, 9, 3)]


@pytest.mark.parametrize(
    "pair, message",
    [
        ((Encoded((1, 2, 3), 2), Encoded((1, 5, 3), 2)), "share"),  # different prompts
        ((Encoded((1, 2, 3), 0), Encoded((1, 2, 4), 0)), "share"),  # no prompt
        ((Encoded((1, 2, 3), 2), Encoded((1, 2, 3, 4), 3)), "share"),  # prompt lengths differ
    ],
)
def test_pack_pairs_refuses_pairs_without_a_shared_prompt(pair, message):
    with pytest.raises(ValueError, match=message):
        pack_pairs([pair], pad_id=0)


def test_the_probe_accepts_sdpa_and_eager_and_refuses_a_model_that_ignores_position_ids(monkeypatch):
    assert supports_packed_pairs(_gpt2(300, "sdpa")) and supports_packed_pairs(_llama(300, "eager"))
    probed = _gpt2(300, "sdpa")
    assert (
        supports_packed_pairs(probed) and "_sacpo_packed_pairs" not in probed.__dict__
    )  # nothing cached on it
    model = _gpt2(300)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, position_ids=None, **k: forward(*a, **k))
    assert not supports_packed_pairs(model)  # positions restart at P for b: without them b is wrong
    unknown = _llama(300)
    unknown.config._attn_implementation = "flash_attention_2"
    assert not supports_packed_pairs(unknown)


def test_the_reference_pass_packs_pairs_that_share_a_prompt_and_pads_the_others(monkeypatch):
    from sacpo.models import logprobs
    from sacpo.train import ref_cache

    model = _llama(300)
    pairs = _pairs(300)
    calls = []
    real = logprobs.packed_pair_logps
    monkeypatch.setattr(ref_cache, "packed_pair_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    padded = ref_cache.compute_ref_logps(
        model, pairs, 0, batch_size=4, show_progress=False, share_prompt=False
    )
    assert not calls
    packed = ref_cache.compute_ref_logps(model, pairs, 0, batch_size=4, show_progress=False)
    assert len(calls) == 2  # 3 pairs, 2 per batch
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert padded.shape == (3, 2)
    # one pair without a shared prompt: the whole pass takes padded rows
    odd = [*pairs, (Encoded((1, 2, 3), 2), Encoded((4, 5, 6), 2))]
    mixed = ref_cache.compute_ref_logps(model, odd, 0, batch_size=4, show_progress=False)
    assert len(calls) == 2
    torch.testing.assert_close(mixed[:3], padded)
