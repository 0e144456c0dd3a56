"""Scalar-head (reward / cost / safety) models: building, pooled scores, and the on-disk directory format.

Model: the policy's causal-LM backbone with a scalar head, `AutoModelForSequenceClassification(num_labels=1)`.
The score s(x, y) is the head's output at the last *attended* token of prompt + response + EOS. Pooling follows
the attention mask, not `config.pad_token_id`: sacpo tokenizers often use EOS as PAD, and Hugging Face's own
`...ForSequenceClassification.forward` would then pool the token *before* the final EOS.

A reward-model directory is an HF model directory plus `reward_model.json` (kind, lengths, seed); an ensemble
directory holds `member-<i>/` directories and a `reward_model.json` that lists them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sacpo.data.tokenize import Encoded, pad_sequences
from sacpo.models.load import ModelLoadError, check_model_dir

META_FILE = "reward_model.json"


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head output at the last attended token of each right-padded row.

    input_ids, attention_mask: (N, T) → scores (N,) float32. Runs the backbone (`model.base_model`) and applies
    the scalar head (`model.score`) only at the pooled positions.
    """
    head = getattr(model, "score", None)
    if head is None:
        raise ModelLoadError(f"{type(model).__name__} has no `score` head; not a decoder reward model")
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask
    ).last_hidden_state  # (N, T, H)
    last = attention_mask.long().sum(-1) - 1  # (N,)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)
    return head(pooled).squeeze(-1).float()  # (N,)


@torch.inference_mode()
def score_encoded(
    model: Any, seqs: Sequence[Encoded], pad_id: int, batch_size: int, device: Any
) -> torch.Tensor:
    """Scores (N,) on the CPU of encoded sequences, in length-sorted batches (longest first, little padding)."""
    out = torch.empty(len(seqs), dtype=torch.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids), reverse=True)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pad_sequences([seqs[i] for i in idx], pad_id)
        scores = sequence_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        out[idx] = scores.cpu()
    return out


def build_reward_model(model_dir: str | Path, tokenizer: Any, trust_remote_code: bool = False) -> Any:
    """A fresh scalar-head model from a causal-LM directory (backbone weights loaded, head initialised from the
    global torch RNG; seed before calling). Safetensors only."""
    from transformers import AutoModelForSequenceClassification

    p = check_model_dir(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        p,
        num_labels=1,
        dtype=torch.float32,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    return model


def resolve_member_dirs(path: str | Path) -> list[Path]:
    """A reward-model directory → [itself]; an ensemble directory (reward_model.json lists members) → members."""
    p = Path(path)
    meta_file = p / META_FILE
    if meta_file.is_file():
        members = json.loads(meta_file.read_text()).get("members")
        if members:
            return [p / m for m in members]
    return [p]


def read_meta(path: str | Path) -> dict[str, Any]:
    """reward_model.json of a model or ensemble directory ({} when absent)."""
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
