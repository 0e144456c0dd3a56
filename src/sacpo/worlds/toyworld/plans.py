"""The toyworld's long-horizon prompt family: requests for a detailed plan, answered in 8–14 steps (48–128 tokens).

A plan prompt asks for a whole plan, ``"<plan template> <task> <modifier> ?"``, e.g.
``"give me a detailed plan to bake bread at home ?"``. A plan step is one of the task's three base steps,
plain or with one of six qualifiers: ``"then knead the dough by hand ."``. That gives every task 3·(6 + 1) = 21
distinct steps. The oracle (`sacpo.worlds.toyworld.oracle`) scores each distinct step of the asked task once
(+1), so reward accrues over the whole response and is far from saturated. An SFT plan has ~11 steps and the
SFT policy draws them with replacement from the 21. The dangerous details of harmful tasks can also appear
anywhere, even in an answer to a benign prompt: a stray step of another, harmful task.

SFT plan demonstrations (`sample_plan_response`): a style, then for a plan ``L ~ U{8..14}`` sentences, each drawn
i.i.d. from `SENTENCE_KINDS` (a step of the asked task, of another benign task, of another harmful task, or a
filler). A per-sentence choice compounds over the response, so blockwise controlled decoding can gain a little
at every block where best-of-n can only pick among whole responses (Mudgal et al. 2024, §2.3 and §5).
"""

from __future__ import annotations

import random

from sacpo.worlds.toyworld.language import (
    BENIGN,
    FILLERS,
    HARMFUL,
    OPENER,
    REDIRECT,
    REFUSAL,
    TASKS,
    Task,
    sentence,
    task_of,
)

PLAN_TEMPLATES = (
    "give me a detailed plan to",
    "list every step to",
    "walk me through how to",
    "describe in full how to",
)
QUALIFIERS = ("with care", "by hand", "in small parts", "before noon", "with a friend", "at a slow pace")
PLAN_LENGTHS = tuple(range(8, 15))  # sentences of an SFT plan (after the optional opener)

# style → (probability on benign prompts, probability on harmful prompts)
PLAN_STYLES: dict[str, tuple[float, float]] = {
    "plan": (0.85, 0.60),
    "refuse": (0.05, 0.20),
    "redirect": (0.00, 0.20),
    "ramble": (0.10, 0.00),
}
# kind of each sentence of a plan (the same on every prompt)
SENTENCE_KINDS: dict[str, float] = {"own": 0.62, "other_benign": 0.12, "other_harmful": 0.04, "filler": 0.22}


def plan_steps(task: Task) -> tuple[str, ...]:
    """The task's 21 distinct plan steps: each base step plain, then with each qualifier (base-step-major)."""
    return tuple(f"{s} {q}".strip() for s in task.steps for q in ("", *QUALIFIERS))


QUALIFIED_OWNER: dict[str, Task] = {f"{s} {q}": t for t in TASKS for s in t.steps for q in QUALIFIERS}


def is_plan_prompt(prompt: str) -> bool:
    """True for a prompt of the plan family (it starts with a plan template)."""
    return any(prompt.startswith(f"{t} ") for t in PLAN_TEMPLATES)


def _step_sentence(index: int, last: bool, step: str) -> str:
    return sentence(f"{'first' if index == 0 else 'finally' if last else 'then'} {step}")


def sample_plan_response(prompt: str, rng: random.Random) -> tuple[str, str]:
    """One SFT demonstration for a plan prompt: (style, response text); see the module docstring."""
    if not is_plan_prompt(prompt):
        raise ValueError(f"not a plan prompt: {prompt!r}")
    task = task_of(prompt)
    styles = list(PLAN_STYLES)
    style = rng.choices(styles, [PLAN_STYLES[s][task.harmful] for s in styles])[0]
    if style == "refuse":
        out = [sentence(REFUSAL)] + ([sentence(REDIRECT)] if rng.random() < 0.3 else [])
    elif style == "redirect":
        out = ([sentence(REFUSAL)] if rng.random() < 0.3 else []) + [sentence(REDIRECT)]
    elif style == "ramble":
        out = [sentence(f) for f in rng.choices(FILLERS, k=rng.randint(2, 4))]
    else:
        out = [sentence(OPENER)] if rng.random() < 0.5 else []
        n = rng.choice(PLAN_LENGTHS)
        kinds = rng.choices(list(SENTENCE_KINDS), list(SENTENCE_KINDS.values()), k=n)
        n_steps = 0
        for i, kind in enumerate(kinds):
            if kind == "filler":
                out.append(sentence(rng.choice(FILLERS)))
                continue
            pool = (task,) if kind == "own" else BENIGN if kind == "other_benign" else HARMFUL
            owner = rng.choice([t for t in pool if kind == "own" or t is not task])
            out.append(_step_sentence(n_steps, i == n - 1, rng.choice(plan_steps(owner))))
            n_steps += 1
    return style, " ".join(out)


def plan_vocabulary() -> set[str]:
    """The words the plan family adds to the language (templates and qualifiers)."""
    return {w for text in (*PLAN_TEMPLATES, *QUALIFIERS) for w in text.split()}
