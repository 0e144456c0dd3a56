"""Records → token ids and response masks; batches → padded tensors.

Prompts are rendered to text by `sacpo.data.prompt_format.render_prompt` (system prompt, chat template). Prompt and
response are tokenized separately and concatenated (no token merges across the boundary), the
response ends with EOS. Truncation policy: the prompt keeps its *end* (left-truncated to max_prompt_length), then
the response is cut at its end to fit max_length.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sacpo.data.prompt_format import DEFAULT_FORMAT, PromptFormat, render_prompt
from sacpo.data.records import BinaryExample, PairedExample, Prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """One sequence: ids (prompt + response + EOS) and the number of prompt tokens."""

    input_ids: tuple[int, ...]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def encode_prompt(
    tokenizer: Any,
    prompt: Prompt,
    max_prompt_length: int,
    stats: Counter | None = None,
    fmt: PromptFormat = DEFAULT_FORMAT,
) -> list[int]:
    """Prompt token ids of `render_prompt(tokenizer, prompt, fmt)`, left-truncated to max_prompt_length (keep the
    end, where the question usually is). `stats["prompts_truncated"]` counts the prompts that were cut, when a
    Counter is given."""
    ids = tokenizer(render_prompt(tokenizer, prompt, fmt), add_special_tokens=False)["input_ids"]
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
    fmt: PromptFormat = DEFAULT_FORMAT,
) -> list[tuple[Encoded, Encoded]]:
    """(chosen, rejected) encodings sharing the same prompt ids (prompts rendered with `fmt`, truncation counted
    in `stats`)."""
    out = []
    for ex in examples:
        p = encode_prompt(tokenizer, ex.prompt, max_prompt_length, stats, fmt)
        out.append(
            (
                encode(tokenizer, p, ex.chosen, max_length, stats),
                encode(tokenizer, p, ex.rejected, max_length, stats),
            )
        )
    return out


def mismatched_partners(prompt_keys: Sequence[Hashable], seed: int = 0) -> list[int]:
    """partner[i] = j: the example whose completion is paired with prompt i in KTO's mismatched pairs — always one
    whose prompt key differs from prompt i's (a derangement across prompts).

    Construction: group the N examples by prompt key, shuffle the order of the groups and the order inside each
    group (random.Random(seed)), lay the examples out group after group in positions 0 … N−1, and pair position k
    with position (k + m) mod N, m the size of the largest group. A group of size s ≤ m occupies a run of
    positions [a, a+s); its targets [a+m, a+s+m) mod N miss the run when s + m ≤ N, which holds for every group
    when m ≤ N/2. So when no prompt has more than half of the examples, `partner` is a permutation with no
    fixed prompt: every completion is used exactly once, always under another prompt.

    When one prompt has more than half (m > N/2) no such permutation exists; a target that falls in its own group
    moves forward to the next position of another group (valid pairs, some completions used more than once; a
    warning says so). When all examples share one prompt there is no mismatched pair at all: partner[i] = (i+1)
    mod N with a warning (z_ref then measures matched completions of the same prompt).
    """
    n = len(prompt_keys)
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(prompt_keys):
        groups.setdefault(key, []).append(i)
    if len(groups) < 2:
        if n > 1:
            log.warning(
                "all %d KTO examples share one prompt: no mismatched (prompt, completion) pair exists; "
                "z_ref pairs each prompt with the next example's completion of the same prompt",
                n,
            )
        return [(i + 1) % n for i in range(n)]
    rng = random.Random(seed)
    ordered = list(groups.values())
    rng.shuffle(ordered)
    for members in ordered:
        rng.shuffle(members)
    layout = [i for members in ordered for i in members]  # (N,) example index at each position
    group_of = [0] * n  # position → group number
    pos = 0
    for g, members in enumerate(ordered):
        group_of[pos : pos + len(members)] = [g] * len(members)
        pos += len(members)
    m = max(len(members) for members in ordered)
    if 2 * m > n:
        log.warning(
            "one prompt has %d of the %d KTO examples (more than half): some completions are used in more than "
            "one mismatched pair for z_ref",
            m,
            n,
        )
    partner = [0] * n
    for k in range(n):
        t = (k + m) % n
        while group_of[t] == group_of[k]:  # only when 2m > N; another group exists, so this ends
            t = (t + 1) % n
        partner[layout[k]] = layout[t]
    return partner


def encode_binary(
    tokenizer: Any,
    examples: list[BinaryExample],
    max_length: int,
    max_prompt_length: int,
    stats: Counter | None = None,
    seed: int = 0,
    fmt: PromptFormat = DEFAULT_FORMAT,
) -> list[tuple[Encoded, Encoded]]:
    """(completion, mismatched) encodings for KTO: the mismatched sequence is prompt i followed by the completion
    of example `mismatched_partners(...)[i]`, an example whose (encoded) prompt differs from prompt i's.

    The mismatched pairs estimate the reference point z_ref ≈ KL(π‖π_ref) from completions not written for the
    prompt (KTO paper §4.1, `kto_reference_point`). TRL rotates completions by one inside each batch of its
    sequential dataset, and this function used to rotate over the whole list ((i+1) mod N). On data with several
    records per prompt next to each other — pku_safe_kto writes two per PKU row — half of those pairs are a
    prompt with its own other completion: a matched pair, whose log-ratio the loss moves (an undesirable one far
    below zero), so z_ref was biased (in the demo it clamped to 0 while the sampled KL was tens of nats). Here no
    pair shares its prompt, unless one prompt has more than half of the examples or all share one (see
    mismatched_partners). The pairing is fixed at the data level by `seed`: it does not depend on batch size or
    the number of processes, and the reference log-probs of the pairs are cached with the encoded data. Prompts
    are rendered with `fmt`.
    """
    prompts = [encode_prompt(tokenizer, ex.prompt, max_prompt_length, stats, fmt) for ex in examples]
    partner = mismatched_partners([tuple(p) for p in prompts], seed)
    return [
        (
            encode(tokenizer, prompts[i], examples[i].completion, max_length, stats),
            encode(tokenizer, prompts[i], examples[partner[i]].completion, max_length),
        )
        for i in range(len(examples))
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


def shares_prompt(a: Encoded, b: Encoded) -> bool:
    """The two sequences of a pair start with the same non-empty prompt (what `pack_pairs` needs)."""
    p = a.prompt_len
    return p >= 1 and b.prompt_len == p and a.input_ids[:p] == b.input_ids[:p]


def packed_length(a: Encoded, b: Encoded) -> int:
    """The width of the pair's shared-prompt row (`pack_pairs`): the prompt and response a, then response b."""
    return len(a.input_ids) + b.response_len


def pack_pairs(pairs: list[tuple[Encoded, Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair — prompt, response a, response b — so the shared prompt is run once, not twice.

    The attention pattern keeps both responses exactly what they are in their own sequence (prefix sharing, Wang
    et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing"):

        prompt token  q:  attends to prompt tokens k ≤ q                      positions 0 … P−1
        a token       q:  attends to the prompt and a tokens k ≤ q           positions P … P+La−1
        b token       q:  attends to the prompt and b tokens k ≤ q (not a)   positions P … P+Lb−1 (restart at P)
        padding       q:  attends to itself only (no all-masked rows)

    Predictions: a's token t (t ≥ P) from the hidden state at t−1; b's first token from the prompt's last state
    (P−1), its next ones from the previous b state. On data whose prompt is half of each sequence this is a
    quarter fewer tokens through the backbone.

    Returns input_ids (B, T), position_ids (B, T), allowed (B, 1, T, T) bool (True = may attend), and for the M
    predicted tokens flat indices into (B·T): src (hidden state that predicts), label (the token) and seq (M,),
    the sequence each belongs to — a of pair i is sequence i, b is B + i (as `logps.split(B)` expects).
    """
    if not pairs:
        raise ValueError("pack_pairs needs at least one pair")
    bad = [i for i, (a, b) in enumerate(pairs) if not shares_prompt(a, b)]
    if bad:
        raise ValueError(
            f"pairs {bad[:5]} do not share a non-empty prompt; pad them with pad_sequences instead"
        )
    n = len(pairs)
    width = max(packed_length(a, b) for a, b in pairs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)  # (B, T)
    pos = torch.zeros((n, width), dtype=torch.long)  # (B, T)
    seg = torch.full((n, width), 3, dtype=torch.long)  # (B, T): 0 prompt, 1 a, 2 b, 3 padding
    src, label, seq = [], [], []
    for i, (a, b) in enumerate(pairs):
        p, la, lb = a.prompt_len, a.response_len, b.response_len
        end_a, end = p + la, p + la + lb
        ids[i, :end] = torch.tensor(a.input_ids + b.input_ids[p:])
        pos[i, :end_a] = torch.arange(end_a)
        pos[i, end_a:end] = torch.arange(p, p + lb)
        seg[i, :p], seg[i, p:end_a], seg[i, end_a:end] = 0, 1, 2
        row = i * width
        t_a = torch.arange(p, end_a) + row
        t_b = torch.arange(end_a, end) + row
        src_b = t_b - 1
        if lb:
            src_b[0] = row + p - 1
        src += [t_a - 1, src_b]
        label += [t_a, t_b]
        seq += [torch.full((la,), i), torch.full((lb,), n + i)]
    k = torch.arange(width)
    allowed = (k[None, :] <= k[:, None])[None] & ~(
        (seg[:, :, None] == 2) & (seg[:, None, :] == 1)
    )  # (B, T, T)
    allowed = torch.where((seg == 3)[:, :, None], torch.eye(width, dtype=torch.bool)[None], allowed)
    return {
        "input_ids": ids,
        "position_ids": pos,
        "allowed": allowed[:, None],
        "src": torch.cat(src),
        "label": torch.cat(label),
        "seq": torch.cat(seq),
    }
