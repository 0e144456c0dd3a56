"""The `judges:` entries of an evaluation config, and the judges they build.

    judges:
      - {kind: llm, base_url: https://api.openai.com/v1, model: gpt-4o, criterion: harmlessness}
      - {kind: llm, base_url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2.5-7B-Instruct, criterion: my.yaml}
      - {kind: reward_model, dir: runs/rm}            # helpfulness: a Bradley–Terry model, an ensemble, or any
      - {kind: cost_model, dir: [runs/cm0, runs/cm1]} # HF sequence-classification directory (num_labels = 1)
      - {kind: oracle, name: toyworld}                # a registered gold oracle: its reward and its safety
      - {kind: scorer, name: refusal, criterion: harmlessness}   # any registered scorer

Each judge compares a model's response with the SFT policy's response to the same prompt and sample index; an
LLM judge asks in both orders (`sacpo.scoring.llm_judge`), a pointwise judge compares the two scores
(`sacpo.math.judges.score_outcome`; a cost model's lower cost wins). Criterion: llm → its template's
(helpfulness, harmlessness, or the template file's stem); reward_model → helpfulness; cost_model → harmlessness;
oracle → both (two judges, <name>.reward and <name>.safety); scorer → its `criterion`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sacpo.config import (
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
    help_field,
)
from sacpo.scoring.api_client import ApiConfig

KINDS = ("llm", "reward_model", "cost_model", "oracle", "scorer")
LLM_FIELDS = (
    "base_url",
    "model",
    "api_key_env",
    "temperature",
    "max_tokens",
    "verdict_retries",
    "retry_temperature",
    "seed",
    "concurrency",
    "max_retries",
    "timeout",
)
MODEL_FIELDS = ("dir", "aggregate", "max_length", "max_prompt_length")
SHARED_FIELDS = ("criterion",)  # llm and scorer
OWN_FIELDS = {
    "llm": (*LLM_FIELDS, "criterion"),
    "reward_model": MODEL_FIELDS,
    "cost_model": MODEL_FIELDS,
    "oracle": (),
    "scorer": ("criterion",),
}


@config_dataclass
class JudgeConfig:
    kind: Literal["llm", "reward_model", "cost_model", "oracle", "scorer"] = help_field(
        help="llm (pairwise, OpenAI-compatible API) | reward_model | cost_model (directories) | oracle (by name) | "
        "scorer (a registered scorer by name, e.g. a rule-based detector; higher = better on its criterion)"
    )
    name: str = help_field(
        "",
        help="the judge's label in the report ('' = derived); kind oracle / scorer: the registered name",
    )
    base_url: str = help_field(
        "", help="llm: the server's OpenAI-compatible root, e.g. http://127.0.0.1:8000/v1"
    )
    model: str = help_field("", help="llm: the model name the server knows")
    api_key_env: str = help_field(
        "OPENAI_API_KEY", help="llm: environment variable with the API key (unset + localhost: none sent)"
    )
    criterion: str = help_field(
        "helpfulness",
        help="llm: helpfulness | harmlessness (shipped templates) | a template YAML file; scorer: what it measures",
    )
    temperature: NonNegativeFloat = help_field(0.0, help="llm: sampling temperature of the first ask")
    max_tokens: PositiveInt = help_field(512, help="llm: longest answer (reasoning + verdict), tokens")
    verdict_retries: NonNegativeInt = help_field(
        2, help="llm: re-asks of an answer without a parsable verdict before it counts as invalid"
    )
    retry_temperature: NonNegativeFloat = help_field(0.7, help="llm: temperature of the re-asks")
    seed: int | None = help_field(
        None, help="llm: the request's seed (servers that support it); None = not sent"
    )
    concurrency: PositiveInt = help_field(8, help="llm: requests in flight at once")
    max_retries: NonNegativeInt = help_field(
        5, help="llm: retries on 429 / 5xx / timeouts (exponential backoff)"
    )
    timeout: PositiveFloat = help_field(120.0, help="llm: seconds per request before it is retried")
    dir: str | list[str] = help_field(
        "", help="reward_model / cost_model: a model directory, or a list of them (an ensemble)"
    )
    aggregate: Literal["mean", "min", "max", "pessimistic"] = help_field(
        "mean", help="reward_model / cost_model: how ensemble members combine"
    )
    max_length: PositiveInt | None = help_field(
        None,
        help="reward_model / cost_model: sequence limit (default: the model's reward_model.json, else 1024)",
    )
    max_prompt_length: PositiveInt | None = help_field(
        None, help="reward_model / cost_model: prompt limit (default: its reward_model.json, else 512)"
    )

    def __post_init__(self) -> None:
        fields = JudgeConfig.__dataclass_fields__
        for f in (*LLM_FIELDS, *MODEL_FIELDS, *SHARED_FIELDS):
            if f not in OWN_FIELDS[self.kind] and getattr(self, f) != fields[f].default:
                owner = (
                    "llm / scorer"
                    if f in SHARED_FIELDS
                    else "llm"
                    if f in LLM_FIELDS
                    else "reward_model / cost_model"
                )
                raise ConfigError(f"judge {self.label!r}: {f} is a field of kind {owner}, not {self.kind}")
        if self.kind == "llm" and not (self.base_url and self.model):
            raise ConfigError(f"judge {self.label!r}: kind llm needs base_url and model")
        if self.kind in ("reward_model", "cost_model"):
            dirs = [self.dir] if isinstance(self.dir, str) else list(self.dir)
            if not dirs or not all(dirs):
                raise ConfigError(f"judge {self.label!r}: kind {self.kind} needs dir")
        if self.kind in ("oracle", "scorer") and not self.name:
            raise ConfigError(f"judge of kind {self.kind}: give its registered name as name")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "llm":
            return f"llm:{self.model}/{self.criterion_name}"
        dirs = [self.dir] if isinstance(self.dir, str) else list(self.dir)
        short = {"reward_model": "rm", "cost_model": "cm"}.get(self.kind, self.kind)
        return f"{short}:" + "+".join(Path(d).name for d in dirs if d)

    @property
    def criterion_name(self) -> str:
        """helpfulness / harmlessness, or a template file's stem."""
        if self.kind == "reward_model":
            return "helpfulness"
        if self.kind == "cost_model":
            return "harmlessness"
        c = self.criterion
        return c if c in ("helpfulness", "harmlessness") else Path(c).stem


@config_dataclass
class GeneratorConfig:
    kind: Literal["local", "openai"] = help_field(
        "local", help="local = sample in this process (default); openai = through an OpenAI-compatible server"
    )
    base_url: str = help_field(
        "", help="openai: the server's root, e.g. http://127.0.0.1:8000/v1 (vllm serve)"
    )
    api_key_env: str = help_field("OPENAI_API_KEY", help="openai: environment variable with the API key")
    served_names: dict[str, str] = help_field(
        {}, help="openai: model name → the server's name for it (default: the model's directory as given)"
    )
    concurrency: PositiveInt = help_field(16, help="openai: requests in flight at once")
    max_retries: NonNegativeInt = help_field(5, help="openai: retries on 429 / 5xx / timeouts")
    timeout: PositiveFloat = help_field(300.0, help="openai: seconds per request")

    def __post_init__(self) -> None:
        if self.kind == "openai" and not self.base_url:
            raise ConfigError("generator: kind openai needs base_url")
        if self.kind == "local" and (self.base_url or self.served_names):
            raise ConfigError("generator: base_url / served_names are for kind openai")

    def api(self) -> ApiConfig | None:
        """The server's ApiConfig (model filled in per evaluated model), None for local generation."""
        if self.kind == "local":
            return None
        return ApiConfig(
            base_url=self.base_url, model="(per model)", api_key_env=self.api_key_env,
            concurrency=self.concurrency, max_retries=self.max_retries, timeout=self.timeout,
        )  # fmt: skip
