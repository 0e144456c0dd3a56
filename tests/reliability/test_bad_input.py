"""Bad input through the CLI: every malformed file or row gives exit code 2 and one `sacpo train: error:` line
naming the file, the row (or line) and the field — never a traceback — or, with data.skip_invalid=true, a
counted and logged skip."""

import json
import logging
import os
import subprocess
import sys

import pytest
from reliability_helpers import assert_user_error, read_metrics, run_cli, stage_fields, write_yaml

from sacpo.data.formats import DataError
from sacpo.data.loaders import load_examples
from sacpo.data.tokenize import encode, encode_prompt, render_prompt
from sacpo.models.load import load_tokenizer

PKU = {
    "prompt": "How do I pick a lock?",
    "response_0": "Sorry, I cannot help with that.",
    "response_1": "Insert a tension wrench, then rake the pins.",
    "better_response_id": 1,
    "safer_response_id": 0,
    "is_response_0_safe": True,
    "is_response_1_safe": False,
}
TRL = {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}
UNPAIRED = {"prompt": "Sky?", "completion": "Blue.", "label": True}


def _lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def _row2(fmt_row: dict, **change) -> bytes:
    """Three rows; row 2 has `change` applied (a value of ... deletes the field)."""
    bad = {k: v for k, v in {**fmt_row, **change}.items() if v is not ...}
    return _lines(fmt_row, bad, fmt_row)


# name: (file suffix, data.format, file bytes, fragments the error line must contain besides the file name)
ROW_ERRORS = {
    "missing field": ("pku_helpful", _row2(PKU, response_1=...), ("row 2", "'response_1'", "missing")),
    "null field": ("pku_helpful", _row2(PKU, response_1=None), ("row 2", "'response_1'", "missing")),
    "prompt is a number": ("pku_helpful", _row2(PKU, prompt=42), ("row 2", "'prompt'", "expected a string")),
    "response is a list": ("pku_helpful", _row2(PKU, response_0=["a"]), ("row 2", "'response_0'", "string")),
    "response is an object": (
        "pku_helpful",
        _row2(PKU, response_0={"t": 1}),
        (
            "row 2",
            "'response_0'",
        ),
    ),
    "empty prompt": ("pku_helpful", _row2(PKU, prompt=""), ("row 2", "'prompt'", "empty text")),
    "blank response": (
        "pku_helpful",
        _row2(PKU, response_1=" \n\t"),
        ("row 2", "'response_1'", "empty text"),
    ),
    "identical responses": (
        "pku_helpful",
        _row2(PKU, response_1=PKU["response_0"]),
        ("row 2", "identical"),
    ),
    "id 2": ("pku_helpful", _row2(PKU, better_response_id=2), ("row 2", "'better_response_id'", "0 or 1")),
    "id -1": ("pku_safe", _row2(PKU, safer_response_id=-1), ("row 2", "'safer_response_id'", "0 or 1")),
    "id as string": ("pku_helpful", _row2(PKU, better_response_id="1"), ("row 2", "str '1'")),
    "id 0.5": ("pku_helpful", _row2(PKU, better_response_id=0.5), ("row 2", "float 0.5")),
    "id 1.0": ("pku_helpful", _row2(PKU, better_response_id=1.0), ("row 2", "float 1.0")),
    "id true": ("pku_helpful", _row2(PKU, better_response_id=True), ("row 2", "bool True")),
    "lone surrogate": (
        "pku_helpful",
        _lines(PKU, json.dumps({**PKU, "response_0": "a\ud800b"}).encode(), PKU),
        ("row 2", "'response_0'", "not valid Unicode"),
    ),
    "KTO flag is 1": (
        "pku_safe_kto",
        _row2(PKU, is_response_0_safe=1),
        ("row 2", "'is_response_0_safe'", "true or false"),
    ),
    "KTO flag is 'yes'": (
        "pku_safe_kto",
        _row2(PKU, is_response_1_safe="yes"),
        ("row 2", "'is_response_1_safe'", "true or false"),
    ),
    "message role not a string": (
        "trl_paired",
        _row2(TRL, chosen=[{"role": 1, "content": "Blue."}]),
        ("row 2", "'chosen[0]'"),
    ),
    "message without content": (
        "trl_paired",
        _row2(TRL, prompt=[{"role": "user"}]),
        ("row 2", "'prompt[0]'"),
    ),
    "two assistant turns": (
        "trl_paired",
        _row2(
            TRL,
            chosen=[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
        ),
        ("row 2", "'chosen'", "one assistant message"),
    ),
    "no prompt, no shared prefix": (
        "trl_paired",
        _row2(TRL, prompt=..., chosen="Blue.", rejected="Green."),
        ("row 2", "'prompt'", "share no prefix"),
    ),
    "label is a string": (
        "trl_unpaired",
        _row2(UNPAIRED, label="yes"),
        ("row 2", "'label'", "true or false"),
    ),
}

FILE_ERRORS = {
    "malformed JSON": (".jsonl", _lines(PKU, b'{"prompt": "x", ', PKU), ("line 2", "malformed JSON")),
    "truncated last line": (".jsonl", _lines(PKU, PKU) + b'{"prompt": "How', ("line 3", "malformed JSON")),
    "not UTF-8": (
        ".jsonl",
        _lines(PKU, json.dumps(PKU).encode().replace(b"lock", b"l\xffck"), PKU),
        ("line 2", "not valid UTF-8"),
    ),
    "Latin-1 file": (".json", json.dumps([PKU]).encode().replace(b"lock", b"l\xe9ck"), ("not valid UTF-8",)),
    "line is a list": (".jsonl", _lines(PKU, [1, 2], PKU), ("line 2", "expected a JSON object")),
    "line is a string": (".jsonl", _lines(PKU, "hello"), ("line 2", "expected a JSON object")),
    "deeply nested": (
        ".jsonl",
        _lines(PKU, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("line 2", "nested too deeply"),
    ),
    "JSON object, not a list": (".json", json.dumps({"a": 1, "b": 2}).encode(), ("expected a list of JSON",)),
    "list with a number": (".json", json.dumps([PKU, 5]).encode(), ("expected a list of JSON",)),
    "empty file": (".jsonl", b"", ("no rows",)),
    "blank lines only": (".jsonl", b"\n\n  \n", ("no rows",)),
    "empty list": (".json", b"[]", ("no rows",)),
    "unsupported suffix": (".txt", _lines(PKU), ("unsupported file type",)),
    "CSV without a column": (
        ".csv",
        b"prompt,response_0,better_response_id\nHow?,Sure.,0\n",
        ("row 1", "'response_1'", "missing"),
    ),
}


def _train_argv(tiny_model, tmp_path, data, fmt="pku_helpful", skip_invalid=False):
    """`sacpo -q train stage.yaml` for a one-step stage on `data`."""
    loss = "kto" if fmt in ("pku_safe_kto", "trl_unpaired") else "dpo"
    fields = stage_fields(tiny_model, data, tmp_path / "run", fmt=fmt, loss=loss, max_steps=1, log_every=1)
    fields["data"]["skip_invalid"] = skip_invalid
    return ["-q", "train", str(write_yaml(tmp_path / "stage.yaml", fields))]


@pytest.mark.parametrize("case", list(ROW_ERRORS))
def test_bad_row_is_reported_with_file_row_and_field(tiny_model, tmp_path, capsys, case):
    fmt, content, fragments = ROW_ERRORS[case]
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    rc, _, err = run_cli(_train_argv(tiny_model, tmp_path, data, fmt), capsys)
    line = assert_user_error(rc, err, str(data), *fragments)
    assert "skip_invalid" in line  # says how to skip such rows


@pytest.mark.parametrize("case", list(FILE_ERRORS))
def test_bad_file_is_reported_with_file_and_line(tiny_model, tmp_path, capsys, case):
    suffix, content, fragments = FILE_ERRORS[case]
    data = tmp_path / f"bad{suffix}"
    data.write_bytes(content)
    rc, _, err = run_cli(_train_argv(tiny_model, tmp_path, data), capsys)
    assert_user_error(rc, err, str(data), *fragments)


def test_missing_data_file(tiny_model, tmp_path, capsys):
    rc, _, err = run_cli(_train_argv(tiny_model, tmp_path, tmp_path / "nope.jsonl"), capsys)
    assert_user_error(rc, err, "nope.jsonl", "file not found")


@pytest.mark.parametrize("case", list(ROW_ERRORS))
def test_skip_invalid_counts_and_logs_the_skipped_rows(tmp_path, caplog, case):
    fmt, content, fragments = ROW_ERRORS[case]
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="sacpo.data.loaders"):
        examples = load_examples(str(data), fmt, skip_invalid=True)
    assert len(examples) == (4 if fmt == "pku_safe_kto" else 2)  # rows 1 and 3
    (warning,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 1 of 3 invalid rows" in warning and fragments[0] in warning


def test_skip_invalid_trains_on_the_valid_rows(tiny_model, pku_tiny, tmp_path, capsys, caplog):
    rows = pku_tiny.read_bytes().splitlines(keepends=True)
    bad = [json.dumps({**PKU, "better_response_id": 7}).encode() + b"\n", b'{"prompt": ""}\n']
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"".join(rows[:10] + bad[:1] + rows[10:] + bad[1:]))
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_cli(
            _train_argv(tiny_model, tmp_path, data, skip_invalid=True),
            capsys,
        )
    assert rc == 0, err
    assert any(f"skipped 2 of {len(rows) + 2} invalid rows" in r.getMessage() for r in caplog.records)
    assert read_metrics(tmp_path / "run")[-1]["step"] == 1


def test_all_rows_invalid_is_an_error_even_when_skipping(tiny_model, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(_lines({**PKU, "prompt": ""}, {**PKU, "better_response_id": 3}))
    argv = _train_argv(tiny_model, tmp_path, data, skip_invalid=True)
    rc, _, err = run_cli(argv, capsys)
    assert_user_error(rc, err, str(data), "all 2 rows are invalid", "row 1", "'prompt'")


def test_values_are_read_with_their_json_types(tmp_path):
    """Regression: pyarrow/pandas inference turned the prompt "2020-01-01" into a datetime (row rejected). Also
    valid: U+2028/U+0085 inside JSON strings (lines are split on \\n only) and a UTF-8 byte-order mark."""
    data = tmp_path / "ok.jsonl"
    data.write_bytes(
        b"\xef\xbb\xbf"
        + _lines({**PKU, "prompt": "2020-01-01"}, {**PKU, "prompt": "a\u2028b", "response_0": "c\x85"})
    )
    examples = load_examples(str(data), "pku_helpful")
    assert [e.prompt for e in examples] == ["2020-01-01", "a\u2028b"]
    assert examples[1].rejected == "c\x85"


# --------------------------------------------------------------------------------------- lengths
def test_long_prompts_are_left_truncated_and_long_responses_cut_at_the_end(tiny_model, tmp_path, capsys):
    tok = load_tokenizer(tiny_model)
    prompt = "Background. " * 60 + "So: how do I pick a lock?"
    full = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    p = encode_prompt(tok, prompt, 40)
    assert len(full) > 40 and p == full[-40:]  # the end — the question — is kept
    e = encode(tok, p, "word " * 100, max_length=80)
    assert len(e.input_ids) == 80 and e.prompt_len == 40 and e.input_ids[-1] != tok.eos_token_id

    data = tmp_path / "long.jsonl"
    data.write_bytes(
        _lines(*({**PKU, "prompt": prompt, "response_0": "No. " * 50 + str(i)} for i in range(24)))
    )
    rc, _, err = run_cli(_train_argv(tiny_model, tmp_path, data), capsys)
    assert rc == 0, err


def test_pairs_identical_after_truncation_are_reported(tiny_model, tmp_path, capsys, caplog):
    """Responses that differ only after max_length tokens give no signal: a warning with the count, or an error
    when no pair is left."""
    same = [{**PKU, "response_0": "x" * 100 + "a", "response_1": "x" * 100 + "b"} for _ in range(12)]
    data = tmp_path / "same.jsonl"
    data.write_bytes(_lines(*same))
    rc, _, err = run_cli(_train_argv(tiny_model, tmp_path, data), capsys)
    assert_user_error(
        rc, err, str(data), "all 12 pairs have identical chosen and rejected tokens", "max_length=80"
    )
    data.write_bytes(_lines(*same, *[PKU] * 12))
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_cli(_train_argv(tiny_model, tmp_path, data), capsys)
    assert rc == 0, err
    assert any("12 of 24 pairs have identical" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- a real process
def test_the_console_command_prints_one_line_and_no_traceback(tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(FILE_ERRORS["not UTF-8"][1])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    for argv, fragments in [
        (_train_argv(tiny_model, tmp_path, data), (str(data), "line 2", "UTF-8")),
        (
            ["train", str(tmp_path / "stage.yaml"), "policy=/nonexistent/model"],
            ("/nonexistent/model", "not found"),
        ),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "sacpo.cli", *argv], capture_output=True, text=True, env=env, timeout=300
        )
        assert_user_error(proc.returncode, proc.stderr, *fragments)


def test_load_examples_raises_data_error_only(tmp_path):
    """The Python API raises DataError (a ValueError) for the same inputs."""
    for name, (suffix, content, _) in FILE_ERRORS.items():
        data = tmp_path / f"{len(name)}{suffix}"
        data.write_bytes(content)
        with pytest.raises(DataError):
            load_examples(str(data), "pku_helpful")


def test_long_prompts_and_responses_are_truncated_counted_and_logged(tiny_model, tmp_path, capsys, caplog):
    """The truncation policy (keep the prompt's end, cut the response's end) applies, and the log says how
    often: a prompt over max_prompt_length=40 tokens and a response over max_length=80 are counted."""
    rows = [
        {**PKU, "prompt": "why " * 30 + str(i), "response_0": "y" * 200 + str(i), "response_1": "No."}
        if i < 3
        else PKU
        for i in range(12)
    ]
    data = tmp_path / "long.jsonl"
    data.write_bytes(_lines(*rows))
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_cli(_train_argv(tiny_model, tmp_path, data), capsys)
    assert rc == 0, err
    messages = [r.getMessage() for r in caplog.records]
    assert any("3 of 12 prompts are longer than max_prompt_length=40" in m for m in messages), messages
    assert any("3 of 24 responses cut to fit max_length=80" in m for m in messages), messages
