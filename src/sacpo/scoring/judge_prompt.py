"""The LLM judge's prompt templates and its strict verdict parser.

A template is a YAML file with a `system` and a `user` message; `{prompt}`, `{response_a}` and `{response_b}` in
them are replaced (in one pass: braces inside a response are left alone, so a response quoting "{response_b}" is
not expanded). Two ship with sacpo — `helpfulness` and `harmlessness` (sacpo/scoring/templates/) — and a
criterion that is a path to a YAML file uses the user's own. The judge must end with MT-Bench's verdict tags:
[[A]] (the first response is better), [[B]] (the second), [[C]] (a tie).

`parse_verdict` is strict, never guessing:
    exactly one distinct tag in the text        → that verdict ("[[A]] ... final: [[A]]" is still A)
    two different tags ("[[A]] or [[B]]")        → None (contradictory)
    no tag, and the whole answer is one letter  → that verdict ("A", "b.", "**C**", "tie")
    anything else                               → None (invalid)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from sacpo.config import ConfigError
from sacpo.data.records import Prompt

BUILTIN = ("helpfulness", "harmlessness")
PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")
_TAG = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)
_BARE = re.compile(r"^[\s*\"'`(\[]*(A|B|C|TIE)[\s*\"'`)\].!]*$", re.IGNORECASE)
_SLOT = re.compile(r"\{(prompt|response_a|response_b)\}")
_VERDICT = {"A": "A", "B": "B", "C": "tie", "TIE": "tie"}


@dataclass(frozen=True)
class JudgeTemplate:
    name: str  # the builtin name or the file's path
    system: str
    user: str

    @property
    def digest(self) -> str:
        """sha256 of the template text (part of every cache key: editing a template re-asks)."""
        return hashlib.sha256(f"{self.system}\0{self.user}".encode()).hexdigest()[:16]

    def messages(self, prompt: Prompt, response_a: str, response_b: str) -> list[dict[str, str]]:
        """The chat messages asking to compare response_a (shown as A) with response_b (shown as B)."""
        values = {"prompt": prompt_text(prompt), "response_a": response_a, "response_b": response_b}
        fill = lambda text: _SLOT.sub(lambda m: values[m.group(1)], text)  # noqa: E731
        out = [{"role": "user", "content": fill(self.user)}]
        return ([{"role": "system", "content": fill(self.system)}] if self.system.strip() else []) + out


def prompt_text(prompt: Prompt) -> str:
    """A prompt as the judge reads it: the text, or a conversation as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def load_template(criterion: str) -> JudgeTemplate:
    """A builtin template by name or a user's YAML file (keys system, user); ConfigError when unusable."""
    if criterion in BUILTIN:
        text = resources.files("sacpo.scoring").joinpath("templates", f"{criterion}.yaml").read_text("utf-8")
        where = criterion
    else:
        path = Path(criterion)
        if not path.is_file():
            raise ConfigError(
                f"criterion {criterion!r}: neither a builtin ({', '.join(BUILTIN)}) nor a template file"
            )
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"judge template {where}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("user"), str):
        raise ConfigError(f"judge template {where}: expected a mapping with a 'user' string (and 'system')")
    unknown = sorted(set(data) - {"system", "user"})
    if unknown:
        raise ConfigError(f"judge template {where}: unknown key(s) {unknown}; valid: system, user")
    both = data["user"] + str(data.get("system") or "")
    missing = [p for p in PLACEHOLDERS if p not in both]
    if missing:
        raise ConfigError(f"judge template {where}: missing placeholder(s) {', '.join(missing)}")
    return JudgeTemplate(where, str(data.get("system") or ""), data["user"])


def parse_verdict(text: str | None) -> str | None:
    """ "A", "B", "tie" or None (invalid) from a judge's answer — the rules in the module docstring."""
    if not text:
        return None
    tags = {_VERDICT[t.upper()] for t in _TAG.findall(text)}
    if len(tags) == 1:
        return tags.pop()
    if tags:
        return None
    bare = _BARE.match(text)
    return _VERDICT[bare.group(1).upper()] if bare else None
