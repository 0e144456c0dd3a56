"""The prompt format in evaluation: samples are drawn from prompts rendered in it, and the samples cache of a
directory is not reused when the format changes."""

import json
import logging

from sacpo.config import from_dict
from sacpo.data.prompt_format import PromptFormat
from sacpo.evaluate.generate import META_FILE, generate_samples
from sacpo.recipes.eval import EvalConfig, run_eval

PROMPTS = ["How do I bake bread?", "How do I fix a bike?"]


def test_samples_cache_is_keyed_on_the_prompt_format(tiny_chat_model, tmp_path, monkeypatch):
    import sacpo.evaluate.generate as gen_mod

    rendered = []
    encode = gen_mod.encode_prompt

    def spy(tok, prompt, limit, stats=None, fmt=None):
        ids = encode(tok, prompt, limit, stats, fmt)
        rendered.append(tok.decode(ids))
        return ids

    monkeypatch.setattr(gen_mod, "encode_prompt", spy)
    kw = {"n_samples": 1, "max_new_tokens": 3, "seed": 1}
    out = tmp_path / "s"
    default = generate_samples(tiny_chat_model, PROMPTS, out, tiny_chat_model, **kw)
    assert not default.cached and all("<|im_start|>system" in t for t in rendered)
    rendered.clear()
    none = generate_samples(
        tiny_chat_model, PROMPTS, out, tiny_chat_model, **kw, prompt_format=PromptFormat("none")
    )
    assert not none.cached and none.meta["key"] != default.meta["key"]  # the format changed: sampled again
    assert rendered[0] == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    meta = json.loads((out / META_FILE).read_text())
    assert meta["prompt_format"] == {"system_prompt": "none", "chat_template": None}
    hit = generate_samples(
        tiny_chat_model, PROMPTS, out, tiny_chat_model, **kw, prompt_format=PromptFormat("none")
    )
    assert hit.cached and hit.rows == none.rows


def test_run_eval_renders_every_model_in_the_configured_format_and_logs_the_first_prompt(
    tiny_chat_model, tmp_path, caplog
):
    from sacpo.worlds.toyworld.language import all_prompts

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"test": all_prompts()[-2:]}))
    fields = {"output_dir": str(tmp_path / "eval"), "prompts": str(prompts), "sft": str(tiny_chat_model)}
    fields.update(n_samples=1, max_new_tokens=2, n_boot=20, system_prompt="Be safe.")
    with caplog.at_level(logging.INFO, logger="sacpo.evaluate"):
        run_eval(from_dict(EvalConfig, fields), show_progress=False)
    logged = [r.getMessage() for r in caplog.records if "first prompt rendered" in r.getMessage()]
    want = f"<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\n{all_prompts()[-2]}<|im_end|>\n"
    assert len(logged) == 1 and repr(want)[:-1] in logged[0]
    meta = json.loads((tmp_path / "eval" / "samples" / "sft" / META_FILE).read_text())
    assert meta["prompt_format"]["system_prompt"] == "Be safe."
