"""Scalar-head (reward / cost / safety) models: building, pooled scores, and the on-disk directory format.

Model: the policy's causal-LM backbone with a scalar head, `AutoModelForSequenceClassification(num_labels=1)`.
The score s(x, y) is the head's output at the last *attended* token of prompt + response + EOS. Pooling follows
the attention mask, not `config.pad_token_id`: sacpo tokenizers often use EOS as PAD, and Hugging Face's own
`...ForSequenceClassification.forward` would then pool the token *before* the final EOS.

A reward-model directory is an HF model directory plus `reward_model.json` (kind, lengths, seed), or — trained
with LoRA and `lora.save: adapter` — a peft SEQ_CLS adapter directory (LoRA on the backbone, the head in full as a
module to save) on the causal-LM base it was built from (`sacpo.models.adapters`); an ensemble directory holds
`member-<i>/` directories and a `reward_model.json` that lists them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sacpo.data.tokenize import Encoded, pad_sequences
from sacpo.models.adapters import apply_chain, is_adapter_dir, read_chain, task_types
from sacpo.models.load import ModelLoadError, check_model_dir
from sacpo.rng import torch_untouched

META_FILE = "reward_model.json"


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head output at the last attended token of each right-padded row.

    input_ids, attention_mask: (N, T) → scores (N,) float32. Runs the backbone (`model.base_model`) and applies
    the scalar head (`model.score`) only at the pooled positions.
    """
    model = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # a peft model: its transformer
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
    global torch RNG; seed before calling). Safetensors only. A LoRA policy's adapter directory gives its base with
    the chain of adapters merged into the backbone."""
    chain = read_chain(model_dir) if is_adapter_dir(model_dir) else None
    if chain is not None and any(t not in (None, "CAUSAL_LM") for t in task_types(chain)):
        raise ModelLoadError(f"{model_dir}: not a causal-LM adapter chain ({task_types(chain)})")
    model = _from_pretrained(
        chain.base if chain else check_model_dir(model_dir), torch.float32, trust_remote_code
    )
    if chain is not None:
        model = apply_chain(model, chain.adapters)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    return model


def _from_pretrained(path: Path, dtype: torch.dtype, trust_remote_code: bool, **kwargs: Any) -> Any:
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=1,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load a scalar-head model: {type(e).__name__}: {e}") from e


def load_reward_model(
    path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> Any:
    """A trained reward / cost model, in eval mode: a full sequence-classification directory, or a SEQ_CLS adapter
    chain (the base built with a scalar head, the adapters merged in; its head from the adapter). The global torch
    RNG is left as it was (the head initialised before the trained one is loaded draws from it)."""
    p = check_model_dir(path)
    if is_adapter_dir(p):
        chain = read_chain(p)
        kinds = task_types(chain)
        if kinds[-1] != "SEQ_CLS" or any(k not in (None, "CAUSAL_LM") for k in kinds[:-1]):
            raise ModelLoadError(
                f"{p}: adapter task types {kinds}: not a reward-model adapter (SEQ_CLS last)"
            )
        with torch_untouched():
            model = apply_chain(
                _from_pretrained(chain.base, torch.float32, trust_remote_code), chain.adapters
            )
        model = model.to(dtype)
    else:
        archs = json.loads((p / "config.json").read_text()).get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ModelLoadError(
                f"{p}: architectures {archs} is not a sequence-classification (reward) model; "
                "train one with `sacpo reward`"
            )
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            p, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    if model.config.num_labels != 1:
        raise ModelLoadError(f"{p}: num_labels={model.config.num_labels}; a reward model has 1")
    model.config.use_cache = False
    return model.eval()


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
