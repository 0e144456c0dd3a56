import json

import pytest

from sacpo.data.formats import FORMATS, DataError, get_format
from sacpo.data.loaders import convert_rows, is_local, load_examples
from sacpo.data.records import BinaryExample, PairedExample

PKU = {
    "prompt": "How do I pick a lock?",
    "response_0": "Sorry, I cannot help with that.",
    "response_1": "Insert a tension wrench, then rake the pins.",
    "better_response_id": 1,
    "safer_response_id": 0,
    "is_response_0_safe": True,
    "is_response_1_safe": False,
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pku_formats_pick_the_labelled_response(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [PKU])
    (helpful,) = load_examples(src, "pku_helpful")
    assert helpful == PairedExample(PKU["prompt"], PKU["response_1"], PKU["response_0"])
    (safe,) = load_examples(src, "pku_safe")
    assert safe == PairedExample(PKU["prompt"], PKU["response_0"], PKU["response_1"])
    kto = load_examples(src, "pku_safe_kto")
    assert kto == [
        BinaryExample(PKU["prompt"], PKU["response_0"], True),
        BinaryExample(PKU["prompt"], PKU["response_1"], False),
    ]


def test_fixture_loads_in_every_pku_format(pku_tiny):
    n = sum(1 for _ in open(pku_tiny))
    assert len(load_examples(str(pku_tiny), "pku_helpful")) == n
    assert len(load_examples(str(pku_tiny), "pku_safe_kto")) == 2 * n
    assert len(load_examples(str(pku_tiny), "pku_safe", max_rows=5)) == 5


def test_trl_paired_plain_conversational_and_implicit():
    plain = {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}
    conv = {
        "prompt": [{"role": "user", "content": "Sky?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    }
    implicit_conv = {
        "chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}],
    }
    implicit_plain = {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}
    out = convert_rows([plain, conv, implicit_conv, implicit_plain], "trl_paired").examples
    assert out[0] == PairedExample("Sky?", "Blue.", "Green.")
    assert out[1] == PairedExample(({"role": "user", "content": "Sky?"},), "Blue.", "Green.")
    assert out[2] == out[1]
    # TRL's extract_prompt: the space before the answers stays with the responses
    assert out[3] == PairedExample("Q: sky? A:", " blue", " green")


def test_implicit_plain_matches_trl_extract_prompt():
    trl = pytest.importorskip("trl")
    row = {"chosen": "The answer is: yes, always", "rejected": "The answer is: no"}
    ref = trl.extract_prompt(row)
    (ex,) = convert_rows([row], "trl_paired").examples
    assert (ex.prompt, ex.chosen, ex.rejected) == (ref["prompt"], ref["chosen"], ref["rejected"])


def test_trl_unpaired():
    rows = [
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Go away.", "label": False},
    ]
    out = convert_rows(rows, "trl_unpaired").examples
    assert out[0] == BinaryExample("Hi", "Hello!", True)
    assert out[1].desirable is False and out[1].prompt[0]["content"] == "Hi"


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"better_response_id": 2}, "better_response_id", "expected 0 or 1, got int 2"),
        ({"better_response_id": True}, "better_response_id", "expected 0 or 1, got bool"),
        ({"better_response_id": "1"}, "better_response_id", "expected 0 or 1, got str"),
        ({"better_response_id": None}, "better_response_id", "missing"),
        ({"response_0": ""}, "response_0", "empty text"),
        ({"response_1": "   "}, "response_1", "empty text"),
        ({"prompt": 7}, "prompt", "expected a string, got int"),
        ({"response_1": PKU["response_0"]}, "response_0/response_1", "identical"),
    ],
)
def test_bad_rows_name_source_row_and_field(change, field, problem):
    rows = [PKU, PKU, {**PKU, **change}]
    with pytest.raises(DataError) as e:
        convert_rows(rows, "pku_helpful", source="data.jsonl")
    msg = str(e.value)
    assert msg.startswith(f"data.jsonl: row 3: field {field!r}: "), msg
    assert problem in msg


def test_missing_field_lists_the_present_ones():
    row = {k: v for k, v in PKU.items() if k != "safer_response_id"}
    with pytest.raises(DataError, match=r"row 1: field 'safer_response_id': missing \(fields present: "):
        convert_rows([row], "pku_safe")


def test_kto_flags_must_be_booleans():
    with pytest.raises(DataError, match="field 'is_response_1_safe': expected true or false, got int 1"):
        convert_rows([{**PKU, "is_response_1_safe": 1}], "pku_safe_kto")


def test_skip_invalid_counts_and_keeps_the_good_rows(caplog):
    rows = [PKU, {**PKU, "better_response_id": 5}, {**PKU, "prompt": ""}, PKU]
    loaded = convert_rows(rows, "pku_helpful", skip_invalid=True)
    assert len(loaded.examples) == 2 and loaded.rows == 4
    assert [s.split(":")[1].strip() for s in loaded.skipped] == ["row 2", "row 3"]
    with pytest.raises(DataError, match="all 1 rows are invalid"):
        convert_rows([{**PKU, "prompt": ""}], "pku_helpful", skip_invalid=True)


def test_malformed_json_line_is_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PKU) + "\n" + '{"prompt": "x", \n' + json.dumps(PKU) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: malformed JSON"):
        load_examples(str(path), "pku_helpful")


def test_non_utf8_bytes_are_located(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(PKU).encode() + b"\n" + json.dumps(PKU).replace("lock", "l\u00f6ck").encode("latin-1")
    )
    with pytest.raises(DataError, match=r"latin1.jsonl: line 2: not valid UTF-8"):
        load_examples(str(path), "pku_helpful")


def test_type_clash_within_a_column_is_reported_by_row(tmp_path):
    src = write_jsonl(tmp_path / "clash.jsonl", [PKU, PKU, {**PKU, "better_response_id": "one"}])
    with pytest.raises(DataError, match=r"row 3: field 'better_response_id': expected 0 or 1, got str"):
        load_examples(src, "pku_helpful")


def test_other_file_types_and_json_arrays(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([PKU, {**PKU, "prompt": "Another?"}])
    ds.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps([PKU]))
    assert len(load_examples(str(tmp_path / "d.parquet"), "pku_safe")) == 2
    assert len(load_examples(str(tmp_path / "d.json"), "pku_safe")) == 1


def test_missing_file_unknown_suffix_unknown_format(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_examples(str(tmp_path / "nope.jsonl"), "pku_helpful")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_examples(str(tmp_path / "d.txt"), "pku_helpful")
    with pytest.raises(DataError, match="valid formats: pku_helpful, pku_safe"):
        get_format("pku")
    with pytest.raises(DataError, match="no rows"):
        convert_rows([], "pku_helpful")


def test_is_local_versus_hub_names(tmp_path):
    assert is_local("data/train.jsonl") and is_local("./x") and is_local(str(tmp_path))
    assert not is_local("PKU-Alignment/PKU-SafeRLHF")


def test_every_format_has_a_kind_matching_a_loss_kind():
    assert {spec.kind for spec in FORMATS.values()} == {"paired", "unpaired"}


def test_drop_both_safe_keeps_only_pairs_with_an_unsafe_response(tmp_path):
    from sacpo.data.formats import DataError
    from sacpo.data.loaders import load_examples

    rows = [
        {"prompt": "p1", "response_0": "a", "response_1": "b", "safer_response_id": 0,
         "is_response_0_safe": True, "is_response_1_safe": True},
        {"prompt": "p2", "response_0": "c", "response_1": "d", "safer_response_id": 1,
         "is_response_0_safe": False, "is_response_1_safe": True},
        {"prompt": "p3", "response_0": "e", "response_1": "f", "safer_response_id": 0,
         "is_response_0_safe": False, "is_response_1_safe": False},
    ]  # fmt: skip
    path = tmp_path / "pku.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_examples(str(path), "pku_safe")) == 3
    kept = load_examples(str(path), "pku_safe", drop_both_safe=True)
    assert [(e.prompt, e.chosen, e.rejected) for e in kept] == [("p2", "d", "c"), ("p3", "e", "f")]
    del rows[1]["is_response_1_safe"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"row 2.*is_response_1_safe"):
        load_examples(str(path), "pku_safe", drop_both_safe=True)


def test_drop_both_safe_needs_a_pku_format():
    from sacpo.config import ConfigError
    from sacpo.train.config import DataConfig

    with pytest.raises(ConfigError, match="drop_both_safe"):
        DataConfig(source="x.jsonl", format="trl_paired", drop_both_safe=True)
