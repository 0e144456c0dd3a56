"""How a prompt becomes text: the system prompt and chat template of a run, and the ONE function that renders.

Every path that turns a prompt into tokens — training pairs, the reference pass, held-out KL prompts, on-policy
pairs, evaluation samples, best-of-n, controlled decoding — calls `render_prompt(tokenizer, prompt, fmt)` (through
`sacpo.data.tokenize.encode_prompt`), so one `PromptFormat` describes the text of every prompt of a run.

`PromptFormat(system_prompt, chat_template)`:

    system_prompt  None    the prompt's messages as they are: a template that injects a default system message
                           when none is given (SmolLM2's: "You are a helpful AI assistant named SmolLM, trained by
                           Hugging Face") does so
                   "none"  no system message at all, not even the template's default (below)
                   S       the system message S, prepended to every prompt ("" is an empty system message, which
                           SmolLM2 still renders as an empty system block: use "none" for no block)
    chat_template  None    the tokenizer's own template (none: plain text, "contents joined by \\n" + "\\n")
                   T       this Jinja template instead (the text; `from_fields` also reads it from a file)

A prompt given as a conversation that already holds a system message keeps it with system_prompt None; with
"none" or S the two would conflict, and rendering raises ConfigError (neither is silently dropped).

"none" with a template: rendering the messages without a system message lets the template add its default, so
the text is made from a rendering *with* a system message whose block is then cut out:

    with_sys = render([system: SENTINEL] + messages)      block = render([system: SENTINEL])   (no generation prompt)
    text     = lead + with_sys[len(block):]                lead  = bos_token when the template emits it first, else ""

checked: with_sys starts with block, SENTINEL is not left in the text, and the plain rendering render(messages) is
lead + (the default block, possibly empty) + the rest of the text — i.e. the text is the template's own output with
its default system block removed and nothing else changed. A template that does not render the system message as
its own leading block (e.g. one that folds it into the first user turn) fails the checks and raises ConfigError:
give `chat_template` then (or system_prompt None, which for a template without a default renders the same).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sacpo.config import ConfigError
from sacpo.data.records import Message, Prompt

NO_SYSTEM = "none"
PLAIN_SEPARATOR = "\n"
SENTINEL = "SACPO-SYSTEM-SENTINEL-4f1c"

SYSTEM_PROMPT_HELP = (
    "system message of every prompt: null = the prompts as given (a chat template may add its default system "
    "message, as SmolLM2's does), 'none' = no system message at all (the template's default removed), any other "
    "string = that system message (sacpo.data.prompt_format)"
)
CHAT_TEMPLATE_HELP = (
    "chat template override: a Jinja template (text containing '{{' or '{%') or the path of a .jinja file; "
    "null = the tokenizer's own template"
)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class PromptFormat:
    """The system prompt and chat template of a run (module docstring); chat_template is Jinja text."""

    system_prompt: str | None = None
    chat_template: str | None = None
    template_source: str | None = None  # the file the template was read from (None: given inline)

    @classmethod
    def from_fields(cls, system_prompt: str | None, chat_template: str | None) -> PromptFormat:
        """From config values: chat_template is Jinja text when it contains '{{' or '{%', else the path of a file
        holding it (read now). A missing file or a template that does not parse is a ConfigError."""
        if chat_template is None:
            return cls(system_prompt)
        source = None
        text = chat_template
        if "{{" not in chat_template and "{%" not in chat_template:
            path = Path(chat_template).expanduser()
            if not path.is_file():
                raise ConfigError(
                    f"chat_template: {chat_template!r} is neither a Jinja template (no '{{{{' or '{{%') nor a file"
                )
            source, text = str(path), path.read_text(encoding="utf-8")
        import jinja2

        try:
            jinja2.Environment().parse(text)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(
                f"chat_template{f' {source}' if source else ''}: line {e.lineno}: {e}"
            ) from None
        return cls(system_prompt, text, source)

    @property
    def is_default(self) -> bool:
        """The format sacpo always used: prompts as given, the tokenizer's template."""
        return self.system_prompt is None and self.chat_template is None

    def fingerprint(self) -> str:
        """sha256 of what the rendered text depends on (the template's text, not where it came from)."""
        return _sha256(json.dumps([self.system_prompt, self.chat_template], ensure_ascii=False))

    def to_json(self) -> dict[str, Any]:
        """For run outputs: the system prompt and the template's source and sha256 (None: the tokenizer's)."""
        template = None
        if self.chat_template is not None:
            template = {"source": self.template_source or "inline", "sha256": _sha256(self.chat_template)}
        return {"system_prompt": self.system_prompt, "chat_template": template}

    def messages(self, prompt: Prompt) -> list[Message]:
        """The prompt as a conversation with this format's system message (none for "none" and None unless the
        prompt has one); ConfigError when the prompt has its own system message and system_prompt is set."""
        messages = as_messages(prompt)
        if self.system_prompt is None:
            return messages
        if any(m.get("role") == "system" for m in messages):
            raise ConfigError(
                f"system_prompt={self.system_prompt!r}, but a prompt has its own system message "
                f"({_clip(repr(messages), 160)}); set system_prompt to null to keep the prompts' own"
            )
        if self.system_prompt == NO_SYSTEM:
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]


DEFAULT_FORMAT = PromptFormat()


def as_messages(prompt: Prompt) -> list[Message]:
    """A prompt as a conversation: a plain string becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def _apply(tokenizer: Any, fmt: PromptFormat, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=fmt.chat_template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _without_system(tokenizer: Any, fmt: PromptFormat, messages: list[Message]) -> str:
    """The template's rendering of `messages` with no system block (module docstring: how and what is checked)."""
    sentinel = [{"role": "system", "content": SENTINEL}]
    try:
        with_sys = _apply(tokenizer, fmt, sentinel + messages, True)
        block = _apply(tokenizer, fmt, sentinel, False)
    except Exception as e:  # e.g. a template that raises on a conversation of only a system message
        raise ConfigError(f"system_prompt='none': {_CANNOT_CUT} (rendering it failed: {e})") from None
    plain = _apply(tokenizer, fmt, messages, True)
    template = fmt.chat_template or tokenizer.chat_template
    bos = getattr(tokenizer, "bos_token", None) or ""
    lead = bos if bos and "bos_token" in str(template) and block.startswith(bos) else ""
    text = lead + with_sys[len(block) :]
    if not (
        SENTINEL in block
        and with_sys.startswith(block)
        and SENTINEL not in text
        and plain.startswith(lead)
        and plain.endswith(text[len(lead) :])
    ):
        raise ConfigError(f"system_prompt='none': {_CANNOT_CUT}")
    return text


_CANNOT_CUT = (
    "this chat template does not render a system message as its own leading block, so its default system prompt "
    "(if any) cannot be cut out; give a chat_template without one, or system_prompt=null"
)


def render_prompt(tokenizer: Any, prompt: Prompt, fmt: PromptFormat = DEFAULT_FORMAT) -> str:
    """Prompt text: the chat template (fmt's, else the tokenizer's) with a generation prompt; without a template the
    message contents joined by newlines followed by PLAIN_SEPARATOR. fmt's system prompt as in the module
    docstring."""
    messages = fmt.messages(prompt)
    if not (fmt.chat_template or getattr(tokenizer, "chat_template", None)):
        return "\n".join(m["content"] for m in messages) + PLAIN_SEPARATOR
    if fmt.system_prompt == NO_SYSTEM:
        return _without_system(tokenizer, fmt, messages)
    return _apply(tokenizer, fmt, messages, True)


def _clip(text: str, n: int) -> str:
    """text, or its first and last parts around a count of the characters left out, when longer than n."""
    if len(text) <= n:
        return text
    head, tail = (2 * n) // 3, n // 3
    return f"{text[:head]} …[{len(text) - head - tail} chars]… {text[-tail:]}"


def log_first_prompt(
    logger: logging.Logger, tokenizer: Any, prompt: Prompt, fmt: PromptFormat, limit: int = 800
) -> str:
    """Render `prompt`, log it at INFO (repr: newlines and control characters escaped; at most `limit` characters
    of it, its start and end kept) with the format, and return the full text."""
    text = render_prompt(tokenizer, prompt, fmt)
    logger.info(
        "prompt format: system_prompt=%r, chat_template=%s; first prompt rendered (%d chars): %s",
        fmt.system_prompt,
        "the tokenizer's" if fmt.chat_template is None else (fmt.template_source or "inline"),
        len(text),
        _clip(repr(text), limit),
    )
    return text
