"""Plain LoRA chains merge into a loaded model without peft, to the weights peft's merge_and_unload writes."""

import pytest
import torch

import sacpo.models.lora_factors as lora_factors
from sacpo.math.merging import MergeError
from sacpo.models.adapters import save_adapter
from sacpo.models.load import load_model, load_tokenizer


def _adapter(below, out, seed, **extra):
    """A LoRA adapter (random A and B) on the model of `below`, saved as a sacpo adapter directory."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False, **extra)
    model = get_peft_model(load_model(below), cfg)
    out.mkdir(parents=True)
    save_adapter(model, load_tokenizer(below), out, out, below)
    return out


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def chain(tiny_model, tmp_path):
    first = _adapter(tiny_model, tmp_path / "a1", seed=1)
    return first, _adapter(first, tmp_path / "a2", seed=2)


def test_a_plain_chain_merges_to_peft_s_weights_bit_for_bit(chain, tiny_model, monkeypatch):
    fast = _state(load_model(chain[1]))
    base = _state(load_model(tiny_model))

    def refuse(*a, **k):
        raise MergeError("forced: peft's path")

    monkeypatch.setattr(lora_factors, "merge_into", refuse)
    slow = _state(load_model(chain[1]))
    assert fast.keys() == slow.keys()
    assert all(torch.equal(fast[k], slow[k]) for k in fast)
    changed = [k for k in fast if not torch.equal(fast[k], base[k])]
    assert changed and all(k.endswith(("c_attn.weight", "c_proj.weight")) for k in changed)


def test_other_adapters_go_through_peft(tiny_model, tmp_path, monkeypatch):
    """An adapter with a full module copy (modules_to_save) is not plain LoRA: peft merges it."""
    import peft

    calls = []
    real = peft.PeftModel.from_pretrained
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = _adapter(tiny_model, tmp_path / "plain", seed=1)
    load_model(plain)
    assert calls == []
    saved = _adapter(tiny_model, tmp_path / "saved", seed=1, modules_to_save=["ln_f"])
    load_model(saved)
    assert calls == [1]


def test_merge_into_leaves_the_model_unchanged_when_a_module_is_missing(chain, tiny_model):
    model = load_model(tiny_model)
    before = _state(model)
    lora = lora_factors.read_lora(chain[0])
    import dataclasses

    extra = {"transformer.h.9.attn.c_attn": next(iter(lora.modules.values()))}  # a 10th block the model lacks
    bad = dataclasses.replace(lora, modules={**lora.modules, **extra})
    with pytest.raises(MergeError, match="not in the model"):
        lora_factors.merge_into(model, [bad])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
