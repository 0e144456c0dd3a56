"""SwiGLUProduct: value and gradients equal autograd's silu(a)·b; fuse_swiglu patches exactly the SwiGLU MLPs."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sacpo.models.swiglu import SwiGLUProduct, fuse_swiglu, is_swiglu_mlp


def test_gradcheck_and_equal_to_autograd():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUProduct.apply, (a, b))
    out = SwiGLUProduct.apply(a, b)
    ref = torch.nn.functional.silu(a) * b
    assert torch.equal(out, ref)  # the same expression: bit-identical forward
    w = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    ga, gb = torch.autograd.grad((out * w).sum(), (a, b))
    ra, rb = torch.autograd.grad((ref * w).sum(), (a, b))
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)
    # only the input that needs a gradient gets one
    (ga_only,) = torch.autograd.grad((SwiGLUProduct.apply(a, b.detach()) * w).sum(), (a,))
    torch.testing.assert_close(ga_only, ra)


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.arange(12).reshape(2, 6) % 64
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_fused_llama_trains_like_the_stock_one():
    stock, fused = _llama(), _llama()
    assert len(fuse_swiglu(fused)) == 2  # one MLP per layer
    loss_s, grads_s = _loss_and_grads(stock)
    loss_f, grads_f = _loss_and_grads(fused)
    assert torch.equal(loss_s, loss_f)
    for k in grads_s:
        torch.testing.assert_close(grads_f[k], grads_s[k], rtol=1e-5, atol=1e-7, msg=k)
    assert len(fuse_swiglu(fused)) == 2  # idempotent: the fused forward is still a SwiGLU MLP


def test_with_lora_adapters_on_the_projections():
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["gate_proj", "up_proj", "down_proj"])
    stock, fused = get_peft_model(_llama(), cfg), get_peft_model(_llama(), cfg)
    for m in (stock, fused):  # non-zero B so the adapters change the output
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    assert len(fuse_swiglu(fused)) == 2
    loss_s, grads_s = _loss_and_grads(stock)
    loss_f, grads_f = _loss_and_grads(fused)
    torch.testing.assert_close(loss_f, loss_s, rtol=0, atol=0)
    for k, v in grads_s.items():
        if "lora" in k:
            torch.testing.assert_close(grads_f[k], v, rtol=1e-5, atol=1e-7, msg=k)


class _ClampedMLP(torch.nn.Module):
    """Has the SwiGLU attributes but clamps its product: must not be patched."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(4, 6), torch.nn.Linear(4, 6)
        self.down_proj, self.act_fn = torch.nn.Linear(6, 4), torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj((self.act_fn(self.gate_proj(x)) * self.up_proj(x)).clamp(max=0.01))


@pytest.mark.parametrize(
    "make", [_ClampedMLP, lambda: GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2))]
)
def test_other_modules_are_left_alone(make):
    model = make()
    assert len(fuse_swiglu(model)) == 0
    assert not any(is_swiglu_mlp(m) for m in model.modules())


def test_undo_gives_every_module_its_own_forward_back():
    model = _llama().train()
    first = fuse_swiglu(model)
    second = fuse_swiglu(model)  # stacked: undone in reverse
    assert model.training and all(m.training for m in model.modules())  # the probe restored every mode
    mlps = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(mlps) == 2
    second.undo()
    assert all("forward" in m.__dict__ for m in mlps)  # back to the first patch
    first.undo()
    first.undo()  # idempotent
    assert not any("forward" in m.__dict__ for m in model.modules())
