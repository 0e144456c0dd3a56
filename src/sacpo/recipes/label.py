"""`sacpo label CONFIG`: sample response pairs from a policy and label them with judges → PKU-SafeRLHF rows.

    output_dir: runs/labels
    policy: models/sft                     # sample from it (or generator: {kind: openai, base_url})
    prompts: data/prompts.jsonl
    pairs_per_prompt: 2
    better: {kind: llm, base_url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2.5-7B-Instruct}
    safer: {kind: cost_model, dir: runs/cm}          # or an LLM judge with criterion: harmlessness
    is_safe: {kind: cost_model, dir: runs/cm}        # is_response_i_safe = −c > safe_threshold

writes preferences.jsonl (prompt, response_0, response_1, better_response_id, safer_response_id,
is_response_0_safe, is_response_1_safe — `data.format: pku_helpful | pku_safe | pku_safe_kto` read it), labels.json
and labels.md (counts, ties, invalid verdicts, position consistency, how often the better response is the safer
one). The samples (samples/) and every LLM answer (judge_cache/) are cached: a rerun, or a run resumed after a
judge failed, samples nothing and asks no question twice. The rules are `sacpo.evaluate.labeling`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Literal

from sacpo.config import (
    ConfigError,
    PositiveFloat,
    PositiveInt,
    Seed,
    config_dataclass,
    help_field,
    to_yaml,
)
from sacpo.data.prompt_format import CHAT_TEMPLATE_HELP, SYSTEM_PROMPT_HELP, PromptFormat, log_first_prompt
from sacpo.data.prompts import load_prompts
from sacpo.evaluate.api_generate import generate_samples_api
from sacpo.evaluate.generate import generate_samples
from sacpo.evaluate.judge_config import GeneratorConfig, JudgeConfig
from sacpo.evaluate.judging import Judge, build_judges
from sacpo.evaluate.labeling import LabelRule, label_rows, report_markdown
from sacpo.fsutil import atomic_write_json, atomic_write_jsonl, atomic_write_text
from sacpo.models.load import load_tokenizer
from sacpo.train.onpolicy import unique_prompts

log = logging.getLogger("sacpo.label")
DATA_FILE = "preferences.jsonl"


@config_dataclass
class LabelConfig:
    output_dir: str = help_field(
        help="writes preferences.jsonl, labels.json, labels.md, samples/, judge_cache/"
    )
    policy: str = help_field(
        help="model directory the pairs are sampled from (its tokenizer renders prompts)"
    )
    prompts: str = help_field(
        help="prompt file: .txt, .json (a list or a mapping of splits), .jsonl ('prompt')"
    )
    prompts_split: str = help_field("train", help="key of the prompt list when the .json file maps splits")
    max_prompts: PositiveInt | None = help_field(None, help="label the first N (distinct) prompts only")
    pairs_per_prompt: PositiveInt = help_field(1, help="response pairs sampled per prompt")
    better: JudgeConfig | None = help_field(
        None, help="helpfulness judge → better_response_id (None: not labelled)"
    )
    safer: JudgeConfig | None = help_field(
        None, help="harmlessness judge → safer_response_id (None: not labelled)"
    )
    is_safe: JudgeConfig | None = help_field(
        None,
        help="pointwise safety judge → is_response_i_safe = score > safe_threshold (a cost model scores −c); "
        "None: the safer judge's scores when it is pointwise, else not labelled",
    )
    safe_threshold: float = help_field(
        0.0, help="is_response_i_safe = safety score > threshold", allow_inf_nan=False
    )
    label: Literal["bt", "argmax"] = help_field(
        "argmax", help="pointwise judges: argmax = the higher score (ties dropped); bt = Bradley–Terry draw"
    )
    bt_scale: PositiveFloat = help_field(
        1.0, help="Bradley–Terry scale s of label: bt, P(y1 ≻ y0) = σ(s·(u1 − u0))"
    )
    generator: GeneratorConfig = help_field(
        GeneratorConfig(), help="{kind: local} or {kind: openai, base_url}"
    )
    max_new_tokens: PositiveInt = help_field(128, help="response length limit (tokens)")
    temperature: float = help_field(1.0, help="sampling temperature (> 0: a pair needs two draws)", gt=0)
    top_p: float = help_field(1.0, help="nucleus sampling mass", gt=0, le=1)
    max_prompt_length: PositiveInt = help_field(256, help="prompts are left-truncated to this many tokens")
    batch_size: PositiveInt = help_field(16, help="prompts per generation batch")
    seed: Seed = help_field(0, help="sampling and Bradley–Terry seed")
    judge_cache: str = help_field("", help="LLM answer cache ('' = <output_dir>/judge_cache)")
    device: str | None = help_field(None, help="cuda / cpu / …; default cuda when available")
    system_prompt: str | None = help_field(None, help=SYSTEM_PROMPT_HELP)
    chat_template: str | None = help_field(None, help=CHAT_TEMPLATE_HELP)

    def __post_init__(self) -> None:
        if self.better is None and self.safer is None and self.is_safe is None:
            raise ConfigError("label: give at least one of better, safer, is_safe")
        for role in ("is_safe",):
            j = getattr(self, role)
            if j is not None and j.kind == "llm":
                raise ConfigError(f"{role}: needs a pointwise judge (cost_model, oracle, scorer), not an llm")


def _role_judge(cfg: JudgeConfig | None, criterion: str, cache: Path, device: str | None) -> Judge | None:
    """The judge of one role; an oracle contributes its reward (helpfulness) or safety (harmlessness) half."""
    if cfg is None:
        return None
    built = build_judges([cfg], cache, device)
    if len(built) == 1:
        return built[0]
    return next(j for j in built if j.criterion == criterion)


def run_label(cfg: LabelConfig, show_progress: bool = True) -> Path:
    """Sample, judge, write (module docstring); returns the data file."""
    out = Path(cfg.output_dir)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    prompts = unique_prompts(load_prompts(cfg.prompts, cfg.prompts_split, None))[: cfg.max_prompts]
    if not prompts:
        raise ConfigError(f"label: no prompts in {cfg.prompts}")
    cache = Path(cfg.judge_cache or out / "judge_cache")
    judges = {
        "better": _role_judge(cfg.better, "helpfulness", cache, cfg.device),
        "safer": _role_judge(cfg.safer, "harmlessness", cache, cfg.device),
        "is_safe": _role_judge(cfg.is_safe, "harmlessness", cache, cfg.device),
    }
    if judges["is_safe"] is None and judges["safer"] is not None and judges["safer"].scorer is not None:
        judges["is_safe"] = judges["safer"]
    fmt = PromptFormat.from_fields(cfg.system_prompt, cfg.chat_template)
    log_first_prompt(log, load_tokenizer(cfg.policy), prompts[0], fmt)
    n = 2 * cfg.pairs_per_prompt
    common = dict(
        n_samples=n, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
        max_prompt_length=cfg.max_prompt_length, device=cfg.device, temperature=cfg.temperature, top_p=cfg.top_p,
        prompt_format=fmt,
    )  # fmt: skip
    api = cfg.generator.api()
    if api is None:
        gen = generate_samples(cfg.policy, prompts, out / "samples", cfg.policy, **common)
    else:
        served = cfg.generator.served_names.get("policy", cfg.policy)
        api = dataclasses.replace(api, model=served)
        gen = generate_samples_api(api, cfg.policy, prompts, out / "samples", cfg.policy, **common)
    rows = gen.rows  # prompt-major: row = p·n + s
    pair_prompts, pairs, index = [], [], []
    for p in range(len(prompts)):
        for j in range(cfg.pairs_per_prompt):
            y0, y1 = rows[p * n + 2 * j].response.strip(), rows[p * n + 2 * j + 1].response.strip()
            pair_prompts.append(prompts[p])
            pairs.append((y0, y1))
            index.append((p, j))
    rule = LabelRule(cfg.label, cfg.bt_scale, cfg.seed)
    data, report = label_rows(pair_prompts, pairs, index, judges, rule, cfg.safe_threshold, show_progress)
    if not data:
        raise ConfigError(f"label: every pair was dropped ({json.dumps(report)})")
    path = atomic_write_jsonl(out / DATA_FILE, data)
    report.update(policy=cfg.policy, prompts=len(prompts), data_file=str(path), samples_cached=gen.cached)
    atomic_write_json(out / "labels.json", report, ensure_ascii=False)
    atomic_write_text(out / "labels.md", report_markdown(report))
    log.info("labels: %d rows from %d pairs → %s", report["rows"], report["pairs"], path)
    return path
