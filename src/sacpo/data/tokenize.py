"""Records → token ids and response masks; batches → padded tensors.

Prompt and response are tokenized separately and concatenated (no token merges across the boundary), the
response ends with EOS. Truncation policy: the prompt keeps its *end* (left-truncated to max_prompt_length), then
the response is cut at its end to fit max_length.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from sacpo.data.records import BinaryExample, PairedExample, Prompt

PLAIN_SEPARATOR = "\n"


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as a conversation: a plain string becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """Prompt text: the chat template with a generation prompt when the tokenizer has one, else
    the message contents joined by newlines followed by PLAIN_SEPARATOR."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt + PLAIN_SEPARATOR
    return "\n".join(m["content"] for m in prompt) + PLAIN_SEPARATOR


@dataclass(frozen=True)
class Encoded:
    """One sequence: ids (prompt + response + EOS) and the number of prompt tokens."""

    input_ids: tuple[int, ...]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def encode_prompt(
    tokenizer: Any, prompt: Prompt, max_prompt_length: int, stats: Counter | None = None
) -> list[int]:
    """Prompt token ids, left-truncated to max_prompt_length (keep the end, where the question usually is).
    `stats["prompts_truncated"]` counts the prompts that were cut, when a Counter is given."""
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    if stats is not None:
        stats["prompts"] += 1
        stats["prompts_truncated"] += len(ids) > max_prompt_length
    return ids[-max_prompt_length:]


def encode(
    tokenizer: Any, prompt_ids: list[int], response: str, max_length: int, stats: Counter | None = None
) -> Encoded:
    """prompt_ids + tokens(response) + EOS, the response cut at its end so the total is ≤ max_length.
    `stats["responses_cut"]` counts the responses that lost tokens (EOS included), when a Counter is given."""
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_length={max_length}")
    if stats is not None:
        stats["responses"] += 1
        stats["responses_cut"] += len(response_ids) > room
    return Encoded(tuple(prompt_ids) + tuple(response_ids[:room]), len(prompt_ids))


def encode_paired(
    tokenizer: Any,
    examples: list[PairedExample],
    max_length: int,
    max_prompt_length: int,
    stats: Counter | None = None,
) -> list[tuple[Encoded, Encoded]]:
    """(chosen, rejected) encodings sharing the same prompt ids (truncation counted in `stats`)."""
    out = []
    for ex in examples:
        p = encode_prompt(tokenizer, ex.prompt, max_prompt_length, stats)
        out.append(
            (
                encode(tokenizer, p, ex.chosen, max_length, stats),
                encode(tokenizer, p, ex.rejected, max_length, stats),
            )
        )
    return out


def encode_binary(
    tokenizer: Any,
    examples: list[BinaryExample],
    max_length: int,
    max_prompt_length: int,
    stats: Counter | None = None,
) -> list[tuple[Encoded, Encoded]]:
    """(completion, mismatched) encodings: the mismatched sequence pairs prompt i with the completion of example
    (i+1) mod N — the KTO paper's / TRL's pairs for the reference point z_ref. Fixed at the data level, so it
    does not depend on batch size or the number of processes."""
    n = len(examples)
    prompts = [encode_prompt(tokenizer, ex.prompt, max_prompt_length, stats) for ex in examples]
    return [
        (
            encode(tokenizer, prompts[i], examples[i].completion, max_length, stats),
            encode(tokenizer, prompts[i], examples[(i + 1) % n].completion, max_length),
        )
        for i in range(n)
    ]


def pad_sequences(seqs: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence.

    Returns input_ids (N, T), attention_mask (N, T), labels_mask (N, T−1): 1 where token t+1 is a response token
    (aligned with logits[:, :-1] predicting input_ids[:, 1:]).
    """
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (N, T)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)  # (N, T)
    resp = torch.zeros((len(seqs), width), dtype=torch.bool)  # (N, T)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        resp[i, s.prompt_len : n] = True
    return {"input_ids": ids, "attention_mask": attn, "labels_mask": resp[:, 1:]}
