"""A tiny Llama (2 layers, width 64, the byte tokenizer) as an HF directory and as a GGUF file written with the
`gguf` package the way llama.cpp's converter lays it out: GGUF tensor names, Q/K rows permuted for its rotary
layout, tied output, a gpt2 (byte-level) tokenizer with its chat template. Tensors as F32, F16 or Q8_0."""

from pathlib import Path

import numpy as np
import torch

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
N_HEAD, N_HEAD_KV, N_LAYER = 4, 2, 2
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def tiny_llama(out: Path) -> Path:
    """A seeded tiny LlamaForCausalLM + byte tokenizer (with a chat template) saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sacpo.models.tiny import build_byte_tokenizer
    from sacpo.rng import torch_seeded

    tok = build_byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    eos = tok.eos_token_id
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_HEAD_KV,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    with torch_seeded(0):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (rotary pairs interleaved per head); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(hf_dir: Path, path: Path, kind: str = "F32") -> Path:
    """The model of `hf_dir` (from `tiny_llama`) as a GGUF file; kind F32 | F16 | Q8_0 (the 2-D weights; norms
    stay F32, as llama.cpp writes them)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    state = load_file(hf_dir / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(64 // N_HEAD)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # the bytes are normal, EOS is a control token
    w.add_token_scores([0.0] * len(tokens))  # no merges: the byte vocabulary implies none
    w.add_bos_token_id(tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.eos_token_id)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in state.items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        a = t.float().numpy()
        if "q_proj" in name:
            a = _permute(a, N_HEAD)
        elif "k_proj" in name:
            a = _permute(a, N_HEAD_KV)
        a = np.ascontiguousarray(a)
        if a.ndim == 2 and kind == "Q8_0":
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name(name), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif a.ndim == 2 and kind == "F16":
            w.add_tensor(gguf_name(name), a.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def q8_roundtrip(t: torch.Tensor) -> torch.Tensor:
    """What a Q8_0 file holds for `t`, de-quantised (float32)."""
    import gguf

    a = np.ascontiguousarray(t.float().numpy())
    q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape).copy())
