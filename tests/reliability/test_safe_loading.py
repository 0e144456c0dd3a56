"""Safe loading: only safetensors weights are read (pickle files are refused, never unpickled), model code from a
model directory is never run unless trust_remote_code is set, broken directories give ModelLoadError, and merges
refuse models that differ in architecture, tensor keys, shapes, dtypes or tokenizer."""

import json
import pathlib
import pickle
import shutil

import pytest
import torch
from reliability_helpers import assert_user_error, copy_model, make_cfg, run_cli, stage_fields, write_yaml

from sacpo.config import ConfigError
from sacpo.math.merging import MergeError
from sacpo.merge.linear import merge_dirs
from sacpo.models.load import ModelLoadError, fingerprint_model, load_model, load_tokenizer
from sacpo.models.tiny import build_tiny_gpt2
from sacpo.train.loop import train


class _Payload:
    """Unpickling this creates the sentinel file: proof that a pickle was (not) loaded."""

    def __init__(self, sentinel: pathlib.Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (pathlib.Path.touch, (self.sentinel,))


def _pickle_only_dir(tiny_model, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model, d)
    (d / "model.safetensors").unlink()
    sentinel = tmp_path / "UNPICKLED"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    return d, sentinel


def test_pickle_weights_are_refused_with_an_explanation(tiny_model, tmp_path):
    d, sentinel = _pickle_only_dir(tiny_model, tmp_path)
    for load in (load_model, fingerprint_model, lambda p: merge_dirs(p, tiny_model, 0.5, tmp_path / "m")):
        with pytest.raises(
            ModelLoadError, match=r"no \.safetensors weights.*pytorch_model\.bin.*pickle.*execute"
        ):
            load(d)
    assert not sentinel.exists() and not (tmp_path / "m").exists()
    pickle.loads((d / "pytorch_model.bin").read_bytes())  # the control: unpickling does run the payload
    assert sentinel.exists()


def test_pickle_policy_through_the_cli(tiny_model, pku_tiny, tmp_path, capsys):
    d, sentinel = _pickle_only_dir(tiny_model, tmp_path)
    cfg = write_yaml(tmp_path / "stage.yaml", stage_fields(d, pku_tiny, tmp_path / "run"))
    rc, _, err = run_cli(["-q", "train", str(cfg)], capsys)
    assert_user_error(rc, err, str(d), "pickle", "safe_serialization=True")
    assert not sentinel.exists() and not (tmp_path / "run").exists()


def test_a_pickle_next_to_safetensors_is_never_read(tiny_model, tmp_path):
    d = tmp_path / "both"
    shutil.copytree(tiny_model, d)
    sentinel = tmp_path / "UNPICKLED"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    load_model(d)
    assert not sentinel.exists()


def _custom_code_dir(tiny_model, tmp_path, model_type: str) -> tuple[pathlib.Path, pathlib.Path]:
    d = tmp_path / f"custom-{model_type}"
    shutil.copytree(tiny_model, d)
    sentinel = tmp_path / f"CODE_RAN_{model_type}"
    (d / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class EvilConfig(GPT2Config):\n    model_type = 'sacpo_evil'\n"
        "class EvilModel(GPT2LMHeadModel):\n    config_class = EvilConfig\n"
    )
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return d, sentinel


def test_custom_model_code_is_not_run_without_trust_remote_code(tiny_model, tmp_path):
    d, sentinel = _custom_code_dir(tiny_model, tmp_path, "sacpo_evil")
    with pytest.raises(ModelLoadError, match=r"cannot load the model.*contains custom code"):
        load_model(d)
    assert not sentinel.exists()
    # a known architecture with an auto_map: transformers' own class is used, the directory's code is not
    d, sentinel = _custom_code_dir(tiny_model, tmp_path, "gpt2")
    model = load_model(d)
    assert type(model).__module__.startswith("transformers.")
    try:
        load_tokenizer(d)
    except ModelLoadError:
        pass
    assert not sentinel.exists()


@pytest.mark.parametrize("trust", [False, True])
def test_every_load_of_a_stage_passes_the_trust_remote_code_setting(
    tiny_model, pku_tiny, tmp_path, monkeypatch, trust
):
    """Policy, tokenizer, reference pass and the held-out KL estimate's reference all get the stage's setting
    (off by default; regression: the KL estimate loaded the reference without it)."""
    import sacpo.train.heldout as heldout
    import sacpo.train.loop as loop
    import sacpo.train.policy as policy
    import sacpo.train.ref_cache as ref_cache

    seen = []
    for module, name in [
        (policy, "load_model"),
        (heldout, "load_model"),
        (loop, "load_tokenizer"),
        (ref_cache, "load_model"),
    ]:
        real = getattr(module, name)

        def spy(path, *a, _real=real, _name=name, **k):
            seen.append((_name, k.get("trust_remote_code", a[-1] if a else False)))
            return _real(path, *a, **k)

        monkeypatch.setattr(module, name, spy)
    extra = {"trust_remote_code": True} if trust else {}
    # a reference other than the policy: the reference pass loads it (with reference = policy, the built policy
    # serves the pass and there is no separate load)
    reference = shutil.copytree(tiny_model, tmp_path / "reference")
    cfg = make_cfg(
        tiny_model,
        pku_tiny,
        tmp_path / "run",
        max_steps=1,
        kl_prompts=1,
        kl_max_new_tokens=4,
        reference=str(reference),
        **extra,
    )
    assert cfg.trust_remote_code is trust
    train(cfg, show_progress=False)
    assert [n for n, _ in seen].count("load_model") >= 3  # policy, reference pass, KL reference
    assert {"load_model", "load_tokenizer"} <= {n for n, _ in seen} and all(t is trust for _, t in seen), seen


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing directory", "model directory not found"),
        ("no config.json", "no config.json"),
        ("truncated weights", "cannot load the model"),
        ("garbage weights", "cannot load the model"),
        ("unknown model_type", "cannot load the model"),
    ],
)
def test_broken_model_directories_raise_model_load_error(tiny_model, tmp_path, damage, message):
    d = tmp_path / "broken"
    if damage != "missing directory":
        shutil.copytree(tiny_model, d)
    w = d / "model.safetensors"
    if damage == "no config.json":
        (d / "config.json").unlink()
    elif damage == "truncated weights":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "garbage weights":
        w.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif damage == "unknown model_type":
        (d / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    with pytest.raises(ModelLoadError, match=message):
        load_model(d)
    if damage == "missing directory":
        with pytest.raises(ModelLoadError, match=message):
            load_tokenizer(d)


# -------------------------------------------------------------------------------------------------- merges
def _retokenized(d: pathlib.Path) -> None:
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][0], "id": 257, "content": "<|extra|>"})
    (d / "tokenizer.json").write_text(json.dumps(tok))


def _drop(key):
    return lambda sd: sd.pop(key)


MERGE_MISMATCHES = {
    "architecture (n_layer)": (lambda tiny, b: build_tiny_gpt2(b, n_layer=3), "different configs"),
    "architecture (n_embd)": (lambda tiny, b: build_tiny_gpt2(b, n_embd=32), "different configs"),
    "key set": (
        lambda tiny, b: copy_model(tiny, b, _drop("transformer.h.1.mlp.c_fc.bias")),
        "different keys",
    ),
    "shape": (
        lambda tiny, b: copy_model(
            tiny, b, lambda sd: sd.update({"transformer.wte.weight": sd["transformer.wte.weight"][:-1]})
        ),
        "has shape",
    ),
    "dtype": (
        lambda tiny, b: copy_model(tiny, b, lambda sd: sd.update({k: v.half() for k, v in sd.items()})),
        "dtype",
    ),
    "tokenizer content": (lambda tiny, b: _retokenized(copy_model(tiny, b)), "different tokenizers"),
    "tokenizer missing": (
        lambda tiny, b: (copy_model(tiny, b) / "tokenizer.json").unlink(),
        "different tokenizers",
    ),
}


@pytest.mark.parametrize("case", list(MERGE_MISMATCHES))
def test_merge_refuses_mismatched_models(tiny_model, tmp_path, capsys, case):
    make, message = MERGE_MISMATCHES[case]
    b = tmp_path / "b"
    make(tiny_model, b)
    with pytest.raises(MergeError, match=message):
        merge_dirs(tiny_model, b, 0.5, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    cfg = write_yaml(
        tmp_path / "merge.yaml", {"a": str(tiny_model), "b": str(b), "output_dir": str(tmp_path / "m")}
    )
    rc, _, err = run_cli(["-q", "merge", str(cfg), "qs=[0.5]"], capsys)
    assert_user_error(rc, err, message)
    assert not (tmp_path / "m" / "q0.5").exists()


def test_merge_of_matching_models_is_the_interpolation(tiny_model, tmp_path):
    from safetensors.torch import load_file

    b = copy_model(tiny_model, tmp_path / "b", lambda sd: sd["transformer.wte.weight"].mul_(3))
    out = merge_dirs(tiny_model, b, 0.25, tmp_path / "merged")
    wa, wb, wm = (
        load_file(str(p / "model.safetensors"))["transformer.wte.weight"] for p in (tiny_model, b, out)
    )
    torch.testing.assert_close(wm, 0.75 * wa + 0.25 * wb)


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpointed(tiny_model, pku_tiny, tmp_path_factory):
    """A finished 2-step run with its step-1 checkpoint (a later --resume restores it)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(make_cfg(tiny_model, pku_tiny, out, max_steps=2, save_every=1), show_progress=False)
    return out


def _resume_copy(checkpointed, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    out = shutil.copytree(checkpointed, tmp_path / "run")
    return out, out / "checkpoints" / "step-1"


def test_a_checkpoint_holds_only_safetensors_and_json(checkpointed):
    files = [p for p in (checkpointed / "checkpoints").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files), files
    assert {"model.safetensors", "optimizer.safetensors", "custom-0.json", "rng-0.json", "step.json"} <= {
        p.name for p in files
    }


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "extra.pt", "sub/x.pth"])
def test_resume_refuses_a_checkpoint_holding_a_pickle(tiny_model, pku_tiny, checkpointed, tmp_path, name):
    out, ckpt = _resume_copy(checkpointed, tmp_path)
    sentinel = tmp_path / "UNPICKLED"
    (ckpt / name).parent.mkdir(exist_ok=True)
    (ckpt / name).write_bytes(pickle.dumps(_Payload(sentinel)))
    cfg = make_cfg(tiny_model, pku_tiny, out, max_steps=2, save_every=1)
    with pytest.raises(ConfigError, match=rf"cannot resume from .*step-1.*{name}.*pickle.*without --resume"):
        train(cfg, resume=True, show_progress=False)
    assert not sentinel.exists()
    pickle.loads((ckpt / name).read_bytes())  # the control: unpickling does run the payload
    assert sentinel.exists()


def test_resume_refuses_a_pickle_named_safetensors_or_json(tiny_model, pku_tiny, checkpointed, tmp_path):
    for name in ("optimizer.safetensors", "custom-0.json"):
        out, ckpt = _resume_copy(checkpointed, tmp_path / name)
        sentinel = tmp_path / "UNPICKLED"
        (ckpt / name).write_bytes(pickle.dumps(_Payload(sentinel)))
        cfg = make_cfg(tiny_model, pku_tiny, out, max_steps=2, save_every=1)
        with pytest.raises(ConfigError, match=rf"checkpoint file .*{name} is missing or"):
            train(cfg, resume=True, show_progress=False)
        assert not sentinel.exists()


def test_an_accelerate_save_state_checkpoint_is_refused_through_the_cli(
    tiny_model, pku_tiny, checkpointed, tmp_path, capsys, monkeypatch
):
    """The format of earlier versions (accelerate's save_state: optimizer.bin, random_states_0.pkl,
    custom_checkpoint_0.pkl): a clear one-line error that says to start over, and nothing is unpickled."""
    from accelerate import Accelerator

    out, ckpt = _resume_copy(checkpointed, tmp_path)
    step_json = (ckpt / "step.json").read_text()
    shutil.rmtree(ckpt)
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    acc.save_state(str(ckpt))
    (ckpt / "step.json").write_text(step_json)
    assert {"random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin"} <= {
        p.name for p in ckpt.iterdir()
    }
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: unpickled.append(a))
    cfg = write_yaml(
        tmp_path / "stage.yaml", stage_fields(tiny_model, pku_tiny, out, max_steps=2, save_every=1)
    )
    rc, _, err = run_cli(["-q", "train", str(cfg), "--resume"], capsys)
    assert_user_error(rc, err, "cannot resume", "pickle", "save_state", "without --resume")
    assert not unpickled
