"""Helpers of the reliability tests: tiny stage configs, the CLI run in-process, run-directory checks."""

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from sacpo.config import from_dict
from sacpo.train.config import TrainConfig

FAST = {
    "max_steps": 6,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_ratio": 0.0,
    "max_length": 80,
    "max_prompt_length": 40,
    "log_every": 2,
    "kl_prompts": 0,
    "eval_fraction": 0.2,
}


def stage_fields(model, data, out, fmt="pku_helpful", **kw) -> dict:
    fields = {
        **FAST,
        "policy": str(model),
        "output_dir": str(out),
        "data": {"source": str(data), "format": fmt},
        "cache_dir": str(Path(out).parent / "cache"),
    }
    fields.update(kw)
    return fields


def make_cfg(model, data, out, **kw) -> TrainConfig:
    return from_dict(TrainConfig, stage_fields(model, data, out, **kw))


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`sacpo ARGV` in this process (the same code path as the console script): (exit code, stdout, stderr).
    An exception escaping main() — what a user would see as a traceback — fails the test."""
    from sacpo.cli import main

    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, *fragments: str) -> str:
    """Exit code 2, no traceback, and a one-line `sacpo CMD: error: ...` message containing every fragment."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line and line.startswith("sacpo ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model directory: its full weights, or an adapter-only output's adapter weights."""
    adapter = path / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else path / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def looks_finished(out: Path) -> bool:
    """Anything a reader could take for a finished stage."""
    return (out / "DONE").exists() or (out / "model").exists() or (out / "summary.json").exists()


def copy_model(src: Path, dst: Path, edit=None) -> Path:
    """Copy a model directory; `edit(state_dict)` may change its tensors before they are written back."""
    shutil.copytree(src, dst)
    if edit is not None:
        sd = load_file(str(dst / "model.safetensors"))
        edit(sd)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"))
    return dst
