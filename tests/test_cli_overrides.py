"""The config commands without a CONFIG file: `key=value` overrides alone give every field, a missing required
field is named, and a first argument that is an existing file is still read as the config."""

import json

import pytest
import yaml

from sacpo.cli import CONFIG_CLASSES, main, split_config_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = [
    "max_steps=2",
    "batch_size=8",
    "max_length=80",
    "max_prompt_length=40",
    "kl_prompts=0",
    "eval_fraction=0.2",
    "malloc_tuning=false",
]


def test_train_from_overrides_alone(tiny_model, pku_tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"policy={tiny_model}", f"data.source={pku_tiny}", *TRAIN]
    assert main(["-q", "train", *args]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["policy"] == str(tiny_model) and saved["data"]["source"] == str(pku_tiny)
    assert (out / "DONE").is_file()


@pytest.mark.parametrize("command", sorted(set(CONFIG_CLASSES) - {"demo", "demo-real"}))  # no required field
def test_missing_required_fields_are_named(command, capsys):
    assert main(["-q", command]) == 2
    err = capsys.readouterr().err
    assert "missing required key(s)" in err and "no CONFIG file given" in err
    assert f"sacpo {command} --help-config" in err


def test_the_error_names_only_what_the_overrides_leave_out(tiny_model, capsys):
    assert main(["-q", "train", f"policy={tiny_model}", "beta=0.2"]) == 2
    err = capsys.readouterr().err
    assert "missing required key(s) ['data', 'output_dir']" in err


def test_a_config_file_and_overrides_still_work(tiny_model, pku_tiny, tmp_path):
    cfg = tmp_path / "a=b.yaml"  # a file whose name has '=' is still the config
    cfg.write_text(yaml.safe_dump({"policy": str(tiny_model), "data": {"source": str(pku_tiny)}}))
    assert split_config_args(str(cfg), ["x=1"]) == (str(cfg), ["x=1"])
    assert split_config_args("beta=0.2", ["x=1"]) == (None, ["beta=0.2", "x=1"])
    assert split_config_args(None, []) == (None, [])
    out = tmp_path / "run"
    assert main(["-q", "train", str(cfg), f"output_dir={out}", *TRAIN]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["output_dir"] == str(out)


def test_a_missing_config_file_is_still_an_error(capsys):
    assert main(["-q", "train", "nope.yaml"]) == 2
    assert "nope.yaml: no such config file" in capsys.readouterr().err
