"""The prompt format in best-of-n and controlled decoding: prompts rendered in it (logged once), recorded in the
summary, and in the best-of-n candidate cache key."""

import json
import logging
from pathlib import Path

import torch

from sacpo.config import from_dict
from sacpo.data.prompt_format import PromptFormat
from sacpo.infer.bon_cache import candidates_key
from sacpo.infer.bon_config import BonConfig
from sacpo.infer.cd_config import CDConfig
from sacpo.models.load import load_tokenizer
from sacpo.models.prefix_value import PrefixScorer
from sacpo.recipes.bon import run_bon
from sacpo.recipes.cd import run_cd
from sacpo.scoring import FunctionScorer

SMOLLM2_TEMPLATE = Path(__file__).parents[1] / "assets" / "smollm2_chat_template.jinja"
PROMPTS = ["How do I bake bread?", "How do I fix a bike?"]
LENGTH = FunctionScorer("length", lambda p, y: float(len(y)))
USER_TURN = (
    "<|im_start|>user\\nHow do I bake bread?<|im_end|>\\n<|im_start|>assistant\\n"  # as repr() shows it
)


def _first_prompt_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "first prompt rendered" in r.getMessage()]


def test_candidates_key_changes_with_the_prompt_format():
    args = ("m", "t", PROMPTS, 2, 4, 8, 64, 0)
    keys = {candidates_key(*args, PromptFormat(s)) for s in (None, "none", "S")}
    assert len(keys) == 3 and candidates_key(*args) in keys  # the default keeps the old key


def test_bon_renders_in_the_configured_format(tiny_chat_model, tmp_path, caplog):
    (tmp_path / "prompts.json").write_text(json.dumps({"test": PROMPTS}))
    fields = {"model": str(tiny_chat_model), "prompts": str(tmp_path / "prompts.json"), "device": "cpu"}
    fields.update(ns=[1, 2], n_samples=1, max_new_tokens=2, n_boot=10)
    with caplog.at_level(logging.INFO, logger="sacpo.bon"):
        summary = run_bon(
            BonConfig(**fields, output_dir=str(tmp_path / "none"), system_prompt="none"), False, reward=LENGTH
        )
    (logged,) = _first_prompt_logs(caplog)
    assert f"'{USER_TURN}'" in logged and "system" not in logged.split("rendered")[1]
    assert summary["prompt_format"] == {"system_prompt": "none", "chat_template": None}
    assert not summary["candidates_cached"]


def test_cd_renders_in_the_configured_format_and_warns_about_a_scorer_trained_in_another(
    tiny_model, tmp_path, caplog
):
    """The tiny model has no chat template: SmolLM2's is given as a file override."""
    tok = load_tokenizer(tiny_model)
    scorer = PrefixScorer.from_base(tiny_model, tok, seed=1)
    with torch.no_grad():
        scorer.model.score.weight.mul_(20.0)
    scorer_dir = scorer.save(tmp_path / "reward", tok)
    (tmp_path / "prompts.json").write_text(json.dumps({"test": PROMPTS}))
    template = tmp_path / "smollm2.jinja"
    template.write_text(SMOLLM2_TEMPLATE.read_text())
    fields = {"model": str(tiny_model), "scorer": str(scorer_dir), "prompts": str(tmp_path / "prompts.json")}
    fields.update(output_dir=str(tmp_path / "out"), n_samples=1, max_new_tokens=2, oracle=None, device="cpu")
    fields.update(system_prompt="none", chat_template=str(template))
    with caplog.at_level(logging.INFO, logger="sacpo.cd"):
        summary = run_cd(from_dict(CDConfig, fields), show_progress=False)
    (logged,) = _first_prompt_logs(caplog)
    assert f"'{USER_TURN}'" in logged and f"chat_template={template}" in logged
    assert summary["prompt_format"]["chat_template"]["source"] == str(template)
    assert any(
        "another prompt format" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    )
