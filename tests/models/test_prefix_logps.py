"""Log-probs with every prompt prefilled once (KV cache) equal one full forward pass per sequence; the sampler's own
log π of what it drew equals that pass too."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sacpo.data.tokenize import Encoded
from sacpo.models.generate import sample, sample_with_logps
from sacpo.models.logprobs import batched_sequence_logps
from sacpo.models.prefix_logps import PromptCachedLogps

VOCAB = 300
PAD = 0


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    ).eval()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _seqs() -> list[Encoded]:
    """3 prompts of different lengths, 1–3 responses each of 1–6 tokens (one response of one token, one prompt
    repeated out of order), plus a sequence with an empty response."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 9)]
    seqs = []
    for p, lengths in zip(prompts, [(3, 1, 6), (4,), (2, 5)], strict=True):
        for n in lengths:
            seqs.append(Encoded(tuple(p + torch.randint(1, VOCAB, (n,), generator=g).tolist()), len(p)))
    seqs.append(Encoded((*prompts[0], 7, 8), len(prompts[0])))  # prompt 0 again, after the others
    seqs.append(Encoded(tuple(prompts[1]), len(prompts[1])))  # no response: log π = 0
    return seqs


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_prompt_cached_logps_equal_the_full_pass(build, batch_size):
    model, seqs = build(), _seqs()
    want = batched_sequence_logps(model, seqs, PAD, batch_size=4)  # (N,)
    got = PromptCachedLogps(model, PAD)(seqs, batch_size=batch_size)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert got[-1] == 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.equal(got[:3], got[3:6])  # different sequences, different values (the check can fail)


def test_prefills_are_kept_across_calls_within_the_budget():
    model, seqs = _gpt2(), _seqs()
    scorer = PromptCachedLogps(model, PAD)
    first = scorer(seqs, batch_size=2)
    assert scorer.prefill_runs == 2  # 3 distinct prompts, 2 per prefill
    again = scorer(seqs, batch_size=2)
    assert scorer.prefill_runs == 2 and torch.equal(first, again)  # the kept cache is not consumed by a use
    assert scorer.cached_bytes > 0
    uncached = PromptCachedLogps(model, PAD, max_cache_bytes=0)
    uncached(seqs, batch_size=2)
    uncached(seqs, batch_size=2)
    assert uncached.prefill_runs == 4 and uncached.cached_bytes == 0
    torch.testing.assert_close(uncached(seqs, batch_size=2), first, rtol=0, atol=0)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_sampler_logps_are_the_full_pass_of_the_drawn_ids(build, temperature, top_p):
    """log π of the untempered model, whatever the decoding rule drew with; the same draws as `sample`."""
    model = build()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 8, 1)]
    eos = 5
    torch.manual_seed(2)
    seqs, logps = sample_with_logps(model, prompts, eos, PAD, n=3, max_new_tokens=7, temperature=temperature,
                                    batch_size=2, top_p=top_p)  # fmt: skip
    torch.manual_seed(2)
    plain = sample(model, prompts, eos, PAD, n=3, max_new_tokens=7, temperature=temperature, batch_size=2,
                   top_p=top_p)  # fmt: skip
    assert seqs == plain  # no extra random numbers drawn
    want = batched_sequence_logps(model, seqs, PAD, batch_size=4)
    assert logps.dtype == torch.float64 and logps.shape == (9,)
    torch.testing.assert_close(logps, want, rtol=0, atol=1e-5)
    assert (logps < 0).all()


def test_sampler_logps_stop_at_eos():
    """A row that ends at EOS counts the EOS and nothing after it (finished rows are fed pad tokens)."""
    model = _gpt2()
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[11, 12]])).logits[0, -1]
    eos = int(logits.argmax())  # greedy: the first token is EOS for this prompt
    seqs, logps = sample_with_logps(model, [[11, 12], [40, 41, 42]], eos, PAD, n=1, max_new_tokens=6,
                                    temperature=0.0)  # fmt: skip
    assert seqs[0].input_ids[2:] == (eos,)
    assert logps[0].item() == pytest.approx(torch.log_softmax(logits, -1)[eos].item(), abs=1e-6)
    torch.testing.assert_close(logps, batched_sequence_logps(model, seqs, PAD), rtol=0, atol=1e-5)
