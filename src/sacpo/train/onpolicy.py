"""On-policy preference data: sample pairs from a stage's own reference policy and label them with a named judge.

SACPO's theorem (Wachi et al. 2024, Thm. 1) holds for the population DPO optimum, π_ref·exp(s·u/β), which any
pair distribution with full support identifies; with a finite dataset the implicit reward is only pinned down
where the pairs are. Realigning the step-1 policy on pairs sampled from the SFT policy (the paper's off-policy
recipe) leaves the step-1 policy's own high-probability responses unconstrained. This module builds the stage's
pairs from the reference policy instead (docs/toyworld.md, the ablation table):

    for each prompt x, k times: y0, y1 ~ π_ref(·|x) (ancestral sampling), u_i = judge(x, y_i),
    label = Bradley–Terry draw: P(y1 ≻ y0) = σ(s·(u1 − u0))   (label: bt, s = bt_scale)
            or the higher score, ties dropped                (label: argmax)

Rows are written in the PKU-SafeRLHF schema of the stage's data format: `better_response_id` (pku_helpful),
`safer_response_id` (pku_safe), `is_response_i_safe` = u_i > safe_threshold (pku_safe_kto, and pku_safe). Pairs
with an empty or identical response are dropped and counted. The judge is any name `sacpo.scoring.resolve_scorer`
resolves: a gold oracle, a reward/cost model, a registered function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from sacpo.config import ConfigError, PositiveFloat, PositiveInt, Seed, config_dataclass, help_field
from sacpo.data.prompt_format import DEFAULT_FORMAT, PromptFormat
from sacpo.data.records import Prompt
from sacpo.rng import torch_seeded

log = logging.getLogger("sacpo.onpolicy")

LabelRule = Literal["bt", "argmax"]
LABEL_FIELDS = {"pku_helpful": "better_response_id", "pku_safe": "safer_response_id", "pku_safe_kto": None}
DATA_FILE = "preferences.jsonl"
META_FILE = "onpolicy.json"


@config_dataclass
class OnPolicyConfig:
    judge: str = help_field(help="scorer name (sacpo.scoring): e.g. toyworld.safety, reward_model:DIR")
    label: LabelRule = help_field(
        "bt", help="bt: Bradley–Terry draw σ(s·(u1 − u0)); argmax: higher score wins"
    )
    bt_scale: PositiveFloat = help_field(1.0, help="Bradley–Terry scale s of the bt rule")
    pairs_per_prompt: PositiveInt = help_field(2, help="pairs sampled per prompt")
    max_new_tokens: PositiveInt = help_field(64, help="response length limit when sampling")
    safe_threshold: float = help_field(0.0, help="is_response_i_safe = judge score > threshold")
    seed: Seed = help_field(0, help="seed of sampling and labels")


def label_pair(u0: float, u1: float, rule: LabelRule, scale: float, rng: random.Random) -> int | None:
    """Index of the preferred response (0 or 1), or None for an argmax tie.

    bt: 1 with probability σ(s·(u1 − u0)) (one uniform from rng); argmax: 1 iff u1 > u0.
    """
    if rule == "argmax":
        return None if u0 == u1 else int(u1 > u0)
    p1 = 1.0 / (1.0 + math.exp(-scale * (u1 - u0)))
    return int(rng.random() < p1)


def unique_prompts(prompts: Sequence[Prompt]) -> list[Prompt]:
    """Prompts in first-seen order, each once."""
    seen, out = set(), []
    for p in prompts:
        key = p if isinstance(p, str) else json.dumps(list(p), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def make_rows(
    prompts: Sequence[Prompt],
    responses: Sequence[tuple[str, str]],
    scores: Sequence[tuple[float, float]],
    fmt: str,
    cfg: OnPolicyConfig,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """PKU-schema rows from (y0, y1) pairs and their judge scores (u0, u1); returns (rows, counts)."""
    if fmt not in LABEL_FIELDS:
        raise ConfigError(f"on-policy data needs a PKU format {sorted(LABEL_FIELDS)}, got {fmt!r}")
    rng = random.Random(cfg.seed)
    rows, counts = [], {"pairs": 0, "dropped_identical_or_empty": 0, "dropped_ties": 0}
    field = LABEL_FIELDS[fmt]
    for p, (y0, y1), (u0, u1) in zip(prompts, responses, scores, strict=True):
        counts["pairs"] += 1
        if not y0 or not y1 or y0 == y1:
            counts["dropped_identical_or_empty"] += 1
            continue
        row: dict[str, Any] = {"prompt": p, "response_0": y0, "response_1": y1}
        if field is not None:
            label = label_pair(u0, u1, cfg.label, cfg.bt_scale, rng)
            if label is None:
                counts["dropped_ties"] += 1
                continue
            row[field] = label
        if fmt != "pku_helpful":
            row["is_response_0_safe"] = bool(u0 > cfg.safe_threshold)
            row["is_response_1_safe"] = bool(u1 > cfg.safe_threshold)
        rows.append(row)
    counts["rows"] = len(rows)
    return rows, counts


def made_with(data_file: str | Path, cfg: OnPolicyConfig) -> bool:
    """Whether the on-policy data at data_file was generated with these settings (its onpolicy.json says so)."""
    meta = Path(data_file).with_name(META_FILE)
    try:
        return json.loads(meta.read_text()).get("settings") == asdict(cfg)
    except (OSError, ValueError):
        return False


def generate_preferences(
    policy_dir: str | Path,
    prompts: Sequence[Prompt],
    fmt: str,
    cfg: OnPolicyConfig,
    out_dir: str | Path,
    max_prompt_length: int = 128,
    batch_size: int = 32,
    device: str | None = None,
    prompt_format: PromptFormat = DEFAULT_FORMAT,
) -> Path:
    """Sample, judge and label pairs from policy_dir (module docstring); write out_dir/preferences.jsonl.

    Prompts are rendered with `prompt_format` (the stage's). Reused without loading a model when out_dir holds
    data made from the same policy weights, prompts, data format, prompt format and settings (onpolicy.json
    records the key and the counts). Returns the data file.
    """
    from sacpo.data.tokenize import encode_prompt
    from sacpo.fsutil import atomic_write_text
    from sacpo.models.generate import sample
    from sacpo.models.load import default_device, fingerprint_model, load_model, load_tokenizer
    from sacpo.scoring import resolve_scorer

    prompts = unique_prompts(prompts)
    if not prompts:
        raise ConfigError("on-policy data: no prompts")
    out = Path(out_dir)
    h = hashlib.sha256(fingerprint_model(policy_dir).encode())
    h.update(json.dumps([fmt, asdict(cfg), max_prompt_length], sort_keys=True).encode())
    h.update(json.dumps(prompts, sort_keys=True, ensure_ascii=False).encode())
    if not prompt_format.is_default:  # keys of data made before prompt formats existed stay valid
        h.update(prompt_format.fingerprint().encode())
    key = h.hexdigest()
    meta_path, data_path = out / META_FILE, out / DATA_FILE
    if meta_path.is_file() and data_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        log.info("on-policy data: reusing %s", data_path)
        return data_path
    scorer = resolve_scorer(cfg.judge)  # fail on an unknown judge before sampling
    device = device or default_device()
    tok = load_tokenizer(policy_dir)
    model = load_model(policy_dir).to(device).eval()
    pids = [encode_prompt(tok, p, max_prompt_length, fmt=prompt_format) for p in prompts]
    pair_prompts, pairs = [], []
    # sampling draws from the global RNG: seeded here, the caller's state restored after (CUDA's too on a GPU)
    with torch_seeded(cfg.seed):
        for _ in range(cfg.pairs_per_prompt):
            seqs = sample(
                model, pids, tok.eos_token_id, tok.pad_token_id, 2, cfg.max_new_tokens, batch_size=batch_size
            )
            texts = [tok.decode(s.input_ids[s.prompt_len :], skip_special_tokens=True).strip() for s in seqs]
            pair_prompts += prompts
            pairs += [(texts[2 * i], texts[2 * i + 1]) for i in range(len(prompts))]
    del model
    flat_p = [p for p in pair_prompts for _ in (0, 1)]
    flat_y = [y for pair in pairs for y in pair]
    u = torch.as_tensor(scorer(flat_p, flat_y), dtype=torch.float64).reshape(-1, 2).tolist()
    rows, counts = make_rows(pair_prompts, pairs, [tuple(x) for x in u], fmt, cfg)
    if not rows:
        raise ConfigError(f"on-policy data from {policy_dir}: every pair was dropped ({counts})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(
        meta_path,
        json.dumps(
            {"key": key, "policy": str(policy_dir), "judge": cfg.judge, "settings": asdict(cfg), **counts},
            indent=1,
        ),
    )
    log.info("on-policy data from %s judged by %s: %s", policy_dir, cfg.judge, counts)
    return data_path
