"""Configuration of one alignment stage (`sacpo train`). Validated before any model loads."""

from __future__ import annotations

from typing import Literal

import yaml

from sacpo.config import (
    ConfigError,
    Fraction,
    LearningRate,
    ModelDtype,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Seed,
    config_dataclass,
    help_field,
    to_yaml,
)
from sacpo.data.prompt_format import CHAT_TEMPLATE_HELP, SYSTEM_PROMPT_HELP, PromptFormat

# the names of the registries sacpo.data.formats.FORMATS, sacpo.math.preference.LOSSES and sacpo.math.kl.KL_ESTIMATORS
# (a test keeps them equal;
# the registries are not imported here, so that reading a config imports no torch)
DataFormat = Literal["pku_helpful", "pku_safe", "pku_safe_kto", "trl_paired", "trl_unpaired"]
Loss = Literal["dpo", "ipo", "kto"]
KlEstimator = Literal["k1", "k2", "k3"]
Scheduler = Literal["linear", "cosine", "constant"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
LoraSave = Literal["adapter", "merged", "both"]


@config_dataclass
class DataConfig:
    source: str = help_field(help="local .jsonl/.json/.parquet/.csv file, or a hub dataset name")
    format: DataFormat = help_field("pku_helpful", help="record format (sacpo.data.formats.FORMATS)")
    split: str = help_field("train", help="dataset split")
    max_rows: PositiveInt | None = help_field(None, help="use only the first N rows; None = all")
    skip_invalid: bool = help_field(False, help="skip (and count) invalid rows instead of failing")
    drop_both_safe: bool = help_field(
        False,
        help="PKU formats: drop rows whose two responses are both safe (their safer_response_id is noise for a "
        "safety preference)",
    )

    def __post_init__(self) -> None:
        if self.drop_both_safe and not self.format.startswith("pku_"):
            raise ConfigError(f"data.drop_both_safe needs a PKU format, got {self.format!r}")

    def load(self) -> list:
        """The records of this data: `sacpo.data.loaders.load_examples` with every field of this config."""
        from sacpo.data.loaders import load_examples

        return load_examples(
            self.source, self.format, self.split, self.max_rows, self.skip_invalid, self.drop_both_safe
        )


@config_dataclass
class LoraSettings:
    enabled: bool = help_field(False, help="train a LoRA adapter (peft) instead of all weights")
    r: PositiveInt = help_field(8, help="LoRA rank")
    alpha: PositiveInt = help_field(16, help="LoRA alpha (scaling = alpha / r)")
    dropout: Fraction = help_field(0.0, help="LoRA dropout")
    target_modules: list[str] | None = help_field(
        None, help="module names; None = peft's default for the model"
    )
    save: LoraSave = help_field(
        "adapter",
        help="what the run writes: adapter = only the adapter (peft format, with sacpo_adapter.json naming the base "
        "and any adapters it stacks on; every sacpo command loads it as base ⊕ adapters, sacpo.models.adapters); "
        "merged = the dense model with the adapter merged in; both = the dense model and the adapter (in adapter/ "
        "next to it). Output format only: training is the same",
    )


@config_dataclass
class TrainConfig:
    policy: str = help_field(help="HF model directory of the starting policy (safetensors)")
    data: DataConfig = help_field(help="training data")
    output_dir: str = help_field(help="run directory: model/, metrics.jsonl, config.yaml, checkpoints/")
    reference: str | None = help_field(None, help="reference model directory; None = the starting policy")
    loss: Loss = help_field("dpo", help="preference loss (sacpo.math.preference.LOSSES)")
    beta: PositiveFloat = help_field(0.1, help="KL coefficient β (β/λ for a SACPO realignment stage)")
    label_smoothing: float = help_field(0.0, help="conservative DPO ε (dpo only)", ge=0, lt=0.5)
    rpo_alpha: float = help_field(
        0.0,
        help="RPO α (dpo / ipo): add α·(−log π(y_w|x) / |y_w|), the chosen response's per-token NLL, to each pair's "
        "loss (Pang et al. 2024, Eq. 1). Counters likelihood displacement on off-policy chosen "
        "responses; changes the optimum (not plain DPO / SACPO). 0 = off",
        ge=0,
    )
    average_logprobs: bool | None = help_field(
        None,
        help="length-average sequence log-probs (divide by the response's token count); None = auto: true for ipo "
        "(as TRL's IPO, whose β then means the same), false for dpo and kto",
    )
    desirable_weight: PositiveFloat = help_field(1.0, help="KTO λ_D")
    undesirable_weight: PositiveFloat = help_field(1.0, help="KTO λ_U")
    max_length: PositiveInt = help_field(256, help="max tokens of prompt + response")
    max_prompt_length: PositiveInt = help_field(
        128, help="max prompt tokens (prompt is truncated from the left)"
    )
    system_prompt: str | None = help_field(None, help=SYSTEM_PROMPT_HELP)
    chat_template: str | None = help_field(None, help=CHAT_TEMPLATE_HELP)
    batch_size: PositiveInt = help_field(8, help="examples per optimizer micro-step, over all processes")
    grad_accum: PositiveInt = help_field(1, help="gradient accumulation steps")
    epochs: float = help_field(1.0, help="passes over the data (ignored if max_steps > 0)")
    max_steps: NonNegativeInt = help_field(0, help="optimizer steps; 0 = derive from epochs")
    lr: LearningRate = help_field(5e-6, help="AdamW learning rate")
    weight_decay: NonNegativeFloat = help_field(0.0, help="AdamW weight decay")
    fused_adamw: bool = help_field(
        True, help="fused AdamW kernel (same update, one kernel for all parameters)"
    )
    fused_swiglu: bool = help_field(
        True,
        help="Llama-family MLPs keep 2 activations for backward instead of 3 (same output, gradients equal to "
        "rounding; sacpo.models.swiglu)",
    )
    share_prompt: bool = help_field(
        True,
        help="paired losses: run each pair as one row prompt + chosen + rejected, the prompt once instead of twice "
        "(same log-probs up to rounding; falls back to two padded rows where the model or pair does not allow "
        "it; sacpo.data.tokenize.pack_pairs)",
    )
    malloc_tuning: bool = help_field(
        False,
        help="on glibc, fix malloc's mmap/trim thresholds so the step's large buffers are reused from the heap "
        "instead of mapped and unmapped every step (sacpo.train.allocator). Process-wide and not undoable, so off "
        "in the Python API; the sacpo commands (train, pipeline, demo) build their TrainConfigs as "
        "sacpo.recipes.train.CommandTrainConfig, where it defaults to true: set it false there to opt out",
    )
    warmup_ratio: Fraction = help_field(
        0.1, help="fraction of steps with linear warmup: w = ceil(warmup_ratio·total steps)"
    )
    warmup_steps: NonNegativeInt | None = help_field(
        None,
        help="linear warmup steps w (overrides warmup_ratio; may exceed the total). Step s = 0, 1, … runs at "
        "lr·(s+1)/w while s < w, so the first step trains too (sacpo.train.engine); None = from warmup_ratio",
    )
    scheduler: Scheduler = help_field("linear", help="learning-rate schedule after the warmup")
    max_grad_norm: float = help_field(1.0, help="gradient clipping norm; 0 disables", ge=0)
    lora: LoraSettings = help_field(LoraSettings(), help="LoRA settings")
    gradient_checkpointing: bool = help_field(False, help="trade compute for activation memory")
    mixed_precision: MixedPrecision = help_field("auto", help="autocast dtype (auto: bf16 on CUDA, else no)")
    dtype: ModelDtype = help_field(
        "auto",
        help="dtype of the saved model/ (auto | bf16 | fp16 | fp32; auto = the policy checkpoint's own, from its "
        "safetensors). Training always keeps float32 weights (mixed_precision sets the autocast) and the "
        "reference log-probs are computed from float32 weights as the policy's are; the cast is made on save",
    )
    seed: Seed = help_field(0, help="seed for init, data order and sampling")
    log_every: PositiveInt = help_field(10, help="log metrics every N optimizer steps")
    kl_every: NonNegativeInt = help_field(0, help="estimate KL(π‖π_ref) every N steps (0: only at the end)")
    kl_prompts: NonNegativeInt = help_field(
        16, help="held-out prompts sampled for the KL estimate (0 disables)"
    )
    kl_samples: PositiveInt = help_field(2, help="samples per KL prompt")
    kl_max_new_tokens: PositiveInt = help_field(64, help="max new tokens when sampling for KL")
    kl_estimator: KlEstimator = help_field(
        "k1",
        help="sequence-level KL estimator on the samples (sacpo.math.kl.KL_ESTIMATORS): k1 = log r (unbiased), "
        "k2 = ½(log r)², k3 = (1/r − 1) + log r (unbiased, ≥ 0), r = π(y|x)/π_ref(y|x)",
    )
    kl_budget: PositiveFloat | None = help_field(
        None,
        help="stop the stage early once the held-out KL(π‖π_ref) estimate exceeds this many nats (checked every "
        "kl_every steps; needs kl_every > 0, kl_prompts > 0 and eval_fraction > 0); None = no budget",
    )
    eval_fraction: Fraction = help_field(0.1, help="fraction of prompts held out (KL prompts, eval metrics)")
    save_every: NonNegativeInt = help_field(0, help="checkpoint every N steps for --resume (0: never)")
    cache_dir: str | None = help_field(
        None, help="reference log-prob cache; None = <output_dir>/../.ref_cache"
    )
    logprob_chunk: PositiveInt = help_field(
        256, help="sequence chunk for log-probs (bounds the logsumexp temporary)"
    )
    trust_remote_code: bool = help_field(False, help="allow model code from the model directory")

    def __post_init__(self) -> None:
        validate_train_config(self)

    def prompt_format(self) -> PromptFormat:
        """The run's `PromptFormat` (a chat_template file is read here)."""
        return PromptFormat.from_fields(self.system_prompt, self.chat_template)

    @property
    def resolved_average_logprobs(self) -> bool:
        """average_logprobs with None resolved by `resolve_average_logprobs` — what training uses."""
        return resolve_average_logprobs(self.loss, self.average_logprobs)


# losses whose sequence log-probs are length-averaged when average_logprobs is None (TRL's conventions)
AVERAGED_BY_DEFAULT = frozenset({"ipo"})


def resolve_average_logprobs(loss: str, average_logprobs: bool | None) -> bool:
    """The one rule for `average_logprobs`: an explicit value wins; None means True for ipo, False otherwise.

    TRL's DPOTrainer with loss_type="ipo" divides each sequence's log-ratio by its completion length (the IPO
    authors' normalised form); its DPO and KTO sum. Auto matches both, so a β carries over from TRL unchanged."""
    if average_logprobs is not None:
        return average_logprobs
    return loss in AVERAGED_BY_DEFAULT


def validate_train_config(cfg: TrainConfig) -> None:
    """The checks across fields (each field's own bounds and choices are declared on it): a length to train for,
    room for a response, the held-out KL estimate a budget needs, data of the kind the loss consumes, and a
    chat_template that is a template or a readable file."""
    cfg.prompt_format()
    if not (cfg.epochs > 0 or cfg.max_steps > 0):
        raise ConfigError("set epochs > 0 or max_steps > 0")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(
            f"max_prompt_length ({cfg.max_prompt_length}) must be < max_length ({cfg.max_length}): "
            "the response needs at least one token"
        )
    if cfg.kl_budget is not None and not (cfg.kl_every > 0 and cfg.kl_prompts > 0 and cfg.eval_fraction > 0):
        raise ConfigError(
            f"kl_budget={cfg.kl_budget} needs the periodic held-out KL estimate: set kl_every > 0, kl_prompts > 0 "
            f"and eval_fraction > 0 (got kl_every={cfg.kl_every}, kl_prompts={cfg.kl_prompts}, "
            f"eval_fraction={cfg.eval_fraction})"
        )
    from sacpo.data.formats import FORMATS
    from sacpo.math.preference import LOSSES

    loss_kind, data_kind = LOSSES[cfg.loss].kind, FORMATS[cfg.data.format].kind
    if cfg.rpo_alpha > 0 and loss_kind != "paired":
        raise ConfigError(f"rpo_alpha={cfg.rpo_alpha} needs a paired loss (dpo, ipo), not {cfg.loss!r}")
    if loss_kind != data_kind:
        raise ConfigError(
            f"loss {cfg.loss!r} needs {loss_kind} data but data.format {cfg.data.format!r} is {data_kind}"
        )


# settings that change only speed or memory, never a computed value: a finished run trained with other values of
# these (or before they existed) is still current
RUNTIME_ONLY_FIELDS = frozenset({"malloc_tuning"})

# settings that change only how the final model is stored, not the trajectory (a resumed run may change them)
STORAGE_ONLY_FIELDS = frozenset({"dtype"})

# fields added after runs were first written, with the value that reproduces the behaviour from before they
# existed: a saved config without the field describes the same computation as one with this value
ADDED_FIELDS: dict[str, object] = {
    "kl_budget": None,
    "kl_estimator": "k1",
    "system_prompt": None,
    "chat_template": None,
    "warmup_steps": None,
    "rpo_alpha": 0.0,
    "dtype": "auto",  # exact for float32 policies (the old runs saved float32); see same_computation
}
ADDED_DATA_FIELDS: dict[str, object] = {"drop_both_safe": False}  # the same, for DataConfig fields
ADDED_LORA_FIELDS: dict[str, object] = {"save": "both"}  # LoraSettings: runs before lora.save wrote both


def comparable(fields: dict, ignore: frozenset[str] = frozenset()) -> dict:
    """A TrainConfig as a plain dict (to_dict or a saved config.yaml), normalised for comparing computations:
    average_logprobs resolved (None → its auto value for the loss), fields of ADDED_FIELDS at their old-behaviour
    value dropped, the fields in `ignore` dropped. Returns a new dict."""
    out = dict(fields)
    out["average_logprobs"] = resolve_average_logprobs(
        out.get("loss", "dpo"), out.get("average_logprobs", False)
    )
    for key, old in ADDED_FIELDS.items():
        if key in out and out[key] == old:
            del out[key]
    if isinstance(out.get("data"), dict):
        out["data"] = {
            k: v for k, v in out["data"].items() if not (k in ADDED_DATA_FIELDS and v == ADDED_DATA_FIELDS[k])
        }
    if isinstance(out.get("lora"), dict):  # lora.save means nothing without LoRA
        lora = out["lora"]
        out["lora"] = {
            k: v
            for k, v in lora.items()
            if not (k in ADDED_LORA_FIELDS and (v == ADDED_LORA_FIELDS[k] or not lora.get("enabled")))
        }
    for key in ignore:
        out.pop(key, None)
    return out


def same_computation(saved_yaml: str, cfg: TrainConfig) -> bool:
    """True when a run's saved config.yaml describes the same training as cfg: equal once both are `comparable`
    (runtime-only settings ignored, average_logprobs resolved, fields added since at their old-behaviour value).

    A config saved before average_logprobs became auto holds an explicit false: still current for dpo and kto,
    stale for ipo (which now length-averages by default). One saved before `dtype` existed counts as dtype auto:
    the same output for a float32 policy (the old runs always saved float32), a float32 model where a bf16/fp16
    policy would now give its own dtype."""
    saved, current = yaml.safe_load(saved_yaml), yaml.safe_load(to_yaml(cfg))
    if not isinstance(saved, dict):
        return False
    return comparable(saved, RUNTIME_ONLY_FIELDS) == comparable(current, RUNTIME_ONLY_FIELDS)
