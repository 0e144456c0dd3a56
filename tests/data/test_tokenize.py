"""Encoding: prompt/response boundaries, EOS, truncation policy, chat templates, padding masks."""

import pytest

from sacpo.data.records import BinaryExample, PairedExample
from sacpo.data.tokenize import (
    encode,
    encode_binary,
    encode_paired,
    encode_prompt,
    pad_sequences,
    render_prompt,
)
from sacpo.models.tiny import build_byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def test_plain_prompt_and_response_end_with_eos(tok):
    p = encode_prompt(tok, "Hi?", max_prompt_length=50)
    assert tok.decode(p) == "Hi?\n"
    e = encode(tok, p, "Yes.", max_length=50)
    assert e.prompt_len == 4 and e.response_len == 5  # "Yes." + EOS
    assert e.input_ids[-1] == tok.eos_token_id
    assert tok.decode(e.input_ids[: e.prompt_len]) == "Hi?\n"


def test_truncation_keeps_prompt_end_and_cuts_response(tok):
    p = encode_prompt(tok, "0123456789?", max_prompt_length=4)
    assert tok.decode(p) == "89?\n"  # the end of the prompt is kept
    e = encode(tok, p, "abcdefgh", max_length=7)
    assert len(e.input_ids) == 7 and tok.decode(e.input_ids[4:]) == "abc"  # response cut, EOS dropped
    with pytest.raises(ValueError, match="no room"):
        encode(tok, p, "x", max_length=4)


def test_chat_template_is_applied_when_present(tok):
    t = build_byte_tokenizer()
    t.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert render_prompt(t, "Hi") == "<user>Hi<assistant>"
    conv = ({"role": "system", "content": "S"}, {"role": "user", "content": "Q"})
    assert render_prompt(t, conv) == "<system>S<user>Q<assistant>"
    assert render_prompt(tok, conv) == "S\nQ\n"  # no template: plain join


def test_paired_share_prompt_and_binary_mismatched_pairs(tok):
    pairs = encode_paired(tok, [PairedExample("Q", "good", "bad")], 64, 32)
    ((c, r),) = pairs
    assert c.input_ids[: c.prompt_len] == r.input_ids[: r.prompt_len]
    ex = [BinaryExample("P0", "a", True), BinaryExample("P1", "bb", False), BinaryExample("P2", "ccc", True)]
    enc = encode_binary(tok, ex, 64, 32)
    # mismatched sequence i = prompt i + completion of example (i+1) mod N
    assert [tok.decode(m.input_ids) for _, m in enc] == [
        "P0\nbb<|endoftext|>",
        "P1\nccc<|endoftext|>",
        "P2\na<|endoftext|>",
    ]


def test_pad_sequences_masks(tok):
    p = encode_prompt(tok, "Q", 8)
    a, b = encode(tok, p, "xy", 16), encode(tok, p, "xyzw", 16)
    batch = pad_sequences([a, b], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"].sum(1).tolist() == [5, 7]
    # labels_mask[t] marks that token t+1 is a response token: 3 for "xy"+EOS, 5 for "xyzw"+EOS
    assert batch["labels_mask"].sum(1).tolist() == [3, 5]
    assert batch["labels_mask"][0].tolist() == [False, True, True, True, False, False]
