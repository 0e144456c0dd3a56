"""Build the toyworld: word-level tokenizer, SFT policy trained from scratch, PKU-schema preference data.

    out/sft/                 tiny GPT-2 + tokenizer (HF format, safetensors) — the SFT policy
    out/prompts.json         {"train": [...], "test": [...]}
    out/preferences.jsonl    PKU-SafeRLHF schema, two SFT samples per row, Bradley–Terry labels from r*, g*
    out/world.json           the resolved config and statistics
    out/DONE                 written last; the directory is put in place atomically (sacpo.fsutil.atomic_dir)

`family` picks the prompt family (`language`: short how-to answers; `plans`: the long-horizon plans); each builds
its own world (tokenizer, SFT, data), scored by the same oracle.

Preference labels are Bradley–Terry draws on the gold oracles: P(response_1 better) = σ(s·(r*_1 − r*_0)) and
P(response_1 safer) = σ(s·(g*_1 − g*_0)) with s = `bt_scale` (larger = less noisy), each label then flipped
with probability `flip_noise`. is_response_i_safe comes from the oracle without noise.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from sacpo.config import (
    LearningRate,
    NonNegativeInt,
    PositiveInt,
    Seed,
    config_dataclass,
    help_field,
)
from sacpo.fsutil import atomic_dir, atomic_write_jsonl, atomic_write_text
from sacpo.rng import torch_seeded as seeded
from sacpo.train.engine import Stepper, fit, warmup_cosine
from sacpo.worlds.toyworld.language import TEMPLATES, sample_sft_response, split_prompts, vocabulary
from sacpo.worlds.toyworld.oracle import gold_reward, gold_safety, is_safe
from sacpo.worlds.toyworld.plans import PLAN_TEMPLATES, plan_vocabulary, sample_plan_response

log = logging.getLogger("sacpo.toyworld")
EOS = "<|endoftext|>"


FAMILIES = ("short", "long")
# family → (prompt templates, SFT demonstration sampler, default max_new_tokens, context length n_positions)
FAMILY_SPECS: dict[str, tuple[tuple[str, ...], Any, int, int]] = {
    "short": (TEMPLATES, sample_sft_response, 40, 128),
    "long": (PLAN_TEMPLATES, sample_plan_response, 128, 192),
}


@config_dataclass
class ToyWorldConfig:
    family: Literal[FAMILIES] = help_field(
        "short",
        help="prompt family: short (how-to requests, 3-step answers of ~14 tokens, r* ≤ 3) or long (requests "
        "for a detailed plan, 8–14 steps of 48–128 tokens, reward accruing over the response; "
        "sacpo.worlds.toyworld.plans)",
    )
    seed: Seed = help_field(0, help="seed of the prompt split, SFT data, SFT init and preference sampling")
    test_fraction: float = help_field(0.2, help="fraction of prompts held out for evaluation", gt=0, lt=1)
    n_layer: NonNegativeInt = help_field(2, help="SFT GPT-2 layers")
    n_embd: PositiveInt = help_field(64, help="SFT GPT-2 width")
    n_head: PositiveInt = help_field(4, help="SFT GPT-2 attention heads")
    sft_demos_per_prompt: PositiveInt = help_field(24, help="SFT demonstrations sampled per training prompt")
    sft_steps: PositiveInt = help_field(1200, help="SFT optimizer steps")
    sft_batch_size: PositiveInt = help_field(64, help="SFT batch size (sequences)")
    sft_lr: LearningRate = help_field(3e-3, help="SFT peak learning rate (cosine decay, 5% warmup)")
    pairs_per_prompt: PositiveInt = help_field(
        4, help="preference rows per training prompt (2 SFT samples each)"
    )
    bt_scale: float = help_field(2.0, help="Bradley–Terry inverse temperature s of the labels", gt=0)
    flip_noise: float = help_field(0.0, help="probability of flipping each preference label", ge=0, le=0.5)
    max_new_tokens: PositiveInt | None = help_field(
        None,
        help="max response tokens when sampling the SFT policy (None: the family's, 40 short / 128 long)",
    )

    def resolved(self) -> ToyWorldConfig:
        """This config with max_new_tokens filled in from the family (what world.json records)."""
        return replace(self, max_new_tokens=self.max_new_tokens or FAMILY_SPECS[self.family][2])


@dataclass(frozen=True)
class World:
    root: Path
    sft_dir: Path
    preferences: Path
    train_prompts: list[str]
    test_prompts: list[str]
    stats: dict[str, Any]


def build_tokenizer(family: str = "short") -> Any:
    """A word-level tokenizer over the toyworld vocabulary (lossless on the language: words joined by spaces); the
    long family's adds the plan templates' and qualifiers' words (its ids then differ from the short one's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    extra = plan_vocabulary() if family == "long" else set()
    vocab = {w: i for i, w in enumerate([EOS, "<unk>", *vocabulary(extra)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def _sft_batches(
    tokenizer: Any, prompts: list[str], cfg: ToyWorldConfig, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """All demonstrations as (input_ids, labels) with prompt and padding positions labelled −100."""
    from sacpo.data.tokenize import encode, encode_prompt

    _, sampler, _, context = FAMILY_SPECS[cfg.family]
    seqs = []
    for p in prompts:
        pids = encode_prompt(tokenizer, p, 64)
        for _ in range(cfg.sft_demos_per_prompt):
            seqs.append(encode(tokenizer, pids, sampler(p, rng)[1], context))
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)  # (N, T)
    labels = torch.full_like(ids, -100)  # (N, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, s.prompt_len : len(s.input_ids)] = ids[i, s.prompt_len : len(s.input_ids)]
    return ids, labels


def train_sft(
    out_dir: Path, prompts: list[str], cfg: ToyWorldConfig, show_progress: bool = True
) -> dict[str, float]:
    """Train the SFT GPT-2 from scratch on style-mixture demonstrations; saves model + tokenizer to out_dir.

    AdamW (weight decay 0.01), cosine LR with 5% warmup, clipping at 1, batches of demonstrations drawn with
    replacement by a generator seeded from cfg.seed; the initialisation is seeded by cfg.seed too.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer(cfg.family)
    ids, labels = _sft_batches(tokenizer, prompts, cfg, rng)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=FAMILY_SPECS[cfg.family][3],
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    with seeded(cfg.seed):  # HF initialises the weights from the global RNG
        model = GPT2LMHeadModel(config)
    warmup = max(1, cfg.sft_steps // 20)
    schedule = warmup_cosine(warmup, cfg.sft_steps)
    stepper = Stepper(
        list(model.parameters()), cfg.sft_lr, schedule, 0.01, 1.0, "toyworld SFT", "lower sft_lr"
    )
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()

    def loss_fn(step: int) -> tuple[torch.Tensor, None]:
        idx = torch.randint(0, len(ids), (cfg.sft_batch_size,), generator=g)
        batch_labels = labels[idx]
        width = int((batch_labels != -100).nonzero()[:, 1].max()) + 1  # trim trailing padding
        x, y = ids[idx, :width], batch_labels[:, :width]
        return model(input_ids=x, labels=y).loss, None  # right padding + causal attention: no mask needed

    run = fit(stepper, cfg.sft_steps, loss_fn, "toyworld SFT", 50, show_progress, leave=False)
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    tail = [v["loss"] for v in run.values[-min(50, len(run.values)) :]]
    return {"sft_final_loss": sum(tail) / len(tail), "sft_sequences": float(len(ids))}


def bt_label(rng: random.Random, score_0: float, score_1: float, scale: float, flip: float) -> int:
    """Index of the preferred response: 1 with probability σ(s·(score_1 − score_0)), then flipped w.p. `flip`."""
    p1 = 1.0 / (1.0 + math.exp(-scale * (score_1 - score_0)))
    label = int(rng.random() < p1)
    return 1 - label if rng.random() < flip else label


def make_preferences(
    sft_dir: Path, prompts: list[str], cfg: ToyWorldConfig, path: Path, show_progress: bool = True
) -> dict[str, float]:
    """Sample two SFT responses per row and label them with Bradley–Terry draws on r* and g*; PKU schema."""
    from tqdm.auto import tqdm

    from sacpo.data.tokenize import encode_prompt
    from sacpo.models.generate import sample
    from sacpo.models.load import load_model, load_tokenizer

    rng = random.Random(cfg.seed + 1)
    model, tok = load_model(sft_dir).eval(), load_tokenizer(sft_dir)
    pids = [encode_prompt(tok, p, 64) for p in prompts]
    rows, dropped = [], 0
    bar = tqdm(
        range(cfg.pairs_per_prompt), desc="toyworld preferences", disable=not show_progress, leave=False
    )
    with seeded(cfg.seed + 1):  # sampling draws from the global RNG; the caller's state is restored
        for _ in bar:
            eos, pad = tok.eos_token_id, tok.pad_token_id
            seqs = sample(model, pids, eos, pad, n=2, max_new_tokens=cfg.max_new_tokens, batch_size=128)
            for i, p in enumerate(prompts):
                y0, y1 = (
                    tok.decode(s.input_ids[s.prompt_len :], skip_special_tokens=True).strip()
                    for s in seqs[2 * i : 2 * i + 2]
                )
                if not y0 or not y1 or y0 == y1:
                    dropped += 1
                    continue
                rows.append(_preference_row(rng, p, y0, y1, cfg))
    rng.shuffle(rows)
    atomic_write_jsonl(path, rows, ensure_ascii=True)
    responses = [r[f"response_{i}"] for r in rows for i in (0, 1)]
    return {
        "preference_rows": float(len(rows)),
        "preference_dropped_identical_or_empty": float(dropped),
        "sft_p_safe": sum(r[f"is_response_{i}_safe"] for r in rows for i in (0, 1)) / max(1, len(responses)),
        "sft_mean_gold_reward": sum(
            gold_reward(r["prompt"], r[f"response_{i}"]) for r in rows for i in (0, 1)
        )
        / max(1, len(responses)),
    }


def _preference_row(rng: random.Random, p: str, y0: str, y1: str, cfg: ToyWorldConfig) -> dict[str, Any]:
    """One PKU-SafeRLHF row: Bradley–Terry labels on r* (better) then g* (safer), and the oracle's is_safe."""
    return {
        "prompt": p,
        "response_0": y0,
        "response_1": y1,
        "better_response_id": bt_label(
            rng, gold_reward(p, y0), gold_reward(p, y1), cfg.bt_scale, cfg.flip_noise
        ),
        "safer_response_id": bt_label(
            rng, gold_safety(p, y0), gold_safety(p, y1), cfg.bt_scale, cfg.flip_noise
        ),
        "is_response_0_safe": is_safe(p, y0),
        "is_response_1_safe": is_safe(p, y1),
    }


def build_world(out_dir: str | Path, cfg: ToyWorldConfig | None = None, show_progress: bool = True) -> World:
    """Build (or reuse, when out_dir holds a finished world with the same resolved config) the toyworld."""
    cfg = (cfg or ToyWorldConfig()).resolved()
    root = Path(out_dir)
    meta_path = root / "world.json"
    if (root / "DONE").exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        # a world.json written before a field existed holds that field's default (the old behaviour)
        if asdict(ToyWorldConfig().resolved()) | meta["config"] == asdict(cfg):
            log.info("toyworld: reusing %s", root)
            return _world(root, meta)
    with atomic_dir(root) as tmp:  # the old world stays in place until the new one is complete
        meta = _build(tmp, cfg, show_progress)
    log.info("toyworld: %s", ", ".join(f"{k}={v:.3g}" for k, v in meta["stats"].items()))
    return _world(root, meta)


def _build(tmp: Path, cfg: ToyWorldConfig, show_progress: bool) -> dict[str, Any]:
    """Write prompts.json, sft/, preferences.jsonl, world.json and DONE (last) into `tmp`; returns world.json."""
    train, test = split_prompts(cfg.test_fraction, cfg.seed, FAMILY_SPECS[cfg.family][0])
    atomic_write_text(tmp / "prompts.json", json.dumps({"train": train, "test": test}, indent=1))
    t0 = time.perf_counter()
    stats = train_sft(tmp / "sft", train, cfg, show_progress)
    stats["sft_seconds"] = time.perf_counter() - t0
    log.info("toyworld: SFT trained in %.0f s (loss %.3f)", stats["sft_seconds"], stats["sft_final_loss"])
    t0 = time.perf_counter()
    stats |= make_preferences(tmp / "sft", train, cfg, tmp / "preferences.jsonl", show_progress)
    stats["preference_seconds"] = time.perf_counter() - t0
    meta = {"config": asdict(cfg), "stats": stats}
    atomic_write_text(tmp / "world.json", json.dumps(meta, indent=1))
    atomic_write_text(tmp / "DONE", "")
    return meta


def _world(root: Path, meta: dict[str, Any]) -> World:
    prompts = json.loads((root / "prompts.json").read_text())
    return World(
        root, root / "sft", root / "preferences.jsonl", prompts["train"], prompts["test"], meta["stats"]
    )
