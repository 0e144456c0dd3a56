"""Atomic outputs: a stage interrupted in any phase never leaves a directory that counts as finished, model/ only
ever appears complete, and the pipeline skips exactly the finished stages (intact DONE, same config, finished
after their parent) and redoes the others."""

import shutil

import pytest
from reliability_helpers import FAST, copy_model, make_cfg, weights

from sacpo.config import from_dict
from sacpo.merge.linear import merge_dirs
from sacpo.recipes.pipeline import PipelineConfig, run_pipeline
from sacpo.train import checkpoint
from sacpo.train.loop import is_done, train


class Crash(Exception):
    pass


def _raise(*a, **k):
    raise Crash("simulated crash")


def _crash_on_done(real):
    def write(path, text):
        if path.name == checkpoint.DONE:
            raise Crash("simulated crash before DONE")
        return real(path, text)

    return write


def _crash_mid_model_save(real):
    def save(self, directory, *a, **k):  # the weights are written to model.tmp/, the tokenizer is not
        real(self, directory, *a, **k)
        raise Crash("simulated crash while saving the final model")

    return save


def _phases():
    from transformers import PreTrainedModel

    return {
        "reference pass": ("sacpo.train.ref_cache.compute_ref_logps", lambda real: _raise),
        "training step": (
            "sacpo.train.step.packed_pair_logps",
            lambda real: _raise,
        ),  # paired data: one row per pair
        "checkpoint save": ("sacpo.train.checkpoint.atomic_write_json", lambda real: _raise),
        "final model save": (
            PreTrainedModel,
            "save_pretrained",
            lambda real: _crash_mid_model_save(real),
        ),
        "between summary and DONE": ("sacpo.train.checkpoint.atomic_write_text", _crash_on_done),
    }


@pytest.fixture(scope="module")
def finished(tiny_model, pku_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "stage"
    train(make_cfg(tiny_model, pku_tiny, out, max_steps=2, save_every=1), show_progress=False)
    assert is_done(out)
    return out


@pytest.mark.parametrize("phase", list(_phases()))
@pytest.mark.parametrize("previous", ["fresh", "finished before"])
def test_a_crash_in_any_phase_leaves_an_unfinished_directory(
    tiny_model, pku_tiny, tmp_path, monkeypatch, finished, phase, previous
):
    out = tmp_path / "stage"
    cfg = make_cfg(tiny_model, pku_tiny, out, max_steps=2, save_every=1)
    if previous == "finished before":  # a rerun over a finished directory must not leave the old DONE/model
        shutil.copytree(finished, out)
        assert is_done(out)
    target = _phases()[phase]
    if isinstance(target[0], str):
        module, name = target[0].rsplit(".", 1)
        import importlib

        obj = importlib.import_module(module)
    else:
        obj, name = target[0], target[1]
    monkeypatch.setattr(obj, name, target[-1](getattr(obj, name)))
    with pytest.raises(Crash):
        train(cfg, show_progress=False)
    assert not is_done(out)
    assert not (out / checkpoint.DONE).exists()
    if (out / "model").exists():  # only after an atomic rename: complete
        assert phase == "between summary and DONE"
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in (out / "model").iterdir()
        }
    if phase == "checkpoint save":
        assert checkpoint.latest_checkpoint(out) is None  # step-1 has no step.json: ignored
    if phase == "reference pass":
        assert not list((tmp_path / "cache").glob("*.safetensors"))
    if phase == "final model save":  # died with half a model in model.tmp/: it is not presented as model/
        assert (out / "model.tmp" / "model.safetensors").is_file() and not (out / "model").exists()
    if phase == "between summary and DONE":
        assert (out / "summary.json").is_file() and (out / "model").is_dir()


def test_done_marker_must_be_intact_and_backed_by_outputs(tiny_model, pku_tiny, tmp_path):
    out = tmp_path / "stage"
    train(make_cfg(tiny_model, pku_tiny, out, max_steps=1, log_every=1), show_progress=False)
    assert is_done(out)
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    damage = {
        "empty DONE": lambda d: (d / "DONE").write_text(""),
        "torn DONE": lambda d: (d / "DONE").write_text("o"),
        "DONE is a directory": lambda d: ((d / "DONE").unlink(), (d / "DONE").mkdir()),
        "no summary": lambda d: (d / "summary.json").unlink(),
        "torn summary": lambda d: (d / "summary.json").write_text('{"steps": '),
        "no model": lambda d: shutil.rmtree(d / "model"),
        "no weights": lambda d: (d / "model" / "model.safetensors").unlink(),
    }
    for name, fn in damage.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(pristine, d)
        fn(d)
        assert not is_done(d), name


# ----------------------------------------------------------------------------------------------- pipeline
def _pipeline(model, data, out, safe_overrides=None):
    d = str(data)
    return from_dict(
        PipelineConfig,
        {
            "policy": str(model),
            "output_dir": str(out),
            "defaults": {**FAST, "max_steps": 2},
            "stages": [
                {"name": "helpful", "data": {"source": d, "format": "pku_helpful"}, "beta": 0.1},
                {
                    "name": "safe",
                    "data": {"source": d, "format": "pku_safe"},
                    "lam": 2.0,
                    "overrides": safe_overrides or {},
                },
            ],
        },
    )


def test_pipeline_skips_finished_stages_and_redoes_the_others(tiny_model, pku_tiny, tmp_path, monkeypatch):
    out = tmp_path / "p"
    stages = out / "stages"
    import sacpo.train.step as step

    def run():
        return run_pipeline(_pipeline(tiny_model, pku_tiny, out), show_progress=False)["reference_passes"]

    # a crash while training the second stage (after its reference pass): the first is finished, it is not
    real = step.BatchLoss.__call__

    def crash_in_safe(self, *a, **k):
        if self.cfg.output_dir.endswith("safe"):
            raise KeyboardInterrupt("simulated crash")
        return real(self, *a, **k)

    monkeypatch.setattr(step.BatchLoss, "__call__", crash_in_safe)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    assert is_done(stages / "helpful") and not is_done(stages / "safe")
    assert run() == {"computed": 0, "cached": 1, "skipped_stages": 1}
    first_safe = weights(stages / "safe" / "model")

    # nothing to do
    assert run() == {"computed": 0, "cached": 0, "skipped_stages": 2}

    # a corrupt DONE marker: that stage (only) is redone, to the same weights
    (stages / "safe" / "DONE").write_text("")
    assert run() == {"computed": 0, "cached": 1, "skipped_stages": 1}
    assert all((weights(stages / "safe" / "model")[k] == v).all() for k, v in first_safe.items())

    # the parent is redone: its child is redone too (it started from the old parent)
    (stages / "helpful" / "DONE").unlink()
    assert run() == {"computed": 0, "cached": 2, "skipped_stages": 0}

    # the parent was retrained after its child had finished (the pipeline died in between): the child is stale
    (stages / "helpful" / "DONE").unlink()
    monkeypatch.setattr("sacpo.recipes.pipeline.train", lambda cfg, **k: train(cfg, **k) and _raise())
    with pytest.raises(Crash):
        run()
    monkeypatch.undo()
    assert is_done(stages / "helpful") and is_done(stages / "safe")
    assert run() == {"computed": 0, "cached": 1, "skipped_stages": 1}

    # a stage's resolved config changed: it is redone, the unchanged parent is not
    r = run_pipeline(_pipeline(tiny_model, pku_tiny, out, {"lr": 1e-3}), show_progress=False)
    assert r["reference_passes"] == {"computed": 0, "cached": 1, "skipped_stages": 1}


def test_an_interrupted_merge_keeps_the_previous_output(tiny_model, tmp_path, monkeypatch):
    b = copy_model(tiny_model, tmp_path / "b", edit=lambda sd: sd["transformer.wte.weight"].mul_(2))
    out = tmp_path / "merged"
    merge_dirs(tiny_model, b, 0.5, out)
    before = weights(out)
    monkeypatch.setattr("sacpo.merge.linear.atomic_save_file", _raise)
    with pytest.raises(Crash):
        merge_dirs(tiny_model, b, 0.25, out)
    assert all((weights(out)[k] == v).all() for k, v in before.items())
    with pytest.raises(Crash):
        merge_dirs(tiny_model, b, 0.25, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
