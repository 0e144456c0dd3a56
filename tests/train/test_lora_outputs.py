"""LoRA stage outputs: adapter-only (the default), merged, both; a step-2 adapter stacked on a step-1 adapter.

An adapter-only output loads (sacpo.models.load.load_model) to the same logits as the merged output of the same
training, is much smaller, and a stacked step-2 adapter reconstructs base ⊕ Δ1 ⊕ Δ2."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sacpo.config import from_dict
from sacpo.models.adapters import CHAIN_FILE, is_adapter_dir, read_chain
from sacpo.models.load import ModelLoadError, fingerprint_model, load_model, load_tokenizer, model_files
from sacpo.train.config import TrainConfig, same_computation
from sacpo.train.loop import is_done, train

FAST = {
    "max_steps": 3,
    "batch_size": 8,
    "lr": 1e-2,
    "warmup_ratio": 0.0,
    "max_length": 80,
    "max_prompt_length": 40,
    "log_every": 3,
    "kl_prompts": 0,
    "eval_fraction": 0.2,
}
LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """One intra-op thread (tests/conftest.py)."""


def cfg(policy, data, out, fmt="pku_helpful", save="adapter", **kw) -> TrainConfig:
    fields = {
        **FAST,
        "policy": str(policy),
        "output_dir": str(out),
        "data": {"source": str(data), "format": fmt},
        "lora": {**LORA, "save": save},
        "cache_dir": str(out.parent / ".ref_cache"),
    }
    fields.update(kw)
    return from_dict(TrainConfig, fields)


def logits(model_dir, ids):
    with torch.no_grad():
        return load_model(model_dir).eval()(ids).logits


def dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 200, 11]])


@pytest.fixture(scope="module")
def runs(tiny_model, pku_tiny, tmp_path_factory):
    """Step 1 written both ways (same training), and step 2 on each: on the step-1 adapter and on the merged
    step-1 model."""
    root = tmp_path_factory.mktemp("lora")
    step1_adapter = train(cfg(tiny_model, pku_tiny, root / "s1-adapter"), show_progress=False)
    step1_both = train(cfg(tiny_model, pku_tiny, root / "s1-both", save="both"), show_progress=False)
    safe = {"fmt": "pku_safe", "beta": 0.05, "seed": 1}
    step2_adapter = train(
        cfg(step1_adapter.model_dir, pku_tiny, root / "s2-adapter", **safe), show_progress=False
    )
    step2_merged = train(
        cfg(step1_both.model_dir, pku_tiny, root / "s2-merged", save="merged", **safe), show_progress=False
    )
    return {
        "root": root,
        "s1-adapter": step1_adapter,
        "s1-both": step1_both,
        "s2-adapter": step2_adapter,
        "s2-merged": step2_merged,
    }


def test_adapter_only_output_is_small_and_loads_to_the_merged_models_logits(runs, tiny_model):
    out = runs["s1-adapter"].output_dir
    model = out / "model"
    assert is_done(out) and is_adapter_dir(model) and not (out / "adapter").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", CHAIN_FILE, "tokenizer_config.json"} <= {
        f.name for f in model.iterdir()
    }
    assert json.loads((out / "summary.json").read_text())["model_format"] == "adapter"
    chain = read_chain(model)
    assert chain.base == tiny_model.resolve() and chain.adapters == (model,)
    merged = runs["s1-both"].output_dir / "model"
    assert dir_bytes(model) < 0.5 * dir_bytes(
        merged
    )  # the tiny model is mostly tokenizer; SmolLM2: 2 MB vs 517 MB
    assert (model / "adapter_model.safetensors").stat().st_size < 0.2 * (
        merged / "model.safetensors"
    ).stat().st_size
    ref = logits(tiny_model, IDS)
    got, want = logits(model, IDS), logits(merged, IDS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - ref).abs().max() > 1e-3  # it trained: not the base
    assert load_tokenizer(model).get_vocab() == load_tokenizer(tiny_model).get_vocab()


def test_both_writes_the_dense_model_and_an_adapter_with_its_chain(runs, tiny_model):
    out = runs["s1-both"].output_dir
    assert not is_adapter_dir(out / "model") and is_adapter_dir(out / "adapter")
    assert read_chain(out / "adapter").base == tiny_model.resolve()
    torch.testing.assert_close(logits(out / "adapter", IDS), logits(out / "model", IDS), rtol=0, atol=1e-6)
    dense = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in k for k in dense)


def test_stacked_step2_adapter_reconstructs_base_plus_both_adapters(runs, tiny_model):
    s1 = runs["s1-adapter"].model_dir
    s2 = runs["s2-adapter"].model_dir
    chain = read_chain(s2)
    assert chain.base == tiny_model.resolve() and chain.adapters == (s1.resolve(), s2)
    record = json.loads((s2 / CHAIN_FILE).read_text())
    assert record["parents"][0]["path"] == str(s1.resolve())
    # the same step 2 trained on the merged step-1 model and written merged: same weights up to rounding
    got, want = logits(s2, IDS), logits(runs["s2-merged"].model_dir, IDS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - logits(s1, IDS)).abs().max() > 1e-3  # step 2 moved it
    torch.manual_seed(0)
    load_model(
        s2
    )  # peft draws to initialise the adapters it then loads: undone, or step 2's LoRA init would move
    after_load = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_load, torch.rand(3))
    a1 = json.loads((s1 / "adapter_config.json").read_text())
    assert a1["base_model_name_or_path"] == str(tiny_model.resolve())


def test_adapter_chain_fingerprint_is_content_not_path(runs, tmp_path):
    s1, s2 = runs["s1-adapter"].model_dir, runs["s2-adapter"].model_dir
    assert (
        len({fingerprint_model(s1), fingerprint_model(s2), fingerprint_model(runs["s1-both"].model_dir)}) == 3
    )
    copy = tmp_path / "copy"
    shutil.copytree(s1, copy)
    assert fingerprint_model(copy) == fingerprint_model(s1)  # same content elsewhere: same fingerprint
    assert {f.name for f in model_files(s2)[1]} >= {"config.json", "adapter_model.safetensors", CHAIN_FILE}
    # a changed adapter weight changes the fingerprint of every chain it is in
    other = tmp_path / "other"
    shutil.copytree(s1, other)
    from safetensors.torch import save_file

    tensors = load_file(other / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, other / "adapter_model.safetensors")
    assert fingerprint_model(other) != fingerprint_model(s1)


def test_a_retrained_parent_is_refused_and_a_moved_run_still_loads(runs, tmp_path):
    root = runs["root"]
    moved = tmp_path / "moved"
    for name in ("s1-adapter", "s2-adapter"):
        shutil.copytree(root / name, moved / name)
    s2 = moved / "s2-adapter" / "model"
    record = json.loads((s2 / CHAIN_FILE).read_text())
    record["parents"][0]["path"] = str(tmp_path / "gone")  # absolute path gone: the relative one is used
    (s2 / CHAIN_FILE).write_text(json.dumps(record))
    assert read_chain(s2).parents == ((moved / "s1-adapter" / "model").resolve(),)
    torch.testing.assert_close(logits(s2, IDS), logits(runs["s2-adapter"].model_dir, IDS), rtol=0, atol=0)
    from safetensors.torch import save_file

    parent = moved / "s1-adapter" / "model" / "adapter_model.safetensors"
    tensors = load_file(parent)
    save_file({k: v * 2 for k, v in tensors.items()}, parent)
    with pytest.raises(ModelLoadError, match="changed after this adapter was trained"):
        load_model(s2)


def test_a_plain_peft_adapter_loads_on_its_base(tiny_model, tmp_path):
    """An adapter written by peft alone (no sacpo_adapter.json): base = base_model_name_or_path."""
    from peft import LoraConfig, get_peft_model

    model = load_model(tiny_model)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    )
    with torch.no_grad():
        want = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / CHAIN_FILE).exists()
    torch.testing.assert_close(logits(tmp_path / "plain", IDS), want, rtol=0, atol=1e-5)
    assert load_tokenizer(tmp_path / "plain").get_vocab() == load_tokenizer(tiny_model).get_vocab()
    cfg_file = tmp_path / "plain" / "adapter_config.json"
    cfg_file.write_text(cfg_file.read_text().replace(str(tiny_model), "some-org/some-hub-model"))
    with pytest.raises(ModelLoadError, match="not a local directory"):
        load_model(tmp_path / "plain")


def test_lora_save_is_an_output_setting_old_lora_runs_meant_both(tiny_model, pku_tiny, tmp_path):
    import yaml

    from sacpo.config import to_yaml

    current = cfg(tiny_model, pku_tiny, tmp_path / "x")
    old = yaml.safe_load(to_yaml(cfg(tiny_model, pku_tiny, tmp_path / "x", save="both")))
    del old["lora"]["save"]  # a config.yaml written before lora.save existed
    assert same_computation(yaml.safe_dump(old), cfg(tiny_model, pku_tiny, tmp_path / "x", save="both"))
    assert not same_computation(yaml.safe_dump(old), current)  # now adapter-only: rewritten
    full = cfg(tiny_model, pku_tiny, tmp_path / "x", lora={"enabled": False})
    old_full = yaml.safe_load(to_yaml(full))
    del old_full["lora"]["save"]
    assert same_computation(yaml.safe_dump(old_full), full)  # without LoRA the field means nothing


def test_reference_cache_keys_an_adapter_chain_by_content(runs, pku_tiny, tmp_path):
    """A stage whose reference is an adapter (SACPO step 2 on a LoRA step 1) reads the cache when the chain's
    content is the same — also from another directory — and recomputes when an adapter's weights change."""
    from safetensors.torch import save_file

    from sacpo.data.loaders import load_examples
    from sacpo.data.tokenize import encode_paired
    from sacpo.train.ref_cache import reference_logps

    s2 = runs["s2-adapter"].model_dir
    tok = load_tokenizer(s2)
    pairs = encode_paired(tok, load_examples(str(pku_tiny), "pku_safe"), 80, 40)
    cache = tmp_path / "cache"
    first = reference_logps(s2, tok, pairs, cache, 80, show_progress=False)
    dense = reference_logps(runs["s2-merged"].model_dir, tok, pairs, tmp_path / "c2", 80, show_progress=False)
    torch.testing.assert_close(first.logps, dense.logps, rtol=0, atol=1e-4)  # the same model, up to rounding
    root = tmp_path / "copy"
    for name in ("s1-adapter", "s2-adapter"):
        shutil.copytree(runs["root"] / name / "model", root / name / "model")
    copy = root / "s2-adapter" / "model"
    record = json.loads((copy / CHAIN_FILE).read_text())
    record["parents"][0]["path"] = str(root / "s1-adapter" / "model")
    (copy / CHAIN_FILE).write_text(json.dumps(record))
    hit = reference_logps(copy, tok, pairs, cache, 80, show_progress=False)
    assert not hit.computed and hit.path == first.path
    weights = copy / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1.5 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    changed = reference_logps(copy, tok, pairs, cache, 80, show_progress=False)
    assert changed.computed and changed.path != first.path
    assert (changed.logps - first.logps).abs().max() > 1e-4


def test_tokenizer_files_equal_to_the_base_are_not_copied(tiny_model, pku_tiny, tmp_path):
    """A base whose tokenizer files are what training re-saves (SmolLM2's are): the adapter keeps only its own files
    and its tokenizer is read from the base."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    load_tokenizer(tiny_model).save_pretrained(base)  # with the pad token load_tokenizer sets
    out = train(cfg(base, pku_tiny, tmp_path / "run", max_steps=1), show_progress=False).model_dir
    assert sorted(f.name for f in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        CHAIN_FILE,
    ]
    assert load_tokenizer(out).get_vocab() == load_tokenizer(base).get_vocab()
    assert logits(out, IDS).shape == (1, IDS.shape[1], len(load_tokenizer(base)))
    assert read_chain(out).base == base.resolve()
