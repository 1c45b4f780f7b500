"""Chat prompts for the demo, calibration and the generation benchmark: the built-in ones
(disjoint from the self-distilled training prompts of chat.py), or a user's own file."""

from __future__ import annotations

from pathlib import Path

from .corpus import json_row, read_text, string_fields

# Chat prompts on mixed topics for calibration and benchmarks.
PROMPTS = [
    "Explain what a Python list comprehension is, with an example.",
    "Write a short poem about the sea at night.",
    "What are three tips for staying focused while studying?",
    "Summarise the causes of the French Revolution in a few sentences.",
    "How do I reverse a string in JavaScript?",
    "Describe how photosynthesis works to a ten-year-old.",
    "Give me a simple recipe for pancakes.",
    "What is the difference between a virus and a bacterium?",
]


def load_prompts(path: str | Path) -> list[str]:
    """A user's prompts: one per line of a text file, or a .jsonl whose rows hold ``prompt``
    (or ``instruction``, with ``input`` appended when present). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path}: no such file")
    prompts = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        row = json_row(line, path, n)
        string_fields(row, ("prompt", "instruction", "input"), f"{path}:{n}")
        if "prompt" in row:
            prompts.append(row["prompt"])
        elif "instruction" in row:
            extra = row.get("input") or ""
            prompts.append(f"{row['instruction']}\n\n{extra}" if extra else row["instruction"])
        else:
            raise ValueError(f"{path}:{n}: expected a 'prompt' or 'instruction' field")
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt")
    return prompts
