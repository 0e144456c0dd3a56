"""Prefix value models V_θ(x, y^t) for controlled decoding: `PrefixScorer` (trained by `sacpo.train.prefix_scorer`).

Model: the base policy's architecture with a scalar linear head applied at *every* position —
`AutoModelForSequenceClassification(num_labels=1)` built from the base causal-LM directory (backbone initialised
from the base weights, head from the seed; `sacpo.models.reward.build_reward_model`), run through its backbone
(`model.base_model`) and head (`model.score`) directly. values[b, t] = V(x, ids[b, :t+1]): the value of the prefix
ending at column t. With a prompt of P tokens, column P−1 is the empty response and column len−1 the full
response (EOS included when generated).

Children (CD-Q targets, the decoder's candidates): V of all k children z of every prefix of a batch,
V(x, ids[b, :t+1] + z), comes from ONE forward per chunk: the sequence followed by its children, with a 4D
attention mask letting child (t, j) see the prefix columns ≤ t and itself ("tree attention", `child_values`; the
fallback for attention implementations that take no custom mask builds the (B·T·k) child sequences explicitly,
`naive_child_values`).

Directory (`save` / `load`): HF model dir (config.json, model.safetensors, tokenizer files), prefix_scorer.json
(kind, and what the trainer records: method, reward, base model fingerprint, lengths), plus extra files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sacpo.data.tokenize import Encoded, pad_sequences
from sacpo.fsutil import atomic_dir, atomic_write_json, atomic_write_text
from sacpo.models.load import ModelLoadError, check_model_dir
from sacpo.models.modules import cache_kwargs, disable_dropout, output_cache, resolve_device
from sacpo.models.reward import build_reward_model
from sacpo.rng import torch_seeded

META_FILE = "prefix_scorer.json"
KIND = "prefix_value"
TREE_ATTENTION = ("eager", "sdpa")  # attention implementations that take a custom 4D additive mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left- or right-padded batch: the number of real tokens before each column. (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decode_response(tokenizer: Any, response_ids: Sequence[int], eos_id: int) -> tuple[str, bool]:
    """(text, finished): the response text without its final EOS, and whether it ended with EOS."""
    ids = list(response_ids)
    finished = bool(ids) and ids[-1] == eos_id
    text_ids = ids[:-1] if finished else ids
    return tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), finished


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
        with torch_seeded(seed):  # the caller's global RNG is left as it was
            model = build_reward_model(base_dir, tokenizer)
        disable_dropout(model)
        return cls(model, {"kind": KIND, "base_model": str(base_dir)}, name=f"V[{Path(base_dir).name}]")

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> PrefixScorer:
        """Load a directory written by `save` (as `sacpo.train.prefix_scorer` does; safetensors only), in eval
        mode."""
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
        """Write the HF model dir + tokenizer + prefix_scorer.json (+ extra text files) atomically
        (`sacpo.fsutil.atomic_dir`: an existing directory at `path` stays until the new one replaces it)."""
        out = Path(path)
        with atomic_dir(out) as tmp:
            self.model.config.use_cache = True
            self.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / META_FILE, {**self.meta, "kind": KIND})
            for name, text in (extra_files or {}).items():
                atomic_write_text(tmp / name, text)
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
