"""The SACPO pipeline: step 1, a λ sweep sharing one reference pass, P-SACPO and naive merges."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sacpo.config import ConfigError, from_dict
from sacpo.recipes.pipeline import PipelineConfig, plan, run_pipeline

DEFAULTS = {
    "max_steps": 3,
    "batch_size": 8,
    "lr": 2e-3,
    "max_length": 80,
    "max_prompt_length": 40,
    "log_every": 3,
    "kl_prompts": 2,
    "kl_max_new_tokens": 8,
}


def pipeline_cfg(model, data, out, **kw):
    d = str(data)
    fields = {
        "policy": str(model),
        "output_dir": str(out),
        "defaults": DEFAULTS,
        "stages": [
            {"name": "helpful", "data": {"source": d, "format": "pku_helpful"}, "beta": 0.1},
            {"name": "safe", "data": {"source": d, "format": "pku_safe"}, "lam": [0.5, 1.0, 2.0]},
            {
                "name": "safe_from_sft",
                "start_from": "sft",
                "data": {"source": d, "format": "pku_safe"},
                "beta": 0.1,
            },
        ],
        "merges": [
            {"name": "psacpo", "a": "helpful", "b": "safe-lam2", "qs": [0.25, 0.5, 0.75]},
            {"name": "naive", "a": "helpful", "b": "safe_from_sft", "qs": [0.5]},
        ],
    }
    fields.update(kw)
    return from_dict(PipelineConfig, fields)


def test_plan_expands_lambda_sweep_with_beta_over_lambda(tiny_model, pku_tiny, tmp_path):
    branches = plan(pipeline_cfg(tiny_model, pku_tiny, tmp_path), tiny_model)
    safe = branches["safe"]
    assert [b.name for b in safe] == ["safe-lam0.5", "safe-lam1", "safe-lam2"]
    assert [b.beta for b in safe] == pytest.approx([0.2, 0.1, 0.05])  # β/λ with β = 0.1
    helpful_model = str(branches["helpful"][0].model_dir)
    assert all(b.train.policy == helpful_model and b.train.reference is None for b in safe)
    assert branches["safe_from_sft"][0].train.policy == str(tiny_model)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": [{"name": "s", "data": {"source": "x"}, "lam": 2.0}]}, "lam needs a parent"),
        ({"stages": [{"name": "s", "data": {"source": "x"}, "start_from": "nope"}]}, "unknown stage 'nope'"),
        ({"stages": [{"name": "s", "data": {"source": "x"}, "beta": 0.1, "lam": 1.0}]}, "beta or lam"),
        ({"stages": [{"name": "s", "data": {"source": "x"}, "beta": -0.1}]}, "beta must be > 0"),
        ({"stages": [{"name": "sft", "data": {"source": "x"}}]}, "reserved"),
    ],
)
def test_bad_pipelines_fail_before_training(tiny_model, tmp_path, change, message):
    cfg = pipeline_cfg(tiny_model, "x.jsonl", tmp_path, merges=[], **change)
    with pytest.raises(ConfigError, match=message):
        plan(cfg, tiny_model)


def test_pipeline_runs_sweep_and_merges_with_one_reference_pass_per_reference(tiny_model, pku_tiny, tmp_path):
    out = tmp_path / "p"
    result = run_pipeline(pipeline_cfg(tiny_model, pku_tiny, out), show_progress=False)
    passes = {r["name"]: r["summary"]["reference_pass"] for r in result["stages"]}
    # SFT on helpful data, SFT on safety data, step-1 policy on safety data: 3 computed; the other 2 λ reuse it
    assert passes == {
        "helpful": "computed",
        "safe-lam0.5": "computed",
        "safe-lam1": "cached",
        "safe-lam2": "cached",
        "safe_from_sft": "computed",
    }
    assert result["reference_passes"] == {"computed": 3, "cached": 2, "skipped_stages": 0}
    assert [m["name"] for m in result["merges"]] == [
        "psacpo-q0.25",
        "psacpo-q0.5",
        "psacpo-q0.75",
        "naive-q0.5",
    ]
    a = load_file(out / "stages" / "helpful" / "model" / "model.safetensors")
    b = load_file(out / "stages" / "safe-lam2" / "model" / "model.safetensors")
    m = load_file(out / "merges" / "psacpo-q0.25" / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(m[k], 0.75 * a[k] + 0.25 * b[k], rtol=1e-5, atol=1e-6)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "merges" / "naive-q0.5" / "model")
    assert json.loads((out / "pipeline.json").read_text())["reference_passes"]["computed"] == 3

    # a second run skips every finished stage and trains nothing
    again = run_pipeline(pipeline_cfg(tiny_model, pku_tiny, out), show_progress=False)
    assert again["reference_passes"] == {"computed": 0, "cached": 0, "skipped_stages": 5}


def test_safe_then_helpful_order_is_just_the_list(tiny_model, pku_tiny, tmp_path):
    d = str(pku_tiny)
    cfg = pipeline_cfg(
        tiny_model,
        pku_tiny,
        tmp_path / "rev",
        merges=[],
        stages=[
            {"name": "safe", "data": {"source": d, "format": "pku_safe"}, "beta": 0.1},
            {"name": "helpful", "data": {"source": d, "format": "pku_helpful"}, "lam": 2.0, "loss": "ipo"},
        ],
    )
    branches = plan(cfg, tiny_model)
    assert branches["helpful"][0].beta == pytest.approx(0.05)
    assert branches["helpful"][0].train.policy == str(branches["safe"][0].model_dir)


@pytest.mark.slow
def test_the_shipped_pipeline_config_runs_from_the_cli(tmp_path, monkeypatch, capsys):
    """configs/pipeline_tiny.yaml as the README tour runs it (fewer steps): step 1, a 3-value λ sweep sharing one
    reference pass, DPO(safe) from SFT, 3 P-SACPO merges and the naive merge; a rerun skips every stage."""
    from sacpo.cli import main

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the config names its data relative to the repository
    argv = ["-q", "pipeline", "configs/pipeline_tiny.yaml", f"output_dir={tmp_path / 'p'}"]
    argv += ["defaults.max_steps=2", "defaults.kl_prompts=2", "defaults.kl_max_new_tokens=8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reference passes: 3 computed, 2 from cache, 0 finished stages skipped" in out, out
    for name in ["helpful", "safe-lam0.5", "safe-lam1", "safe-lam2", "safe_from_sft"]:
        assert name in out
    assert out.count("merge psacpo") == 3 and out.count("merge naive") == 1
    assert main(argv) == 0
    assert "0 computed, 0 from cache, 5 finished stages skipped" in capsys.readouterr().out


def test_a_runtime_only_setting_does_not_make_a_finished_stage_stale(tiny_model, pku_tiny, tmp_path):
    from sacpo.config import to_yaml
    from sacpo.train.config import TrainConfig, same_computation

    cfg = from_dict(
        TrainConfig,
        {"policy": str(tiny_model), "output_dir": str(tmp_path), "data": {"source": str(pku_tiny)}},
    )
    saved = to_yaml(cfg)
    # a run finished before the field existed, or with the other value: still the same training
    older = "".join(line for line in saved.splitlines(True) if not line.startswith("malloc_tuning:"))
    assert older != saved and same_computation(older, cfg)
    assert same_computation(saved.replace("malloc_tuning: false", "malloc_tuning: true"), cfg)
    assert not same_computation(saved.replace("lr: 5.0e-06", "lr: 1.0e-05"), cfg)
    assert "lr: 5.0e-06" in saved
    assert not same_computation("not a mapping", cfg)


def test_stages_inherit_the_prompt_format_from_defaults(tiny_model, pku_tiny, tmp_path):
    d = str(pku_tiny)
    stages = [
        {"name": "helpful", "data": {"source": d}, "beta": 0.1},
        {
            "name": "safe",
            "data": {"source": d},
            "lam": [1.0, 2.0],
            "overrides": {"system_prompt": "Be safe."},
        },
    ]
    defaults = {**DEFAULTS, "system_prompt": "none"}
    branches = plan(
        pipeline_cfg(tiny_model, pku_tiny, tmp_path, defaults=defaults, stages=stages, merges=[]), tiny_model
    )
    assert branches["helpful"][0].train.system_prompt == "none"
    assert [b.train.system_prompt for b in branches["safe"]] == ["Be safe.", "Be safe."]


def test_a_finished_stage_is_retrained_when_its_chat_template_file_changes(tiny_model, pku_tiny, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] ")
    stages = [{"name": "helpful", "data": {"source": str(pku_tiny)}, "beta": 0.1}]
    defaults = {**DEFAULTS, "max_steps": 1, "kl_prompts": 0, "chat_template": str(template)}
    cfg = pipeline_cfg(tiny_model, pku_tiny, tmp_path / "p", defaults=defaults, stages=stages, merges=[])
    assert run_pipeline(cfg, show_progress=False)["reference_passes"]["computed"] == 1
    assert run_pipeline(cfg, show_progress=False)["reference_passes"]["skipped_stages"] == 1
    template.write_text("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}<assistant> ")
    again = run_pipeline(cfg, show_progress=False)[
        "reference_passes"
    ]  # same config.yaml, other template text
    assert again == {"computed": 1, "cached": 0, "skipped_stages": 0}


def test_pipeline_stages_and_merges_keep_a_bf16_policy_bf16(tiny_model, pku_tiny, tmp_path):
    """dtype auto through a pipeline: the bf16 SFT policy gives bf16 stages (trained on float32 weights) and
    bf16 merges; `defaults: {dtype: fp32}` is another computation (the stages are retrained) and saves float32."""
    from sacpo.models.convert import import_model
    from sacpo.models.dtypes import checkpoint_dtype

    sft = import_model(tiny_model, tmp_path / "sft-bf16", dtype="bf16")
    d = str(pku_tiny)
    fields = {
        "stages": [
            {"name": "helpful", "data": {"source": d, "format": "pku_helpful"}, "beta": 0.1},
            {"name": "safe", "data": {"source": d, "format": "pku_safe"}, "lam": 2.0},
        ],
        "merges": [{"name": "psacpo", "a": "helpful", "b": "safe", "qs": [0.5]}],
    }
    out = tmp_path / "p"
    defaults = {**DEFAULTS, "max_steps": 2, "kl_prompts": 0}
    run_pipeline(pipeline_cfg(sft, pku_tiny, out, defaults=defaults, **fields), show_progress=False)
    models = [out / "stages" / "helpful" / "model", out / "stages" / "safe" / "model"]
    models.append(out / "merges" / "psacpo-q0.5" / "model")
    assert [checkpoint_dtype(m) for m in models] == [torch.bfloat16] * 3
    wide = {**defaults, "dtype": "fp32"}
    again = run_pipeline(pipeline_cfg(sft, pku_tiny, out, defaults=wide, **fields), show_progress=False)
    assert again["reference_passes"]["skipped_stages"] == 0
    assert [checkpoint_dtype(m) for m in models] == [torch.float32] * 3


def test_a_config_saved_before_dtype_existed_means_auto(tiny_model, pku_tiny, tmp_path):
    from sacpo.config import to_yaml
    from sacpo.train.config import TrainConfig, same_computation

    fields = {"policy": str(tiny_model), "output_dir": str(tmp_path), "data": {"source": str(pku_tiny)}}
    cfg = from_dict(TrainConfig, fields)
    saved = to_yaml(cfg)
    older = "".join(
        line for line in saved.splitlines(True) if not line.startswith(("dtype:", "warmup_steps:"))
    )
    assert older != saved and same_computation(older, cfg)
    assert not same_computation(saved, from_dict(TrainConfig, {**fields, "dtype": "bf16"}))
    assert not same_computation(saved, from_dict(TrainConfig, {**fields, "warmup_steps": 3}))


def test_a_lora_pipeline_writes_only_adapters_on_the_shared_base(tiny_model, pku_tiny, tmp_path):
    """lora.save=adapter (the default): every stage and merge is an adapter on the SFT model; step 2 stacks on the
    step-1 adapter; the λ sweep shares one reference pass (the step-1 adapter chain fingerprinted by content);
    P-SACPO merges are adapters equal to the dense merge; evaluation reads the pipeline unchanged."""
    from sacpo.evaluate.run import evaluate_models, specs_from_pipeline
    from sacpo.models.adapters import is_adapter_dir, read_chain
    from sacpo.models.load import load_model
    from sacpo.scoring.base import FunctionScorer

    out = tmp_path / "lora"
    lora = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn"]}
    cfg = pipeline_cfg(tiny_model, pku_tiny, out, defaults={**DEFAULTS, "lora": lora, "kl_prompts": 0})
    result = run_pipeline(cfg, show_progress=False)
    assert result["reference_passes"] == {"computed": 3, "cached": 2, "skipped_stages": 0}
    sft = tiny_model.resolve()
    assert result["outputs"] == {"adapter_only": True, "shared_base": str(sft)}
    assert all(r["format"] == "adapter" for r in result["stages"] + result["merges"])
    helpful = out / "stages" / "helpful" / "model"
    step2 = out / "stages" / "safe-lam2" / "model"
    assert read_chain(step2).adapters == (helpful.resolve(), step2)
    assert read_chain(out / "stages" / "safe_from_sft" / "model").parents == ()
    for model_dir in [*out.glob("stages/*/model"), *out.glob("merges/*/model")]:
        assert is_adapter_dir(model_dir) and not list(model_dir.glob("model.safetensors")), model_dir
    psacpo = out / "merges" / "psacpo-q0.25" / "model"
    assert read_chain(psacpo).parents == (helpful.resolve(),)  # θ_1 + q·Δ_2
    a, b, m = (load_model(d).state_dict() for d in (helpful, step2, psacpo))
    for k in a:
        torch.testing.assert_close(m[k], 0.75 * a[k] + 0.25 * b[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert read_chain(out / "merges" / "naive-q0.5" / "model").parents == ()
    assert json.loads((out / "pipeline.json").read_text())["outputs"]["adapter_only"] is True

    again = run_pipeline(cfg, show_progress=False)  # adapter-only stages count as finished
    assert again["reference_passes"] == {"computed": 0, "cached": 0, "skipped_stages": 5}

    sft_dir, specs = specs_from_pipeline(out)
    chosen = {k: specs[k] for k in ("safe-lam2", "psacpo-q0.5")}
    length = FunctionScorer("length", lambda p, y: float(len(y)))
    short = FunctionScorer("short", lambda p, y: 6.0 - len(y))
    kw = dict(n_samples=1, max_new_tokens=4, show_progress=False, n_boot=50)
    rows = evaluate_models(
        chosen, sft_dir, ["Hello", "How do I bake bread?"], length, short, 0.0, tmp_path / "e", **kw
    )
    assert [r.name for r in rows] == ["sft", "safe-lam2", "psacpo-q0.5"] and all(
        r.kl == r.kl for r in rows[1:]
    )
