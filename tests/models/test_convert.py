"""`sacpo import` (sacpo.models.convert): an HF directory or a GGUF file (tiny Llama written with the `gguf`
package: F32, F16, Q8_0) → an HF safetensors directory with the same logits, tokenizer and chat template."""

import json

import pytest
import torch
from gguf_helpers import CHAT_TEMPLATE, q8_roundtrip, tiny_llama, write_gguf
from safetensors.torch import load_file

from sacpo.cli import main
from sacpo.models.convert import import_model, source_dtype
from sacpo.models.dtypes import checkpoint_dtype
from sacpo.models.load import ModelLoadError, load_model, load_tokenizer

IDS = torch.tensor([[72, 105, 33, 256, 5, 200, 31]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "hf")


@pytest.fixture(scope="module")
def ggufs(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {kind: write_gguf(llama, root / f"tiny-{kind}.gguf", kind) for kind in ("F32", "F16", "Q8_0")}


def _logits(model_dir, dtype=None):
    with torch.no_grad():
        return load_model(model_dir, dtype=dtype).eval()(IDS).logits


def test_hf_directory_import_gives_the_same_model(tiny_model, llama, tmp_path):
    for src in (tiny_model, llama):
        out = import_model(src, tmp_path / src.name)
        assert torch.equal(_logits(out), _logits(src))
        assert checkpoint_dtype(out) == torch.float32
        a, b = load_tokenizer(src), load_tokenizer(out)
        assert a("héllo <|endoftext|>").input_ids == b("héllo <|endoftext|>").input_ids
        assert a.chat_template == b.chat_template
    assert load_tokenizer(tmp_path / "hf").chat_template == CHAT_TEMPLATE
    assert not list(tmp_path.glob("*.tmp*")) and sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "hf"]


def test_hf_import_in_bf16_is_half_the_size_and_the_bf16_model(llama, tmp_path):
    out = import_model(llama, tmp_path / "bf16", dtype="bf16")
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ratio = (out / "model.safetensors").stat().st_size / (llama / "model.safetensors").stat().st_size
    assert ratio == pytest.approx(0.5, abs=0.02)
    assert torch.equal(_logits(out, torch.bfloat16), _logits(llama, torch.bfloat16))
    back = import_model(out, tmp_path / "auto")  # auto keeps bf16
    assert checkpoint_dtype(back) == torch.bfloat16 and source_dtype(out) == torch.bfloat16


def test_gguf_f32_import_is_exact(llama, ggufs, tmp_path):
    out = import_model(ggufs["F32"], tmp_path / "f32")
    assert source_dtype(ggufs["F32"]) == torch.float32 and checkpoint_dtype(out) == torch.float32
    assert torch.equal(_logits(out), _logits(llama))  # Q/K permutation undone, tied head rebuilt
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    tok = load_tokenizer(out)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|endoftext|>"
    assert tok("héllo").input_ids == load_tokenizer(llama)("héllo").input_ids
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # a plain, trainable model
    assert getattr(model, "hf_quantizer", None) is None


def test_gguf_f16_auto_is_fp16(llama, ggufs, tmp_path):
    out = import_model(ggufs["F16"], tmp_path / "f16")
    weights = load_file(out / "model.safetensors")
    assert source_dtype(ggufs["F16"]) == torch.float16
    assert {t.dtype for t in weights.values()} == {torch.float16}  # the F32 norms too: one dtype per model
    ref = load_file(llama / "model.safetensors")
    assert torch.equal(weights["model.embed_tokens.weight"], ref["model.embed_tokens.weight"].half())


def test_gguf_q8_0_is_dequantised_to_fp32_or_the_dtype_asked_for(llama, ggufs, tmp_path):
    out = import_model(ggufs["Q8_0"], tmp_path / "q8")
    assert source_dtype(ggufs["Q8_0"]) == torch.float32  # auto for a quantised file
    ref = load_file(llama / "model.safetensors")
    got = load_file(out / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(got[name], q8_roundtrip(ref[name]))  # the file's values, exactly
    assert torch.equal(got["model.norm.weight"], ref["model.norm.weight"])
    assert (_logits(out) - _logits(llama)).abs().max() < 0.05  # 8-bit weights: close, not equal
    half = import_model(ggufs["Q8_0"], tmp_path / "q8-bf16", dtype="bf16")
    h = load_file(half / "model.safetensors")
    assert torch.equal(h["model.embed_tokens.weight"], got["model.embed_tokens.weight"].bfloat16())


def test_bad_sources_are_refused_and_write_nothing(tiny_model, tmp_path):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((tiny_model / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF not really")
    (tmp_path / "weights.txt").write_text("")
    quantised = tmp_path / "quantised"
    import shutil

    shutil.copytree(tiny_model, quantised)
    config = json.loads((quantised / "config.json").read_text())
    (quantised / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "bnb"}})
    )
    cases = {
        "nothing": "no such GGUF file or model directory",
        "pickled": "pickle",
        "broken.gguf": "cannot import",
        "weights.txt": "not a .gguf file",
        "quantised": "quantised checkpoint",
    }
    for name, message in cases.items():
        with pytest.raises(ModelLoadError, match=message):
            import_model(tmp_path / name, tmp_path / "out")
        assert not (tmp_path / "out").exists(), name


def test_the_import_command(ggufs, llama, tmp_path, capsys):
    assert main(["-q", "import", str(ggufs["F32"]), str(tmp_path / "m"), "--dtype", "bf16"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert torch.equal(_logits(tmp_path / "m", torch.bfloat16), _logits(llama, torch.bfloat16))
    assert main(["-q", "import", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "no such GGUF file or model directory" in capsys.readouterr().err
