"""The fused-LM-head log-probs equal the full-logits path in value and gradient, and are taken when they should."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sacpo.data.tokenize import Encoded, pad_sequences
from sacpo.models import logprobs
from sacpo.models.logprobs import FUSED_MIN_VOCAB, response_token_logps, sequence_logps


def _gpt2(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def _llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    seqs = []
    for length, prompt in [(9, 4), (14, 6), (5, 2)]:
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        seqs.append(Encoded(tuple(ids), prompt))
    return pad_sequences(seqs, pad_id=0)


def _grads(model, batch, fused):
    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, batch, chunk_size=4, fused=fused)  # 4 rows per chunk: several chunks
    (out * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2-tied", "llama-untied"])
def test_fused_head_matches_full_logits_in_value_and_gradient(build):
    model = build(300)
    batch = _batch(300)
    full, g_full = _grads(model, batch, fused=False)
    fused, g_fused = _grads(model, batch, fused=True)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)
    assert set(g_full) == set(g_fused)
    for k in g_full:
        torch.testing.assert_close(g_fused[k], g_full[k], rtol=1e-4, atol=1e-6, msg=k)
    token = response_token_logps(model, batch, fused=True)
    assert token.shape == batch["labels_mask"].shape
    assert bool((token[~batch["labels_mask"]] == 0).all()) and bool((token[batch["labels_mask"]] < 0).all())


def test_auto_takes_the_fused_path_from_the_vocabulary_threshold(monkeypatch):
    calls = []
    real = logprobs._fused_token_logps
    monkeypatch.setattr(logprobs, "_fused_token_logps", lambda *a: calls.append(1) or real(*a))
    small, large = _gpt2(300), _gpt2(FUSED_MIN_VOCAB)
    sequence_logps(small, _batch(300))
    assert calls == []
    sequence_logps(large, _batch(300))
    assert calls == [1]
    sequence_logps(large, _batch(300), fused=False)
    assert calls == [1]


def test_heads_that_are_not_plain_fall_back_to_full_logits():
    model = _llama(300)
    model.config.final_logit_softcapping = 30.0
    assert logprobs._plain_lm_head(model) is None
    model = _gpt2(300)
    model.lm_head = torch.nn.Linear(32, 300, bias=True)
    assert logprobs._plain_lm_head(model) is None
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_gpt2(300), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert logprobs._plain_lm_head(model) is not None  # adapters in the backbone: the head is still plain
    batch = _batch(300)
    torch.testing.assert_close(
        sequence_logps(model, batch, fused=True),
        sequence_logps(model, batch, fused=False),
        rtol=1e-5,
        atol=1e-5,
    )


def test_fused_head_function_passes_gradcheck_and_skips_a_frozen_head():
    """Hand-written backward of `_FusedHeadLogps` against finite differences (float64, 3 chunks of ≤ 2 rows);
    with a frozen head (LoRA) only ∂h is computed."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, 3, 3, 1])

    def fn(h_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        return logprobs._FusedHeadLogps.apply(h_, w_, labels, 2).double()

    assert torch.autograd.gradcheck(fn, (h, w), eps=1e-6, atol=1e-5)
    expected = torch.log_softmax(h @ w.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(fn(h, w), expected)
    frozen = w.detach()
    (fn(h, frozen) * torch.arange(5.0, dtype=torch.float64)).sum().backward()
    assert h.grad is not None and frozen.grad is None


def test_a_parallel_wrapper_gets_the_full_logits_path(tmp_path):
    """The fused head calls the backbone directly, which would skip a DDP / FSDP / DeepSpeed forward: under such a
    wrapper the full-logits path runs (same values), and head_path says why."""
    import torch.distributed as dist

    model, batch = _llama(FUSED_MIN_VOCAB), _batch(FUSED_MIN_VOCAB)
    assert logprobs.head_path(model).fused
    full = sequence_logps(model, batch, fused=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        path = logprobs.head_path(ddp)
        assert not path.fused and "DistributedDataParallel" in path.reason
        torch.testing.assert_close(sequence_logps(ddp, batch), full, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()

    class DeepSpeedEngine(torch.nn.Module):  # stands in for deepspeed's engine (matched by class name)
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *a, **k):
            return self.module(*a, **k)

        def __getattr__(self, name):  # like the engine, it hands out the wrapped model's attributes
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    engine = DeepSpeedEngine(model)
    assert logprobs._plain_lm_head(engine) is not None  # the head alone would look fusable
    assert not logprobs.head_path(engine).fused and "DeepSpeedEngine" in logprobs.head_path(engine).reason
    torch.testing.assert_close(sequence_logps(engine, batch), full, rtol=0, atol=0)
