"""The prompt format in training: the config fields, the reference cache key, and a short `sacpo train` on the tiny
model with SmolLM2's chat template that logs its first rendered prompt and encodes it without the default system
prompt."""

import json
import logging
from collections import Counter

import pytest
import yaml

from sacpo.config import ConfigError, from_dict, to_yaml
from sacpo.data.loaders import load_examples
from sacpo.data.prompt_format import PromptFormat
from sacpo.data.tokenize import encode_paired
from sacpo.models.load import load_tokenizer
from sacpo.scoring import FunctionScorer, register_scorer
from sacpo.train.config import TrainConfig, same_computation
from sacpo.train.ref_cache import cache_key

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
register_scorer("test.prompt_format.length", lambda: FunctionScorer("length", lambda p, y: float(len(y))))


def _cfg(model, data, out, **kw) -> TrainConfig:
    return from_dict(
        TrainConfig, {"policy": str(model), "output_dir": str(out), "data": {"source": str(data)}, **kw}
    )


def test_config_fields_validate_and_old_configs_stay_current(tiny_model, pku_tiny, tmp_path):
    cfg = _cfg(tiny_model, pku_tiny, tmp_path)
    assert cfg.system_prompt is None and cfg.chat_template is None and cfg.prompt_format().is_default
    saved = to_yaml(cfg)
    older = "".join(
        line for line in saved.splitlines(True) if not line.startswith(("system_prompt:", "chat_template:"))
    )
    assert older != saved and same_computation(older, cfg)  # a run from before the fields is still current
    none = _cfg(tiny_model, pku_tiny, tmp_path, system_prompt="none")
    assert not same_computation(saved, none)  # a changed system prompt retrains
    with pytest.raises(ConfigError, match="neither a Jinja template"):
        _cfg(tiny_model, pku_tiny, tmp_path, chat_template=str(tmp_path / "missing.jinja"))


def test_reference_cache_key_changes_with_the_prompt_format(tiny_chat_model, pku_tiny):
    tok = load_tokenizer(tiny_chat_model)
    examples = load_examples(str(pku_tiny), "pku_helpful", None, 8, False)
    keys = set()
    for system_prompt in (None, "none", "Be brief."):
        fmt = PromptFormat(system_prompt)
        pairs = encode_paired(tok, examples, 256, 200, Counter(), fmt)
        key = cache_key(tiny_chat_model, tok, pairs, 256, False, fmt)
        keys.add(key)
        # the format is in the key itself, not only in the token ids it changes
        assert fmt.is_default or key != cache_key(tiny_chat_model, tok, pairs, 256, False)
    assert len(keys) == 3


def _train_argv(model, data, out, cache, *extra):
    cfg = {
        "policy": str(model),
        "output_dir": str(out),
        "cache_dir": str(cache),
        "data": {"source": str(data), "format": "pku_helpful", "max_rows": 16},
        "max_steps": 2,
        "batch_size": 4,
        "max_length": 256,
        "max_prompt_length": 200,
        "kl_prompts": 1,
        "kl_samples": 1,
        "kl_max_new_tokens": 4,
        "eval_fraction": 0.25,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["-q", "train", str(path), *extra]


def test_sacpo_train_logs_the_first_rendered_prompt_and_keys_the_reference_pass_on_it(
    tiny_chat_model, pku_tiny, tmp_path, caplog
):
    from sacpo.cli import main

    cache = tmp_path / "cache"
    first_prompt = json.loads(pku_tiny.read_text().splitlines()[0])["prompt"]
    with caplog.at_level(logging.INFO, logger="sacpo.train"):
        assert (
            main(_train_argv(tiny_chat_model, pku_tiny, tmp_path / "none", cache, "system_prompt=none")) == 0
        )
    logged = [r.getMessage() for r in caplog.records if "first prompt rendered" in r.getMessage()]
    assert len(logged) == 1  # once per run
    want = f"<|im_start|>user\n{first_prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert repr(want) in logged[0] and "system_prompt='none'" in logged[0] and DEFAULT_SYSTEM not in logged[0]
    summary = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert summary["prompt_format"] == {"system_prompt": "none", "chat_template": None}
    assert summary["reference_pass"] == "computed"
    assert yaml.safe_load((tmp_path / "none" / "config.yaml").read_text())["system_prompt"] == "none"

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sacpo.train"):
        assert main(_train_argv(tiny_chat_model, pku_tiny, tmp_path / "default", cache)) == 0
    logged = [r.getMessage() for r in caplog.records if "first prompt rendered" in r.getMessage()]
    assert DEFAULT_SYSTEM in logged[0]  # the template's default, as the tokenizer renders it
    default = json.loads((tmp_path / "default" / "summary.json").read_text())
    # the same reference and data in another prompt format: a new reference pass, not the cached one
    assert (
        default["reference_pass"] == "computed" and default["reference_cache"] != summary["reference_cache"]
    )

    assert main(_train_argv(tiny_chat_model, pku_tiny, tmp_path / "none2", cache, "system_prompt=none")) == 0
    again = json.loads((tmp_path / "none2" / "summary.json").read_text())
    assert again["reference_pass"] == "cached" and again["reference_cache"] == summary["reference_cache"]


def test_onpolicy_pairs_are_sampled_in_the_stage_format_and_keyed_on_it(
    tiny_chat_model, tmp_path, monkeypatch
):
    from sacpo.data import tokenize
    from sacpo.train.onpolicy import META_FILE, OnPolicyConfig, generate_preferences

    rendered = []
    real = tokenize.encode_prompt

    def spy(tok, prompt, limit, stats=None, fmt=tokenize.DEFAULT_FORMAT):
        ids = real(tok, prompt, limit, stats, fmt)
        rendered.append(tok.decode(ids))
        return ids

    monkeypatch.setattr(tokenize, "encode_prompt", spy)
    cfg = from_dict(
        OnPolicyConfig, {"judge": "test.prompt_format.length", "pairs_per_prompt": 1, "max_new_tokens": 4}
    )
    prompts, out = ["How do I bake bread?", "How do I fix a bike?"], tmp_path / "onpolicy"
    generate_preferences(tiny_chat_model, prompts, "pku_safe", cfg, out, 200, device="cpu")
    default_key = json.loads((out / META_FILE).read_text())["key"]
    assert rendered and all(DEFAULT_SYSTEM in t for t in rendered)
    rendered.clear()
    fmt = PromptFormat("none")
    generate_preferences(tiny_chat_model, prompts, "pku_safe", cfg, out, 200, device="cpu", prompt_format=fmt)
    assert rendered[0] == f"<|im_start|>user\n{prompts[0]}<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((out / META_FILE).read_text())["key"] != default_key  # regenerated, not reused
