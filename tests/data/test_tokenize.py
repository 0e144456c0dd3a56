"""Encoding: prompt/response boundaries, EOS, truncation policy, chat templates, padding masks."""

import pytest
import torch

from sacpo.data.formats import pku_safety_binary
from sacpo.data.records import BinaryExample, PairedExample
from sacpo.data.tokenize import (
    encode,
    encode_binary,
    encode_paired,
    encode_prompt,
    mismatched_partners,
    pad_sequences,
    render_prompt,
)
from sacpo.math.preference import kto_reference_point
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
    assert [tok.decode(c.input_ids) for c, _ in enc] == [
        "P0\na<|endoftext|>",
        "P1\nbb<|endoftext|>",
        "P2\nccc<|endoftext|>",
    ]
    # mismatched sequence i = prompt i + the completion of another example; three prompts of one example each:
    # the pairing is a 3-cycle, one of the two rotations
    mismatched = [tok.decode(m.input_ids) for _, m in enc]
    assert mismatched in (
        ["P0\nbb<|endoftext|>", "P1\nccc<|endoftext|>", "P2\na<|endoftext|>"],
        ["P0\nccc<|endoftext|>", "P1\na<|endoftext|>", "P2\nbb<|endoftext|>"],
    )


def _pku_kto_examples(n_rows: int) -> list[BinaryExample]:
    """What data.format=pku_safe_kto makes of n_rows PKU rows: two records per row, same prompt, one after the
    other (a safe refusal, desirable; an unsafe answer written for that prompt, undesirable). Every completion is
    distinct, so a decoded sequence tells which example it came from."""
    rows = [
        {"prompt": f"Q{k}?", "response_0": f"No {k}.", "response_1": f"Do {k}.", "is_response_0_safe": True,
         "is_response_1_safe": False}
        for k in range(n_rows)
    ]  # fmt: skip
    return [ex for row in rows for ex in pku_safety_binary(row)]


def _split(tok, e) -> tuple[str, str]:
    text = tok.decode(e.input_ids)
    return text[: len(tok.decode(e.input_ids[: e.prompt_len]))], text


@pytest.mark.parametrize("n_rows", [2, 3, 8, 25])
def test_kto_mismatched_pairs_never_share_their_prompt(tok, n_rows):
    ex = _pku_kto_examples(n_rows)
    assert ex[0].prompt == ex[1].prompt  # the data where the old (i+1) mod N pairing broke: half shared
    enc = encode_binary(tok, ex, 64, 32)
    completions = [tok.decode(c.input_ids[c.prompt_len :]) for c, _ in enc]
    used = []
    for i, (c, m) in enumerate(enc):
        assert m.input_ids[: m.prompt_len] == c.input_ids[: c.prompt_len]  # prompt i
        response = tok.decode(m.input_ids[m.prompt_len :])
        partners = [j for j, text in enumerate(completions) if text == response]
        assert partners and all(ex[j].prompt != ex[i].prompt for j in partners), (i, response)
        used.append(response)
    # no prompt has more than half the examples: every completion is used exactly once (a permutation)
    assert sorted(used) == sorted(completions)
    # fixed by the seed, not by batch size or processes: the same call gives the same pairs, another seed others
    assert encode_binary(tok, ex, 64, 32) == enc
    if n_rows >= 8:
        assert encode_binary(tok, ex, 64, 32, seed=1) != enc


def test_mismatched_partners_hand_cases(caplog):
    # groups A (2), B (2), C (2): a permutation, no one paired within its group
    keys = ["A", "A", "B", "B", "C", "C"]
    p = mismatched_partners(keys)
    assert sorted(p) == list(range(6)) and all(keys[j] != keys[i] for i, j in enumerate(p))
    # A has 3 of 4 (> half): no permutation exists; every A takes B's completion, B takes an A's, with a warning
    keys = ["A", "B", "A", "A"]
    with caplog.at_level("WARNING", logger="sacpo.data.tokenize"):
        p = mismatched_partners(keys)
    assert [p[0], p[2], p[3]] == [1, 1, 1] and keys[p[1]] == "A"
    assert "3 of the 4" in caplog.text
    caplog.clear()
    # one prompt only: no mismatched pair exists; (i+1) mod N and a warning that says so
    with caplog.at_level("WARNING", logger="sacpo.data.tokenize"):
        assert mismatched_partners(["A", "A", "A"]) == [1, 2, 0]
    assert "share one prompt" in caplog.text
    assert mismatched_partners(["A"]) == [0] and mismatched_partners([]) == []


def test_kto_reference_point_on_pku_kto_data_is_no_longer_pulled_down_by_matched_pairs(tok):
    """Here's the maths. A trained policy whose log-ratio log π/π_ref is −6 on an unsafe answer *under its own
    prompt* (the loss pushed it down) and +2 on any completion under another prompt (the KL the reference point
    should see). 8 prompts × (refusal, unsafe answer):

      old pairing, (i+1) mod N: record 2k → (Q_k, unsafe answer of Q_k) = −6, 8 times; record 2k+1 → (Q_k,
        refusal of Q_{k+1}) = +2, 8 times; mean −2 → z_ref = max(0, −2) = 0 (clamped: the KL term vanishes)
      new pairing: 16 pairs under another prompt, each +2 → z_ref = 2
    """
    ex = _pku_kto_examples(8)
    n = len(ex)

    def log_ratio(prompt: str, completion: str) -> float:
        own_unsafe = completion == f"Do {prompt[1:-1]}."
        return -6.0 if own_unsafe else 2.0

    old = [log_ratio(ex[i].prompt, ex[(i + 1) % n].completion) for i in range(n)]
    assert old.count(-6.0) == 8
    z_old = kto_reference_point(torch.tensor(old), torch.zeros(n))
    new = []
    for _, m in encode_binary(tok, ex, 64, 32):
        prompt, text = _split(tok, m)
        new.append(log_ratio(prompt.rstrip("\n"), text[len(prompt) :].removesuffix("<|endoftext|>")))
    z_new = kto_reference_point(torch.tensor(new), torch.zeros(n))
    assert z_old.item() == 0.0 and z_new.item() == pytest.approx(2.0)


def test_pad_sequences_masks(tok):
    p = encode_prompt(tok, "Q", 8)
    a, b = encode(tok, p, "xy", 16), encode(tok, p, "xyzw", 16)
    batch = pad_sequences([a, b], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"].sum(1).tolist() == [5, 7]
    # labels_mask[t] marks that token t+1 is a response token: 3 for "xy"+EOS, 5 for "xyzw"+EOS
    assert batch["labels_mask"].sum(1).tolist() == [3, 5]
    assert batch["labels_mask"][0].tolist() == [False, True, True, True, False, False]
