"""The bundled prompt sets (code, math, chat): short chat requests we wrote ourselves, one JSON a line."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
PROMPT_SETS = ("code", "math", "chat")


@dataclass(frozen=True)
class Prompt:
    id: str
    set: str
    messages: list[dict[str, str]]


def load_prompts(names: list[str] | tuple[str, ...] = PROMPT_SETS) -> list[Prompt]:
    """Prompts of the named sets; an unknown name is an error, not an empty load test."""
    prompts = []
    for name in names:
        if name not in PROMPT_SETS:
            raise ValueError(f"unknown prompt set {name!r}; choose from {', '.join(PROMPT_SETS)}")
        for line in (PROMPT_DIR / f"{name}.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                prompts.append(Prompt(id=row["id"], set=name, messages=row["messages"]))
    return prompts


class PromptPicker:
    """Random prompts with a seed per user, so runs are repeatable yet users differ."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        if not prompts:
            raise ValueError("no prompts to send")
        self._prompts = prompts
        self._rng = random.Random(seed)

    def next(self) -> Prompt:
        return self._rng.choice(self._prompts)
