"""The stepwise SACPO pipeline: a list of stages run by one function, then P-SACPO / naive merges.

Each stage starts from its parent's policy (the previous stage by default, or `start_from: sft` / a stage name),
which is also its reference. A stage with a list of β or λ values is a sweep: one branch per value, all sharing the
parent and — since the reference and data are the same — one cached reference pass. With `lam`, the stage's
coefficient is β_parent/λ (SACPO step 2, Wachi et al. 2024, Alg. 1). Order helpful→safe or safe→helpful is just the
order of the list. A finished stage (intact DONE marker, same resolved config, finished after its parent) is
skipped, so an interrupted pipeline can be rerun; any other stage is (re)trained from scratch.

The prompt format (`system_prompt`, `chat_template`) is a TrainConfig field like any other: set it in `defaults` for
every stage (on-policy pairs are sampled with it too), or in a stage's `overrides`.

Stage configs are `CommandTrainConfig`s (sacpo.recipes.train): glibc's malloc thresholds are on unless `defaults`
or a stage's `overrides` set `malloc_tuning: false`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sacpo.config import (
    ConfigError,
    Probability,
    config_dataclass,
    deep_update,
    from_dict,
    help_field,
    to_yaml,
)
from sacpo.data.prompt_format import DEFAULT_FORMAT
from sacpo.fsutil import atomic_write_json, atomic_write_text
from sacpo.merge.linear import MergeOutput, merge_dirs
from sacpo.models.adapters import is_adapter_dir, read_chain
from sacpo.models.load import ModelLoadError
from sacpo.models.resolve import resolve_policy
from sacpo.recipes.train import CommandTrainConfig
from sacpo.train.allocator import release_memory
from sacpo.train.checkpoint import DONE
from sacpo.train.config import DataConfig, Loss, TrainConfig, same_computation
from sacpo.train.loop import is_done, train
from sacpo.train.onpolicy import LABEL_FIELDS, OnPolicyConfig, generate_preferences, made_with
from sacpo.train.workspace import SweepWorkspace

log = logging.getLogger("sacpo.pipeline")

SFT = "sft"


@config_dataclass
class StageConfig:
    name: str = help_field(help="stage name (also its output directory under stages/)")
    data: DataConfig = help_field(help="preference data of this stage")
    loss: Loss = help_field("dpo", help="preference loss of this stage")
    beta: float | list[float] | None = help_field(None, help="β, or a list of β (sweep)")
    lam: float | list[float] | None = help_field(
        None, help="λ, or a list (sweep): β = β_parent/λ (SACPO realignment)"
    )
    start_from: str | None = help_field(None, help="'sft' or a stage name; default: the previous stage")
    overrides: dict[str, Any] = help_field({}, help="TrainConfig fields for this stage only")
    on_policy: OnPolicyConfig | None = help_field(
        None,
        help="regenerate this stage's pairs from its own reference (parent) policy on the prompts of `data`, "
        "labelled by a named judge (sacpo.train.onpolicy); None: train on `data` as given",
    )


@config_dataclass
class MergeSpec:
    name: str = help_field(help="name of the merged models (merges/<name>-q<q>)")
    a: str = help_field(help="stage (or branch) for θ_a — P-SACPO: the step-1 policy")
    b: str = help_field(help="stage (or branch) for θ_b — P-SACPO: the step-2 policy with a large λ")
    qs: list[Probability] = help_field([0.25, 0.5, 0.75], help="merge weights q: θ = (1−q)·θ_a + q·θ_b")
    output: MergeOutput = help_field(
        "auto",
        help="adapter | dense | auto (adapter when both stages wrote adapters on the shared base, else a full "
        "model; sacpo.merge.linear)",
    )


@config_dataclass
class PipelineConfig:
    policy: str = help_field(help="SFT policy directory, or builtin:tiny-gpt2")
    output_dir: str = help_field(help="pipeline directory: stages/, merges/, pipeline.json")
    stages: list[StageConfig] = help_field(help="stages in order")
    defaults: dict[str, Any] = help_field(
        {}, help="TrainConfig fields shared by every stage (as sacpo.recipes.train.CommandTrainConfig)"
    )
    merges: list[MergeSpec] = help_field([], help="weight merges after training")
    reuse_policy: bool = help_field(
        True,
        help="branches of a sweep reuse one loaded policy and its optimizer buffers (same results; the initial "
        "weights are read back from the parent's files, or, for LoRA or on a GPU, kept as one CPU copy)",
    )


@dataclass(frozen=True)
class Branch:
    """One trained (or to-be-trained) policy: a stage for one parent branch and one β."""

    name: str
    stage: str
    parent: str
    beta: float | None
    model_dir: Path
    train: TrainConfig | None  # None for the SFT policy
    stage_cfg: StageConfig | None = None  # None for the SFT policy


def _values(x: float | list[float] | None) -> list[float] | None:
    return None if x is None else ([float(v) for v in x] if isinstance(x, list) else [float(x)])


def plan(cfg: PipelineConfig, policy_dir: Path) -> dict[str, list[Branch]]:
    """Expand stages into branches and validate every TrainConfig (before any model loads)."""
    branches: dict[str, list[Branch]] = {SFT: [Branch(SFT, SFT, "", None, policy_dir, None)]}
    previous = SFT
    for stage in cfg.stages:
        if stage.name in branches or "/" in stage.name:
            raise ConfigError(f"stage name {stage.name!r} is reserved, repeated or contains '/'")
        parent = stage.start_from or previous
        if parent not in branches:
            raise ConfigError(
                f"stage {stage.name!r} starts from unknown stage {parent!r}; known: {sorted(branches)}"
            )
        if stage.beta is not None and stage.lam is not None:
            raise ConfigError(f"stage {stage.name!r}: give beta or lam, not both")
        sweep_key, values = (
            ("lam", _values(stage.lam)) if stage.lam is not None else ("beta", _values(stage.beta))
        )
        values = values or [None]
        parents = branches[parent]
        branches[stage.name] = [
            _branch(cfg, stage, pb, sweep_key, v, len(parents) == 1, len(values) > 1)
            for pb in parents
            for v in values
        ]
        previous = stage.name
    return branches


def _branch(
    cfg: PipelineConfig,
    stage: StageConfig,
    pb: Branch,
    sweep_key: str,
    v: float | None,
    only_parent: bool,
    sweep: bool,
) -> Branch:
    """The branch of `stage` from parent branch `pb` for sweep value v (a β, or a λ: β = β_parent/λ)."""
    if sweep_key == "lam":
        if pb.beta is None:
            raise ConfigError(f"stage {stage.name!r}: lam needs a parent trained with a β, not {pb.stage!r}")
        if v <= 0:
            raise ConfigError(f"stage {stage.name!r}: lam must be > 0, got {v:g}")
        beta = pb.beta / v
    else:
        beta = v
    name = stage.name if only_parent else f"{pb.name}+{stage.name}"
    if sweep:
        name += f"-{sweep_key}{v:g}"
    out = Path(cfg.output_dir)
    fields = deep_update(cfg.defaults, stage.overrides)
    fields.update(
        policy=str(pb.model_dir),
        reference=None,
        data=_stage_data(stage, onpolicy_dir(out, stage.name, pb.name)),
        loss=stage.loss,
        output_dir=str(out / "stages" / name),
        cache_dir=str(out / ".ref_cache"),
    )
    if beta is not None:
        fields["beta"] = beta
    try:
        tcfg = from_dict(CommandTrainConfig, fields, where=f"stage {name}: ")
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("stage ") else f"stage {name}: {msg}") from None
    return Branch(name, stage.name, pb.name, tcfg.beta, out / "stages" / name / "model", tcfg, stage)


def _stage_data(stage: StageConfig, onpolicy: Path) -> dict[str, Any]:
    """The stage's data fields; with on_policy, the pairs sampled from the parent (written to `onpolicy`)."""
    data = dict(stage.data.__dict__)
    if stage.on_policy is not None:
        if stage.data.format not in LABEL_FIELDS:
            raise ConfigError(
                f"stage {stage.name!r}: on_policy needs a PKU data.format {sorted(LABEL_FIELDS)}, "
                f"got {stage.data.format!r}"
            )
        data.update(source=str(onpolicy / "preferences.jsonl"), split="train", max_rows=None)
    return data


def onpolicy_dir(out: Path, stage: str, parent: str) -> Path:
    """Where a stage's on-policy pairs from one parent live (shared by the branches of a sweep)."""
    return out / "onpolicy" / stage / parent


def _make_onpolicy_data(br: Branch, parent: Branch, out: Path) -> None:
    """Sample and label the branch's pairs from its parent policy (reused when the parent is unchanged)."""
    from sacpo.data.loaders import load_rows
    from sacpo.data.prompts import prompt_from_json

    stage = br.stage_cfg
    rows = load_rows(stage.data.source, stage.data.split, stage.data.max_rows)
    prompts = [prompt_from_json(r["prompt"]) for r in rows if "prompt" in r]
    generate_preferences(
        parent.model_dir,
        prompts,
        stage.data.format,
        stage.on_policy,
        onpolicy_dir(out, stage.name, parent.name),
        max_prompt_length=br.train.max_prompt_length,
        prompt_format=br.train.prompt_format(),
    )


def _find(branches: dict[str, list[Branch]], ref: str) -> list[Branch]:
    if ref in branches:
        return branches[ref]
    exact = [b for bs in branches.values() for b in bs if b.name == ref]
    if not exact:
        names = sorted({b.name for bs in branches.values() for b in bs} | set(branches))
        raise ConfigError(f"merge refers to unknown stage or branch {ref!r}; known: {names}")
    return exact


def _validate_merges(cfg: PipelineConfig, branches: dict[str, list[Branch]]) -> None:
    """Every merge names stages or branches of the plan (its weights are checked on MergeSpec.qs)."""
    for m in cfg.merges:
        _find(branches, m.a), _find(branches, m.b)


def _stale(br: Branch, parent: Branch) -> str | None:
    """Why a branch must be (re)trained, or None when its finished output can be reused."""
    run_dir = Path(br.train.output_dir)
    if not is_done(run_dir):
        return "not finished"
    config = run_dir / "config.yaml"
    if not config.is_file() or not same_computation(config.read_text(), br.train):
        return "its config changed"
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("prompt_format", DEFAULT_FORMAT.to_json()) != br.train.prompt_format().to_json():
        return "its chat_template file changed"
    on_policy = br.stage_cfg.on_policy if br.stage_cfg is not None else None
    if on_policy is not None:
        data = Path(br.train.data.source)
        if not made_with(data, on_policy):
            return "its on-policy data settings changed"
        if data.stat().st_mtime_ns > (run_dir / DONE).stat().st_mtime_ns:
            return "its on-policy data was regenerated after it (by a sibling branch)"
    if parent.train is not None:
        parent_done = Path(parent.train.output_dir) / DONE
        if parent_done.stat().st_mtime_ns > (run_dir / DONE).stat().st_mtime_ns:
            return f"its parent {parent.name} was retrained after it"
    return None


def run_pipeline(cfg: PipelineConfig, show_progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Train every branch (skipping finished ones unless force), then merge; write pipeline.json."""
    out = Path(cfg.output_dir)
    # validate every stage and merge before anything is built, loaded or written
    _validate_merges(cfg, plan(cfg, Path(cfg.policy)))
    out.mkdir(parents=True, exist_ok=True)
    try:
        policy_dir = resolve_policy(cfg.policy, out)
    except ValueError as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ConfigError(f"policy: {e}") from None
    branches = plan(cfg, policy_dir)
    atomic_write_text(out / "pipeline.yaml", to_yaml(cfg))
    counts = {"computed": 0, "cached": 0, "skipped_stages": 0}
    records = _train_branches(cfg, branches, counts, show_progress, force)
    merges = _merge(cfg, branches)
    release_memory()  # the freed training and merge memory glibc's heap keeps goes back (before an evaluation)
    log.info(
        "reference passes: %d computed, %d read from cache (%d stages skipped as finished)",
        counts["computed"],
        counts["cached"],
        counts["skipped_stages"],
    )
    result = {
        "policy": str(policy_dir),
        "stages": records,
        "merges": merges,
        "reference_passes": counts,
        "outputs": _outputs(records, merges),
    }
    atomic_write_json(out / "pipeline.json", result)
    return result


def _train_branches(
    cfg: PipelineConfig,
    branches: dict[str, list[Branch]],
    counts: dict[str, int],
    show_progress: bool,
    force: bool,
) -> list[dict[str, Any]]:
    """Train (or skip, when finished and current) every branch after the SFT policy, in order; returns one record
    per branch and adds to the reference-pass `counts`. Siblings of a sweep share one loaded policy."""
    out = Path(cfg.output_dir)
    by_name = {b.name: b for bs in branches.values() for b in bs}
    records = []
    workspace = SweepWorkspace()
    for stage_branches in list(branches.values())[1:]:
        for br in stage_branches:
            run_dir = Path(br.train.output_dir)
            reason = "--force" if force else _stale(br, by_name[br.parent])
            if reason is None:
                log.info("stage %s already finished; skipping", br.name)
                counts["skipped_stages"] += 1
                summary = json.loads((run_dir / "summary.json").read_text())
            else:
                log.info("stage %s (%s): %s β=%g from %s", br.name, reason, br.train.loss, br.beta, br.parent)
                if br.stage_cfg.on_policy is not None:
                    _make_onpolicy_data(br, by_name[br.parent], out)
                # siblings (same stage and parent) still to train after this one share the loaded policy
                later = [b for b in stage_branches[stage_branches.index(br) + 1 :] if b.parent == br.parent]
                reuse = cfg.reuse_policy and (workspace.holds_policy or bool(later))
                workspace.last_branch = not later
                train(br.train, show_progress=show_progress, workspace=workspace if reuse else None)
                if not later:
                    workspace.clear()
                summary = json.loads((run_dir / "summary.json").read_text())
                counts[summary["reference_pass"]] += 1
            records.append(
                {
                    "name": br.name,
                    "stage": br.stage,
                    "parent": br.parent,
                    "beta": br.beta,
                    "loss": br.train.loss,
                    "model": str(br.model_dir),
                    **_format(br.model_dir),
                    "summary": summary,
                }
            )
    workspace.clear()
    return records


def _merge(cfg: PipelineConfig, branches: dict[str, list[Branch]]) -> list[dict[str, Any]]:
    """Every merge θ = (1−q)·θ_a + q·θ_b of the config, written to merges/<name>[-<b>]-q<q>/model."""
    out = Path(cfg.output_dir)
    merges = []
    for m in cfg.merges:
        for a in _find(branches, m.a):
            bs = _find(branches, m.b)
            for b in bs:
                for q in m.qs:
                    name = f"{m.name}-q{q:g}" if len(bs) == 1 else f"{m.name}-{b.name}-q{q:g}"
                    target = out / "merges" / name / "model"
                    merge_dirs(a.model_dir, b.model_dir, q, target, m.output)
                    merges.append(
                        {
                            "name": name,
                            "a": a.name,
                            "b": b.name,
                            "q": q,
                            "model": str(target),
                            **_format(target),
                        }
                    )
    return merges


def _format(model_dir: Path) -> dict[str, Any]:
    """How a model was written: {"format": "dense"}, or "adapter" with its chain (base, adapters in order)."""
    if not is_adapter_dir(model_dir):
        return {"format": "dense"}
    chain = read_chain(model_dir)
    return {"format": "adapter", "base": str(chain.base), "adapters": [str(p) for p in chain.adapters]}


def _outputs(records: list[dict[str, Any]], merges: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether every stage and merge wrote only an adapter, and the one base they share (None otherwise)."""
    written = records + merges
    adapter_only = bool(written) and all(r["format"] == "adapter" for r in written)
    bases = {r.get("base") for r in written}
    return {
        "adapter_only": adapter_only,
        "shared_base": bases.pop() if adapter_only and len(bases) == 1 else None,
    }
