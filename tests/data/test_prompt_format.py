"""Prompt formats: system prompt None / "none" / a string on a template that injects a default (SmolLM2's), template
overrides from text and from a file, conflicts, plain tokenizers, fingerprints and the first-prompt log."""

import logging
from pathlib import Path

import pytest

from sacpo.config import ConfigError
from sacpo.data.prompt_format import (
    DEFAULT_FORMAT,
    SENTINEL,
    PromptFormat,
    log_first_prompt,
    render_prompt,
)
from sacpo.data.tokenize import encode_prompt
from sacpo.models.load import load_tokenizer
from sacpo.models.tiny import build_byte_tokenizer

SMOLLM2_TEMPLATE = Path(__file__).parents[1] / "assets" / "smollm2_chat_template.jinja"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
Q = "How do I bake bread?"
USER_TURN = f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
SIMPLE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_model):
    return load_tokenizer(tiny_chat_model)


@pytest.fixture(scope="module")
def plain_tok():
    return build_byte_tokenizer()


def test_the_fixture_template_injects_smollm2s_default(chat_tok):
    assert render_prompt(chat_tok, Q) == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n{USER_TURN}"
    assert render_prompt(chat_tok, Q, PromptFormat(None)) == render_prompt(chat_tok, Q)  # None: as before


def test_none_removes_the_default_system_block_entirely(chat_tok):
    text = render_prompt(chat_tok, Q, PromptFormat("none"))
    assert text == USER_TURN
    assert "system" not in text and DEFAULT_SYSTEM not in text and SENTINEL not in text
    conv = (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": Q},
    )
    multi = render_prompt(chat_tok, conv, PromptFormat("none"))
    assert multi == f"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n{USER_TURN}"


def test_a_custom_system_prompt_replaces_the_default(chat_tok):
    text = render_prompt(chat_tok, Q, PromptFormat("Be brief."))
    assert text == f"<|im_start|>system\nBe brief.<|im_end|>\n{USER_TURN}"
    # "" is an empty system message, not "none": the template still writes a (empty) system block
    assert render_prompt(chat_tok, Q, PromptFormat("")) == f"<|im_start|>system\n<|im_end|>\n{USER_TURN}"


def test_a_prompt_with_its_own_system_message(chat_tok):
    conv = ({"role": "system", "content": "Own."}, {"role": "user", "content": Q})
    assert (
        render_prompt(chat_tok, conv) == f"<|im_start|>system\nOwn.<|im_end|>\n{USER_TURN}"
    )  # None keeps it
    for system_prompt in ("none", "Other."):
        with pytest.raises(ConfigError, match="its own system message"):
            render_prompt(chat_tok, conv, PromptFormat(system_prompt))


def test_none_on_a_template_without_a_default_is_the_plain_rendering(plain_tok):
    fmt = PromptFormat("none", SIMPLE)
    assert (
        render_prompt(plain_tok, Q, fmt)
        == f"<user>{Q}<a>"
        == render_prompt(plain_tok, Q, PromptFormat(None, SIMPLE))
    )


def test_none_keeps_a_leading_bos_token(chat_tok):
    """A template that starts with {{ bos_token }} keeps it; only the default system block goes."""
    t = (
        "{{ bos_token }}{% if messages[0]['role'] != 'system' %}[SYS]default[/SYS]{% endif %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[a]{% endif %}"
    )
    bos = chat_tok.bos_token
    assert render_prompt(chat_tok, Q, PromptFormat(None, t)) == f"{bos}[SYS]default[/SYS][user]{Q}[a]"
    assert render_prompt(chat_tok, Q, PromptFormat("none", t)) == f"{bos}[user]{Q}[a]"


def test_none_refuses_a_template_that_folds_the_system_message_into_the_user_turn(plain_tok):
    folding = (
        "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else 'default' %}"
        "{% for m in messages if m['role'] != 'system' %}[INST] {{ sys }} {{ m.content }} [/INST]{% endfor %}"
    )
    with pytest.raises(ConfigError, match="cannot be cut out"):
        render_prompt(plain_tok, Q, PromptFormat("none", folding))
    needs_a_user_turn = (
        "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('no user turn') }}{% endif %}" + SIMPLE
    )
    with pytest.raises(ConfigError, match=r"cannot be cut out.*no user turn"):
        render_prompt(plain_tok, Q, PromptFormat("none", needs_a_user_turn))


def test_chat_template_override_from_text_and_from_a_file(plain_tok, chat_tok, tmp_path):
    assert render_prompt(plain_tok, Q, PromptFormat.from_fields(None, SIMPLE)) == f"<user>{Q}<a>"
    from_file = PromptFormat.from_fields("none", str(SMOLLM2_TEMPLATE))
    assert from_file.template_source == str(SMOLLM2_TEMPLATE)
    assert render_prompt(plain_tok, Q, from_file) == USER_TURN  # the plain tokenizer, SmolLM2's template
    inline = PromptFormat.from_fields("none", SMOLLM2_TEMPLATE.read_text())
    assert inline.fingerprint() == from_file.fingerprint()  # the text counts, not where it came from
    # an override wins over the tokenizer's own template
    assert render_prompt(chat_tok, Q, PromptFormat.from_fields("S", SIMPLE)) == f"<system>S<user>{Q}<a>"
    with pytest.raises(ConfigError, match="neither a Jinja template"):
        PromptFormat.from_fields(None, str(tmp_path / "missing.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ConfigError, match=r"bad\.jinja: line"):
        PromptFormat.from_fields(None, str(bad))


def test_plain_tokenizers_put_a_system_prompt_on_its_own_line(plain_tok):
    assert render_prompt(plain_tok, Q) == render_prompt(plain_tok, Q, PromptFormat("none")) == f"{Q}\n"
    assert render_prompt(plain_tok, Q, PromptFormat("Be brief.")) == f"Be brief.\n{Q}\n"


def test_fingerprints_and_records():
    assert DEFAULT_FORMAT.is_default and not PromptFormat("none").is_default
    fps = {PromptFormat(s).fingerprint() for s in (None, "none", "", "S")}
    assert len(fps) == 4 and PromptFormat("S", SIMPLE).fingerprint() not in fps
    assert DEFAULT_FORMAT.to_json() == {"system_prompt": None, "chat_template": None}
    record = PromptFormat.from_fields("none", SIMPLE).to_json()
    assert record["system_prompt"] == "none" and record["chat_template"]["source"] == "inline"


def test_encode_prompt_uses_the_format(chat_tok):
    default, none = encode_prompt(chat_tok, Q, 512), encode_prompt(chat_tok, Q, 512, fmt=PromptFormat("none"))
    assert chat_tok.decode(none) == USER_TURN and len(default) > len(none)


def test_the_first_prompt_is_logged_escaped_and_clipped(chat_tok, caplog):
    log = logging.getLogger("sacpo.test")
    with caplog.at_level(logging.INFO, logger="sacpo.test"):
        text = log_first_prompt(log, chat_tok, Q, PromptFormat("none"))
        log_first_prompt(log, chat_tok, "x" * 5000, DEFAULT_FORMAT, limit=300)
    first, long = (r.getMessage() for r in caplog.records)
    assert text == USER_TURN and repr(USER_TURN) in first and "\n" not in first
    assert "system_prompt='none'" in first and "chat_template=the tokenizer's" in first
    assert (
        len(long) < 500 and "chars]…" in long and long.rstrip().endswith(repr("<|im_start|>assistant\n")[1:])
    )
