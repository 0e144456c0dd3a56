"""Prompt files: every suffix, U+2028 inside a JSON string, and errors as ConfigError."""

import json

import pytest

from sacpo.config import ConfigError
from sacpo.data.prompts import load_prompts


def test_jsonl_lines_are_split_on_newline_only(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(
        json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\r\n\n" + json.dumps({"prompt": "c"})
    )
    assert load_prompts(p) == ["a\u2028b", "c"]


def test_txt_json_splits_and_conversations(tmp_path):
    (tmp_path / "p.txt").write_text("x\n\ny\n")
    assert load_prompts(tmp_path / "p.txt") == ["x", "y"]
    conv = [{"role": "user", "content": "hi"}]
    (tmp_path / "p.json").write_text(json.dumps({"train": ["t"], "test": [conv, {"prompt": "u"}]}))
    assert load_prompts(tmp_path / "p.json") == [({"role": "user", "content": "hi"},), "u"]
    assert load_prompts(tmp_path / "p.json", split="train") == ["t"]


@pytest.mark.parametrize(
    "name, body, message",
    [
        ("p.jsonl", "not json\n", "p.jsonl"),
        ("p.jsonl", "[1, 2]\n", "p.jsonl"),
        ("p.json", '{"test": [3]}', "a prompt must be a string"),
        ("p.json", '{"dev": ["a"]}', "no split 'test'"),
        ("p.txt", "\n\n", "no prompts"),
        ("p.csv", "a\n", "unsupported prompts file type"),
    ],
)
def test_bad_files_are_config_errors(tmp_path, name, body, message):
    (tmp_path / name).write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_prompts(tmp_path / name)


def test_non_utf8_is_a_config_error(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"p\.txt"):
        load_prompts(tmp_path / "p.txt")
