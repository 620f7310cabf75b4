"""Prompts for steering evaluations: a small built-in set, or the user's own from a file.

The built-in prompts are neutral and open-ended (AxBench-style): they favour no topic, so what a
steered model writes after them shows the steering, not the prompt. A prompts file holds one
prompt per line (blank lines skipped, each line stripped of surrounding whitespace), or, for a
`.jsonl` file, one JSON object per line with a "prompt" field (or a bare JSON string), used
exactly as written (a trailing space or newline is kept there).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from saeworks.sae.errors import SaeworksError

BUILTIN_PROMPTS: tuple[str, ...] = (
    "Here is a short story about",
    "My favourite thing to do on weekends is",
    "The most interesting thing I learned today is",
    "When I opened the door, I saw",
    "Let me tell you about",
    "The best advice I ever got was",
    "In the morning, I usually",
    "Yesterday, my friend told me that",
    "The first thing you should know is",
    "I have always wondered why",
    "Once upon a time, there was",
    "Here are a few thoughts on",
)
"""Twelve neutral, open-ended beginnings of text."""


class PromptsError(SaeworksError, ValueError):
    """A prompts file or list that cannot be used."""


def check_prompts(prompts: Sequence[str], where: str = "the prompts") -> tuple[str, ...]:
    """The prompts as a tuple; refuse an empty list and blank prompts."""
    if isinstance(prompts, str):
        raise PromptsError(f"{where}: give a list of prompts, not one string")
    found = tuple(prompts)
    if not found:
        raise PromptsError(f"{where}: no prompts; give at least one")
    blank = [i for i, p in enumerate(found) if not isinstance(p, str) or not p.strip()]
    if blank:
        raise PromptsError(f"{where}: prompt {blank[0]} is blank or not text; every prompt needs some text")
    return found


def load_prompts(path: str | Path) -> tuple[str, ...]:
    """Read prompts from `path`: one per line, or a .jsonl file with a "prompt" field per line."""
    path = Path(path)
    if not path.is_file():
        raise PromptsError(f"no prompts file at {str(path)!r}; give a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PromptsError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from None
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if path.suffix.lower() == ".jsonl":
        prompts = tuple(_jsonl_prompt(path, n, line) for n, line in numbered)
    else:
        prompts = tuple(line.strip() for _, line in numbered)
    if not prompts:
        raise PromptsError(f"{path} holds no prompts (every line is blank); write one prompt per line")
    return check_prompts(prompts, str(path))


def _jsonl_prompt(path: Path, n: int, line: str) -> str:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptsError(f"{path} line {n} is not JSON ({err.msg}); write one JSON object with a "
                           "\"prompt\" field per line") from None
    if isinstance(value, dict):
        value = value.get("prompt")
    if not isinstance(value, str) or not value.strip():
        raise PromptsError(f"{path} line {n} has no \"prompt\" text; write {{\"prompt\": \"...\"}}")
    return value
