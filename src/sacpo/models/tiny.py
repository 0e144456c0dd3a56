"""A tiny GPT-2 and a byte-level tokenizer built locally (no hub), for tests, CI and the toy world.

The tokenizer has one token per byte (256, via GPT-2's byte-to-unicode map) plus `<|endoftext|>` used as
BOS/EOS/PAD, so it encodes any UTF-8 text and needs no training data. Weights are initialised from a seed, so the
same arguments always produce bit-identical files (and the same reference-cache hash).
"""

from __future__ import annotations

from pathlib import Path

from sacpo.fsutil import atomic_dir
from sacpo.rng import torch_seeded

EOS = "<|endoftext|>"


def build_byte_tokenizer():
    """A PreTrainedTokenizerFast with 256 byte tokens + EOS (id 256); no merges, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab[EOS] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=1024
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_tiny_gpt2(
    out_dir: str | Path,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 256,
) -> Path:
    """Write a randomly initialised GPT-2 (safetensors) and the byte tokenizer to `out_dir` (atomically, normal file
    modes); return it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    tokenizer = build_byte_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    with torch_seeded(seed):  # HF init draws from the global RNG: seed it, leave the caller's as is
        model = GPT2LMHeadModel(config)
    with atomic_dir(out) as tmp:  # the old directory (if any) stays until the new one is complete
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
