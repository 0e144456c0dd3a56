"""Prefix value models V_θ(x, y^t) for controlled decoding, trained by CD-FUDGE or CD-Q (`train_prefix_scorer`).

Model: the base policy's architecture with a scalar linear head applied at *every* position —
`AutoModelForSequenceClassification(num_labels=1)` built from the base causal-LM directory (backbone initialised
from the base weights, head from the seed; `sacpo.train.reward_model.build_reward_model`), run through its backbone
(`model.base_model`) and head (`model.score`) directly. values[b, t] = V(x, ids[b, :t+1]): the value of the prefix
ending at column t. With a prompt of P tokens, column P−1 is the empty response and column len−1 the full
response (EOS included when generated).

Training data: base-model rollouts y ~ π_base(·|x) on training prompts, scored once by a reward (a gold oracle of
the toyworld, or a reward model directory) — r(x, y).

* CD-FUDGE (Yang & Klein 2021; Mudgal et al. 2024 §3.1): regress V at every response prefix (empty response
  included) on the final reward: L = mean_t (V(x, y^t) − r(x, y))². Its minimiser is E_{y~π_base}[r | x, y^t].
* CD-Q (Mudgal et al. 2024 §3.2): Bellman targets with a stop-gradient target network V̄ (a copy of V refreshed
  every `target_update_every` steps): target(x, y^t) = Σ_{z∈top-k} p̃(z)·V̄(x, y^t z) for non-terminal prefixes,
  where p̃ is the base policy's next-token distribution restricted to its top-k tokens and *renormalised* over
  them (`sacpo.math.decoding.bellman_targets`); target = r(x, y) at the terminal prefix (the full rollout — ending
  with EOS, or cut at max_new_tokens, which is the decoder's horizon too). The top-k tokens and their base
  log-probs are computed once per rollout (the base model is fixed). V̄ of all k children of every prefix of a
  batch comes from ONE forward per chunk: the rollout followed by its children, with a 4D attention mask letting
  child (t, j) see the prefix columns ≤ t and itself ("tree attention", `child_values`; the fallback for
  attention implementations that take no custom mask builds the (B·T·k) child sequences explicitly).

Output directory (written to `<output_dir>.tmp`, then renamed): HF model dir (config.json, model.safetensors,
tokenizer files), prefix_scorer.json (kind, method, reward, base model fingerprint, lengths), metrics.json,
config.yaml. Load with `PrefixScorer.load`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from sacpo.config import ConfigError, help_field, to_yaml
from sacpo.data.prompts import load_prompts
from sacpo.data.records import Prompt
from sacpo.data.tokenize import Encoded, encode_prompt, pad_sequences
from sacpo.math.decoding import bellman_targets
from sacpo.models.load import (
    ModelLoadError,
    check_model_dir,
    fingerprint_model,
    fingerprint_tokenizer,
    load_model,
    load_tokenizer,
)

log = logging.getLogger("sacpo.prefix_scorer")

META_FILE = "prefix_scorer.json"
KIND = "prefix_value"
METHODS = ("fudge", "q")
TREE_ATTENTION = ("eager", "sdpa")  # attention implementations that take a custom 4D additive mask


# ---------------------------------------------------------------------------------------------------- helpers
def resolve_device(name: str | torch.device | None) -> torch.device:
    """ "auto"/None → cuda when available, else cpu."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left- or right-padded batch: the number of real tokens before each column. (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decode_response(tokenizer: Any, response_ids: Sequence[int], eos_id: int) -> tuple[str, bool]:
    """(text, finished): the response text without its final EOS, and whether it ended with EOS."""
    ids = list(response_ids)
    finished = bool(ids) and ids[-1] == eos_id
    text_ids = ids[:-1] if finished else ids
    return tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), finished


# ------------------------------------------------------------------------------------------------ reward specs
@dataclass(frozen=True)
class _FunctionReward:
    """A scorer (the `sacpo.scoring.base.Scorer` protocol) from fn(prompt, response) -> float."""

    name: str
    fn: Callable[[Prompt, str], float]

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(self.fn(p, r)) for p, r in zip(prompts, responses, strict=True)])


def _toyworld(which: str) -> Callable[[], _FunctionReward]:
    def make() -> _FunctionReward:
        from sacpo.worlds.toyworld import oracle

        fn = {"reward": oracle.gold_reward, "safety": oracle.gold_safety}[which]
        return _FunctionReward(f"toyworld {'r*' if which == 'reward' else 'g*'}", fn)

    return make


REWARDS: dict[str, Callable[[], Any]] = {
    "toyworld-gold": _toyworld("reward"),  # helpfulness r*(x, y)
    "toyworld-safety": _toyworld("safety"),  # safety g*(x, y) (higher = safer)
}


def check_reward_spec(spec: str) -> None:
    """A registered name or an existing directory (checked before any model loads)."""
    if spec not in REWARDS and not Path(spec).is_dir():
        raise ConfigError(
            f"unknown reward {spec!r}: give one of {', '.join(sorted(REWARDS))} or a reward model directory"
        )


def resolve_reward(spec: str, device: str | torch.device | None = None) -> Any:
    """A Scorer: (prompts, responses) → (N,) tensor. `spec` is a REWARDS name or a `sacpo reward` output dir."""
    check_reward_spec(spec)
    if spec in REWARDS:
        return REWARDS[spec]()
    from sacpo.scoring.reward_model import RewardModelScorer

    return RewardModelScorer(spec, device=resolve_device(device))


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """The KV-cache argument under the name the model's forward takes (`cache` in recent transformers 5.x,
    `past_key_values` before)."""
    return {_cache_name(type(module)): cache}


@functools.cache
def _cache_name(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output (field `cache`, or `past_key_values` in older transformers)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


# ----------------------------------------------------------------------------------------------------- model
class PrefixOutput(NamedTuple):
    values: torch.Tensor  # (B, T) float32: V(x, ids[:, :t+1])
    past_key_values: Any  # the backbone's KV cache (None unless use_cache)


class PrefixScorer:
    """V(x, y^t) at every position: a causal backbone + scalar head (see the module docstring).

    `scorer(input_ids, attention_mask)` → PrefixOutput with values (B, T); left- or right-padded batches (position
    ids follow the attention mask); pass `past_key_values`/`use_cache` to feed tokens incrementally.
    """

    def __init__(self, model: Any, meta: dict[str, Any] | None = None, name: str = "prefix-scorer") -> None:
        if getattr(model, "score", None) is None:
            raise ModelLoadError(f"{type(model).__name__} has no `score` head; not a prefix value model")
        self.model = model
        self.meta = dict(meta or {})
        self.name = name

    # construction / IO ------------------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base_dir: str | Path, tokenizer: Any, seed: int = 0) -> PrefixScorer:
        """A fresh scorer: backbone = the base model's weights, head initialised from `seed`."""
        from sacpo.models.reward import build_reward_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_reward_model(base_dir, tokenizer)
        _disable_dropout(model)
        return cls(model, {"kind": KIND, "base_model": str(base_dir)}, name=f"V[{Path(base_dir).name}]")

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> PrefixScorer:
        """Load a directory written by `train_prefix_scorer` / `save` (safetensors only), in eval mode."""
        from transformers import AutoModelForSequenceClassification

        p = check_model_dir(path)
        meta_path = p / META_FILE
        if not meta_path.is_file():
            raise ModelLoadError(
                f"{p}: no {META_FILE} — not a prefix scorer (train one with train_prefix_scorer)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != KIND:
            raise ModelLoadError(f"{p}: {META_FILE} has kind {meta.get('kind')!r}, expected {KIND!r}")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(p, dtype=dtype, use_safetensors=True)
        except Exception as e:
            raise ModelLoadError(f"{p}: cannot load the prefix scorer: {type(e).__name__}: {e}") from e
        model.config.use_cache = True
        model = model.to(resolve_device(device)).eval()
        return cls(model, meta, name=f"V[{p.resolve().name}]")

    def save(self, path: str | Path, tokenizer: Any, extra_files: dict[str, str] | None = None) -> Path:
        """Write the HF model dir + tokenizer + prefix_scorer.json (+ extra text files) atomically: `<path>.tmp`
        then rename (an existing directory at `path` is replaced)."""
        out = Path(path)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.config.use_cache = True
        self.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps({**self.meta, "kind": KIND}, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return out

    # forward ------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> PrefixScorer:
        self.model.to(device)
        return self

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> PrefixOutput:
        """Values of the fed tokens: input_ids (B, T) → values (B, T) float32. attention_mask covers the cache
        and the new tokens (B, past + T); position_ids default to those of a padded batch without a cache."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        backbone = self.model.base_model
        out = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwargs(backbone, past_key_values),
        )
        values = self.model.score(out.last_hidden_state).squeeze(-1).float()  # (B, T)
        return PrefixOutput(values, output_cache(out) if use_cache else None)

    @torch.inference_mode()
    def final_values(self, seqs: Sequence[Encoded], pad_id: int, batch_size: int = 32) -> torch.Tensor:
        """V(x, y) of whole sequences (value at each one's last token), length-sorted batches. (N,) on the CPU."""
        out = torch.empty(len(seqs), dtype=torch.float32)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids), reverse=True)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = pad_sequences([seqs[i] for i in idx], pad_id)
            ids, attn = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            values = self(ids, attn).values  # (b, T)
            last = attn.sum(-1) - 1  # (b,)
            out[idx] = values[torch.arange(len(idx), device=self.device), last].cpu()
        return out

    def child_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, child_ids: torch.Tensor, chunk: int = 0
    ) -> torch.Tensor:
        """V(x, ids[b, :t+1] + z) for every column t and candidate z = child_ids[b, t, j]: (B, T, k) float32.

        input_ids, attention_mask: (B, T) RIGHT-padded; child_ids: (B, T, k). Entries at padded columns are
        meaningless. Runs under the caller's grad mode. Tree attention (one forward of T + c·k tokens per chunk of
        c columns; `chunk` = 0: all columns at once) when the attention implementation takes custom masks, else
        explicit child sequences.
        """
        impl = getattr(self.model.config, "_attn_implementation", None)
        if impl in TREE_ATTENTION:
            return _tree_child_values(self, input_ids, attention_mask, child_ids, chunk)
        return naive_child_values(self, input_ids, attention_mask, child_ids)


def _disable_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _check_right_padded(attention_mask: torch.Tensor) -> None:
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        raise ValueError("child_values needs a right-padded batch (pad_sequences)")


def _tree_child_values(
    scorer: PrefixScorer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    child_ids: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    _check_right_padded(attention_mask)
    B, T = input_ids.shape
    k = child_ids.shape[-1]
    device = input_ids.device
    real = attention_mask.bool()  # (B, T)
    cols = torch.arange(T, device=device)
    prefix_allow = (cols[None, :] <= cols[:, None])[None] & real[:, None, :]  # (B, T, T)
    dtype = next(scorer.model.parameters()).dtype
    neg = torch.finfo(dtype).min
    out = torch.empty(B, T, k, dtype=torch.float32, device=device)
    c = T if chunk <= 0 else chunk
    for start in range(0, T, c):
        ts = cols[start : start + c]  # (c,) parent columns of this chunk
        n = len(ts) * k
        parent = ts.repeat_interleave(k)  # (n,)
        kids = child_ids[:, start : start + c].reshape(B, n)  # (B, n)
        q = T + n
        allow = torch.zeros(B, q, q, dtype=torch.bool, device=device)
        allow[:, :T, :T] = prefix_allow
        allow[:, T:, :T] = (cols[None, None, :] <= parent[None, :, None]) & real[:, None, :]  # prefix ≤ t
        allow[:, T:, T:] = torch.eye(n, dtype=torch.bool, device=device)  # and itself
        mask = torch.zeros(B, 1, q, q, dtype=dtype, device=device).masked_fill(~allow[:, None], neg)
        positions = torch.cat([cols.expand(B, T), (parent + 1).expand(B, n)], dim=1)  # (B, q)
        values = scorer(torch.cat([input_ids, kids], dim=1), mask, position_ids=positions).values  # (B, q)
        out[:, start : start + c] = values[:, T:].reshape(B, len(ts), k)
    return out


def naive_child_values(
    scorer: PrefixScorer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    child_ids: torch.Tensor,
    batch: int = 64,
) -> torch.Tensor:
    """Reference for `child_values`: every child ids[b, :t+1] + z as its own sequence (B·T·k forwards' worth)."""
    _check_right_padded(attention_mask)
    B, T, k = child_ids.shape
    out = torch.zeros(B, T, k, dtype=torch.float32, device=input_ids.device)
    lens = attention_mask.long().sum(-1).tolist()
    items = [(b, t) for b in range(B) for t in range(lens[b])]
    for start in range(0, len(items), batch):
        part = items[start : start + batch]
        seqs = [
            Encoded((*input_ids[b, : t + 1].tolist(), int(z)), 0) for b, t in part for z in child_ids[b, t]
        ]
        padded = pad_sequences(seqs, 0)
        ids, attn = padded["input_ids"].to(input_ids.device), padded["attention_mask"].to(input_ids.device)
        values = scorer(ids, attn).values  # (n·k, L)
        last = values[torch.arange(len(seqs), device=ids.device), attn.sum(-1) - 1].view(len(part), k)
        for i, (b, t) in enumerate(part):
            out[b, t] = last[i]
    return out


# ---------------------------------------------------------------------------------------------------- rollouts
@dataclass(frozen=True)
class Rollout:
    """A base-model sample with its reward and, for CD-Q, the base top-k at every non-terminal prefix."""

    seq: Encoded
    reward: float
    topk_ids: torch.Tensor | None = None  # (R, k): columns prompt_len−1 … len−2 (R = response length)
    topk_logp: torch.Tensor | None = None  # (R, k) full-vocabulary log-probs


@torch.no_grad()
def base_topk(
    model: Any, seqs: Sequence[Encoded], pad_id: int, k: int, batch_size: int = 32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each sequence: (ids, log-probs) (R, k) of the base model's top-k next tokens at columns
    prompt_len−1 … len−2 (every non-terminal response prefix), on the CPU."""
    device = next(model.parameters()).device
    out: list[Any] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids), reverse=True)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pad_sequences([seqs[i] for i in idx], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits  # (b, T, V)
        logp, ids = torch.log_softmax(logits.float(), -1).topk(min(k, logits.shape[-1]), dim=-1)  # (b, T, k)
        for row, i in enumerate(idx):
            s = seqs[i]
            cols = slice(s.prompt_len - 1, len(s.input_ids) - 1)
            out[i] = (ids[row, cols].cpu(), logp[row, cols].cpu())
    return out


def _batch_tensors(rollouts: Sequence[Rollout], pad_id: int, k: int) -> dict[str, torch.Tensor]:
    """Padded batch + value mask (every response prefix), terminal mask, rewards and CD-Q children."""
    batch = pad_sequences([r.seq for r in rollouts], pad_id)
    B, T = batch["input_ids"].shape
    value_mask = torch.zeros(B, T, dtype=torch.bool)
    terminal = torch.zeros(B, T, dtype=torch.bool)
    child_ids = torch.full((B, T, k), pad_id, dtype=torch.long)
    child_logp = torch.zeros(B, T, k)
    for b, r in enumerate(rollouts):
        n, p = len(r.seq.input_ids), r.seq.prompt_len
        value_mask[b, p - 1 : n] = True
        terminal[b, n - 1] = True
        if r.topk_ids is not None:
            kk = r.topk_ids.shape[-1]
            child_ids[b, p - 1 : n - 1, :kk] = r.topk_ids
            child_logp[b, p - 1 : n - 1, :kk] = r.topk_logp
            child_logp[b, p - 1 : n - 1, kk:] = -math.inf  # fewer candidates than k (tiny vocabulary)
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
    return {
        **batch,
        "value_mask": value_mask,
        "terminal": terminal,
        "rewards": rewards,
        "child_ids": child_ids,
        "child_logp": child_logp,
    }


def scorer_targets(
    method: str, batch: dict[str, torch.Tensor], target: PrefixScorer | None, chunk: int = 0
) -> torch.Tensor:
    """Regression targets (B, T) of a batch from `_batch_tensors` (meaningful where value_mask).

    fudge: r(x, y) at every prefix. q: r at the terminal prefix, Σ_top-k p̃(z)·V̄(x, y^t z) elsewhere, V̄ = `target`.
    """
    rewards = batch["rewards"][:, None].expand_as(batch["value_mask"]).to(batch["input_ids"].device)  # (B, T)
    if method == "fudge":
        return rewards
    if method != "q":
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if target is None:
        raise ValueError("CD-Q needs a target network")
    with torch.no_grad():
        child = target.child_values(batch["input_ids"], batch["attention_mask"], batch["child_ids"], chunk)
    return bellman_targets(batch["child_logp"], child, rewards, batch["terminal"])  # (B, T)


def masked_mse(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over mask of (values − targets)²; (B, T) inputs → scalar."""
    diff = (values - targets.to(values.dtype)) ** 2
    return torch.where(mask, diff, torch.zeros_like(diff)).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class TrainScorerConfig:
    model: str = help_field(
        help="base causal-LM directory (safetensors): sampled from, and the scorer's backbone"
    )
    output_dir: str = help_field(help="the prefix scorer directory (HF format + prefix_scorer.json)")
    prompts: str = help_field(
        help="training prompts: .json (list or splits, e.g. toyworld prompts.json) / .jsonl / .txt"
    )
    reward: str = help_field(
        "toyworld-gold",
        help="reward of full responses: toyworld-gold (r*), toyworld-safety (g*) or a `sacpo reward` directory",
    )
    method: str = help_field(
        "fudge", help="fudge (regress every prefix on the final reward) | q (CD-Q Bellman)"
    )
    prompts_split: str = help_field("train", help="key of the prompt list when the .json maps splits")
    max_prompts: int | None = help_field(None, help="use the first N prompts only")
    n_rollouts: int = help_field(512, help="base-model responses sampled (prompts cycled in a seeded order)")
    max_new_tokens: int = help_field(40, help="max tokens per rollout")
    max_prompt_length: int = help_field(128, help="prompts are left-truncated to this many tokens")
    steps: int = help_field(300, help="optimizer steps")
    batch_size: int = help_field(32, help="rollouts per step (every response prefix of each is a target)")
    lr: float = help_field(3e-4, help="AdamW learning rate (constant after a 5% linear warmup)")
    weight_decay: float = help_field(0.0, help="AdamW weight decay")
    max_grad_norm: float = help_field(1.0, help="gradient clipping norm; 0 disables")
    top_k: int = help_field(10, help="CD-Q: base top-k children of each prefix in the Bellman backup")
    target_update_every: int = help_field(25, help="CD-Q: copy V into the target network V̄ every N steps")
    eval_fraction: float = help_field(0.1, help="fraction of rollouts held out for the validation loss")
    generation_batch_size: int = help_field(64, help="prompts per generate call when sampling rollouts")
    log_every: int = help_field(20, help="record the training loss every N steps (metrics.json)")
    seed: int = help_field(0, help="seed of the prompt order, rollouts, head init and batches")
    device: str = help_field("auto", help="auto (cuda if available) | cpu | cuda | cuda:N")

    def __post_init__(self) -> None:
        validate_train_config(self)


def validate_train_config(cfg: TrainScorerConfig) -> None:
    """Reject impossible values before any model loads (ConfigError)."""
    checks = [
        (cfg.method in METHODS, f"unknown method {cfg.method!r}; valid: {', '.join(METHODS)}"),
        (cfg.n_rollouts >= 2, f"n_rollouts must be >= 2, got {cfg.n_rollouts}"),
        (cfg.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
        (cfg.max_prompt_length >= 1, f"max_prompt_length must be >= 1, got {cfg.max_prompt_length}"),
        (cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"lr must be > 0 and finite, got {cfg.lr}"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {cfg.max_grad_norm}"),
        (cfg.top_k >= 1, f"top_k must be >= 1, got {cfg.top_k}"),
        (cfg.target_update_every >= 1, f"target_update_every must be >= 1, got {cfg.target_update_every}"),
        (0 <= cfg.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}"),
        (
            cfg.generation_batch_size >= 1,
            f"generation_batch_size must be >= 1, got {cfg.generation_batch_size}",
        ),
        (cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every}"),
        (cfg.max_prompts is None or cfg.max_prompts >= 1, f"max_prompts must be >= 1, got {cfg.max_prompts}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ---------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainScorerResult:
    output_dir: Path
    metrics: dict[str, Any]  # as metrics.json


def sample_rollouts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    reward: Any,
    n: int,
    max_new_tokens: int,
    max_prompt_length: int,
    seed: int,
    batch_size: int = 64,
    top_k: int = 0,
) -> tuple[list[Rollout], list[Prompt]]:
    """n base-model samples (prompts cycled in a seeded order) scored by `reward`; with top_k > 0 also the base
    top-k at every non-terminal prefix (CD-Q). Returns (rollouts, their prompts)."""
    from sacpo.models.generate import sample

    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    chosen = [prompts[order[i % len(order)]] for i in range(n)]
    cache: dict[str, list[int]] = {}
    prompt_ids = []
    for p in chosen:
        key = json.dumps(p if isinstance(p, str) else list(p), sort_keys=True)
        if key not in cache:
            cache[key] = encode_prompt(tokenizer, p, max_prompt_length)
        prompt_ids.append(cache[key])
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        seqs = sample(model, prompt_ids, eos, pad, n=1, max_new_tokens=max_new_tokens, batch_size=batch_size)
    texts = [decode_response(tokenizer, s.input_ids[s.prompt_len :], eos)[0] for s in seqs]
    rewards = torch.as_tensor(reward(chosen, texts)).detach().double().cpu().reshape(-1)
    if rewards.numel() != len(seqs) or not torch.isfinite(rewards).all():
        raise ValueError(
            f"reward {getattr(reward, 'name', reward)!r} returned bad scores (count or non-finite)"
        )
    tops = base_topk(model, seqs, pad, top_k, batch_size) if top_k > 0 else [(None, None)] * len(seqs)
    rollouts = [
        Rollout(s, float(r), ids, lp) for s, r, (ids, lp) in zip(seqs, rewards.tolist(), tops, strict=True)
    ]
    return rollouts, chosen


@torch.no_grad()
def evaluate_scorer(
    scorer: PrefixScorer,
    rollouts: Sequence[Rollout],
    pad_id: int,
    method: str,
    target: PrefixScorer | None,
    k: int,
    batch_size: int = 32,
) -> dict[str, float | None]:
    """Mean losses over rollouts: the method's own loss, the MSE to the final reward at every prefix (the FUDGE
    loss, comparable across methods) and at the terminal prefix only. None when there are no rollouts."""
    if not rollouts:
        return {"loss": None, "mse_to_return": None, "terminal_mse": None}
    sums = {"loss": 0.0, "mse_to_return": 0.0, "terminal_mse": 0.0}
    counts = {"loss": 0, "mse_to_return": 0, "terminal_mse": 0}
    device = scorer.device
    for start in range(0, len(rollouts), batch_size):
        batch = {
            key: v.to(device)
            for key, v in _batch_tensors(rollouts[start : start + batch_size], pad_id, k).items()
        }
        values = scorer(batch["input_ids"], batch["attention_mask"]).values  # (B, T)
        returns = batch["rewards"][:, None].expand_as(values)
        own = scorer_targets(method, batch, target)
        for name, tgt, mask in (
            ("loss", own, batch["value_mask"]),
            ("mse_to_return", returns, batch["value_mask"]),
            ("terminal_mse", returns, batch["terminal"]),
        ):
            sq = (values - tgt.to(values.dtype)) ** 2
            sums[name] += torch.where(mask, sq, torch.zeros_like(sq)).sum().item()
            counts[name] += int(mask.sum().item())
    return {name: sums[name] / counts[name] for name in sums}


def train_prefix_scorer(cfg: TrainScorerConfig, show_progress: bool = True) -> TrainScorerResult:
    """Sample rollouts from the base model, score them, train V by CD-FUDGE or CD-Q, save atomically.

    metrics.json: rollout statistics (reward mean/std — the std² is the MSE of the best constant predictor),
    held-out losses before and after training, the loss history, seconds.
    """
    validate_train_config(cfg)
    check_reward_spec(cfg.reward)
    check_model_dir(cfg.model)
    prompts = load_prompts(cfg.prompts, cfg.prompts_split, cfg.max_prompts)
    started = time.time()
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id

    base = load_model(cfg.model).to(device).eval()
    reward = resolve_reward(cfg.reward, device)
    k = cfg.top_k if cfg.method == "q" else 0
    log.info("sampling %d rollouts from %s", cfg.n_rollouts, cfg.model)
    rollouts, _ = sample_rollouts(
        base,
        tokenizer,
        prompts,
        reward,
        cfg.n_rollouts,
        cfg.max_new_tokens,
        cfg.max_prompt_length,
        cfg.seed,
        cfg.generation_batch_size,
        top_k=k,
    )
    del base, reward
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    rng = random.Random(cfg.seed + 1)
    idx = list(range(len(rollouts)))
    rng.shuffle(idx)
    n_eval = round(cfg.eval_fraction * len(idx))
    eval_set = [rollouts[i] for i in idx[:n_eval]]
    train_set = [rollouts[i] for i in idx[n_eval:]]

    scorer = PrefixScorer.from_base(cfg.model, tokenizer, cfg.seed).to(device)
    target = _frozen_copy(scorer) if cfg.method == "q" else None
    kk = max(k, 1)
    scorer.model.eval()
    before = evaluate_scorer(scorer, eval_set, pad_id, cfg.method, target, kk)
    history = _fit(cfg, scorer, target, train_set, pad_id, kk, show_progress)
    scorer.model.eval()
    after = evaluate_scorer(scorer, eval_set, pad_id, cfg.method, target, kk)
    after_train = evaluate_scorer(scorer, train_set, pad_id, cfg.method, target, kk)
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    metrics = {
        "method": cfg.method,
        "reward": cfg.reward,
        "n_rollouts": len(rollouts),
        "n_train": len(train_set),
        "n_heldout": len(eval_set),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else None,
        "mean_response_tokens": sum(r.seq.response_len for r in rollouts) / len(rollouts),
        "heldout_before": before,
        "heldout_after": after,
        "train_after": after_train,
        "steps": cfg.steps,
        "history": history,
        "seconds": round(time.time() - started, 2),
    }
    scorer.meta.update(
        {
            "method": cfg.method,
            "reward": cfg.reward,
            "base_fingerprint": fingerprint_model(cfg.model),
            "tokenizer_fingerprint": fingerprint_tokenizer(tokenizer),
            "max_prompt_length": cfg.max_prompt_length,
            "max_new_tokens": cfg.max_new_tokens,
            "top_k": cfg.top_k if cfg.method == "q" else None,
        }
    )
    out = scorer.to("cpu").save(
        cfg.output_dir,
        tokenizer,
        {"metrics.json": json.dumps(metrics, indent=2) + "\n", "config.yaml": to_yaml(cfg)},
    )
    log.info(
        "prefix scorer (%s) → %s; held-out MSE to the return: %s → %s",
        cfg.method,
        out,
        before["mse_to_return"],
        after["mse_to_return"],
    )
    return TrainScorerResult(out, metrics)


def _frozen_copy(scorer: PrefixScorer) -> PrefixScorer:
    model = copy.deepcopy(scorer.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return PrefixScorer(model, scorer.meta, name=scorer.name + "(target)")


def _fit(
    cfg: TrainScorerConfig,
    scorer: PrefixScorer,
    target: PrefixScorer | None,
    train_set: list[Rollout],
    pad_id: int,
    k: int,
    show_progress: bool,
) -> list[dict[str, float]]:
    from sacpo.train.checkpoint import NonFiniteError

    if not train_set:
        raise ConfigError("no training rollouts left after the held-out split; raise n_rollouts")
    device = scorer.device
    scorer.model.train()
    params = [p for p in scorer.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, math.ceil(0.05 * cfg.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(cfg.seed + 2)
    order: list[int] = []
    history: list[dict[str, float]] = []
    window: list[float] = []
    bar = tqdm(total=cfg.steps, desc=f"prefix scorer ({cfg.method})", disable=not show_progress)
    for step in range(cfg.steps):
        if target is not None and step > 0 and step % cfg.target_update_every == 0:
            target.model.load_state_dict(scorer.model.state_dict())
        if len(order) < cfg.batch_size:
            fresh = list(range(len(train_set)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = {
            key: v.to(device) for key, v in _batch_tensors([train_set[i] for i in idx], pad_id, k).items()
        }
        targets = scorer_targets(cfg.method, batch, target)  # (B, T)
        values = scorer(batch["input_ids"], batch["attention_mask"]).values  # (B, T)
        loss = masked_mse(values, targets, batch["value_mask"])
        if not torch.isfinite(loss):
            raise NonFiniteError(f"prefix scorer: loss is {loss.item()} at step {step + 1}; lower lr")
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            history.append({"step": step + 1, "loss": sum(window) / len(window)})
            window.clear()
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
    bar.close()
    return history
