"""Prompt files: versioned text under poise/agents/prompts/, rendered with named fields.

A prompt file starts with a header naming it and its version, then the text with `{{field}}` slots:

    ---
    prompt: propose
    version: 1
    ---
    You propose ... {{parent}} ...

Change the version whenever the text changes meaning: a node's CallRecords name the prompt and version that
produced its answer, so archives from different prompt versions stay comparable. Rendering refuses a
missing or an unexpected field, so a prompt and its caller cannot drift apart silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_HEADER = re.compile(r"\A---\nprompt: (?P<name>[a-z_]+)\nversion: (?P<version>\d+)\n---\n", re.MULTILINE)
_SLOT = re.compile(r"\{\{\s*(?P<field>[a-z_][a-z0-9_]*)\s*\}\}")


class PromptError(ValueError):
    """A prompt file that is malformed, or a render call that does not match its slots."""


@dataclass(frozen=True)
class Prompt:
    name: str
    version: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(m["field"] for m in _SLOT.finditer(self.text))

    def render(self, **values: object) -> str:
        """The text with every slot filled; PromptError names missing and unexpected fields."""
        missing = self.fields - values.keys()
        unexpected = values.keys() - self.fields
        if missing or unexpected:
            raise PromptError(f"prompt {self.id}: missing fields {sorted(missing)}, unexpected {sorted(unexpected)}")
        return _SLOT.sub(lambda m: str(values[m["field"]]), self.text)


@cache
def load_prompt(name: str) -> Prompt:
    """The prompt `name` from poise/agents/prompts/<name>.md."""
    try:
        raw = resources.files("poise.agents").joinpath("prompts", f"{name}.md").read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise PromptError(f"no prompt file {name}.md in poise/agents/prompts") from err
    header = _HEADER.match(raw)
    if header is None or header["name"] != name:
        raise PromptError(f"prompts/{name}.md must start with '---\\nprompt: {name}\\nversion: N\\n---'")
    return Prompt(name=name, version=int(header["version"]), text=raw[header.end():].strip() + "\n")
