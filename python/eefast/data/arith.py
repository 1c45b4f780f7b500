"""A small synthetic arithmetic word-problem task, in the style of MultiArith and AddSub.

Problems come from templates with a fixed seed, so the train and test splits are reproducible
(and ship as jsonl next to this file: ``python -m eefast.data.arith`` rewrites them). Each row
has ``instruction`` (the problem), ``input`` (empty) and ``output`` (the equation and "The
answer is N."). Evaluation extracts the last number of a reply, as LLM-Adapters does.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

DATA_DIR = Path(__file__).parent
SPLITS = {"train": (2000, 1234), "test": (200, 5678)}  # rows, seed

_NAMES = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Nina", "Jack", "Lena"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.choice(["add", "sub", "mul", "div", "add_sub"])
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        q = (
            f"{name} has {a} {item}. Then {name} gets {b} more {item}. "
            f"How many {item} does {name} have now?"
        )
        return q, f"{a} + {b} = {a + b}.", a + b
    if kind == "sub":
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        q = (
            f"{name} had {a} {item} and gave {b} of them to a friend. "
            f"How many {item} does {name} have left?"
        )
        return q, f"{a} - {b} = {a - b}.", a - b
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = (
            f"{name} has {a} boxes with {b} {item} in each box. "
            f"How many {item} does {name} have in total?"
        )
        return q, f"{a} * {b} = {a * b}.", a * b
    if kind == "div":
        b, each = rng.randint(2, 9), rng.randint(2, 12)
        q = (
            f"{name} shares {b * each} {item} equally among {b} friends. "
            f"How many {item} does each friend get?"
        )
        return q, f"{b * each} / {b} = {each}.", each
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    q = (
        f"{name} had {a} {item}. {name} bought {b} more and then lost {c}. "
        f"How many {item} does {name} have now?"
    )
    return q, f"{a} + {b} - {c} = {a + b - c}.", a + b - c


def generate(split: str) -> list[dict]:
    """The rows of a split; the test split holds no problem that is also in train."""
    rows, seed = SPLITS[split]
    rng = random.Random(seed)
    exclude = {r["instruction"] for r in generate("train")} if split == "test" else set()
    out, seen = [], set(exclude)
    while len(out) < rows:
        question, work, answer = _problem(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append(
            {
                "instruction": question,
                "input": "",
                "output": f"{work} The answer is {answer}.",
                "answer": answer,
            }
        )
    return out


def split_path(split: str) -> Path:
    return DATA_DIR / f"arith_{split}.jsonl"


def load_split(split: str) -> list[dict]:
    path = split_path(split)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in a reply (commas in numbers ignored), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        rows = generate(split)
        split_path(split).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {split_path(split)}")


if __name__ == "__main__":
    main()
