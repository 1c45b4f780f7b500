"""Self-distilled chat data: the model's own greedy replies to generated chat prompts.

Exits that draft for (or stand in for) the full model should predict what the full model
says, on the kind of text it generates. With no dataset hub, the data comes from the model
itself: prompts are built from request templates x topics (a fixed seed, disjoint from the
benchmark prompts in ``data.prompts.PROMPTS``), replies are full-depth greedy, and each row is
the chat-formatted conversation as ``text``, ready for ``eefast tune --data``. Writing is
resumable: rows are appended per batch and a rerun continues after the last one written.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tqdm.auto import tqdm

from ..hf.tokens import chat_prompt_ids, hf_greedy, pad_id

# Families of (request templates, topics): explanations and writing about general topics,
# programming how-tos and concepts, and practical how-tos, so the exits see the kinds of
# replies a chat model gives (prose, lists, code, steps).
# fmt: off
_GENERAL_REQUESTS = [
    "Explain {t} in simple terms.",
    "Give me three interesting facts about {t}.",
    "Write a short paragraph about {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "How would you teach {t} to a beginner?",
    "Write a haiku about {t}.",
    "List some common misconceptions about {t}.",
    "Why is {t} important?",
    "Write a short story that involves {t}.",
    "Compare {t} with something similar and explain the difference.",
    "What questions should I ask to learn more about {t}?",
    "Summarise the history of {t} in a few sentences.",
]
_GENERAL_TOPICS = [
    "black holes", "the water cycle", "machine learning", "the Roman Empire", "volcanoes",
    "recursion in programming", "healthy sleep habits", "climate change", "the stock market",
    "honey bees", "the internet", "electric cars", "the human heart", "chess openings",
    "baking bread", "public speaking", "the Moon landing", "vaccines", "jazz music",
    "the printing press", "renewable energy", "SQL databases", "meditation", "coral reefs",
    "the theory of evolution", "time management", "ancient Egypt", "quantum computing",
    "gardening tomatoes", "the French language", "learning to swim", "plate tectonics",
    "hash tables", "the Olympic Games", "coffee", "rainforests", "Shakespeare's plays",
    "budgeting money", "the immune system", "Git version control", "the solar system",
    "dinosaurs", "photography", "the Great Wall of China", "unit testing", "friendship",
    "running a marathon", "the periodic table", "origami", "Linux", "democracy",
    "the Renaissance", "penguins", "nuclear power", "writing a resume", "the human brain",
    "earthquakes", "sorting algorithms", "tea ceremonies", "mountain climbing",
]
_CODE_REQUESTS = [
    "How can I {t} in Python?",
    "Show me how to {t} in JavaScript.",
    "Write a Java method to {t}.",
    "What is the simplest way to {t} in C?",
    "Write a Python function to {t} and explain how it works.",
]
_CODE_TOPICS = [
    "sort a list of numbers", "read a text file line by line", "remove duplicates from a list",
    "merge two dictionaries", "parse a JSON string", "count the words in a sentence",
    "check whether a number is prime", "find the largest element of an array",
    "compute the factorial of a number", "check whether a word is a palindrome",
    "convert a string to uppercase", "sum the digits of an integer", "flatten a nested list",
    "find the average of a list", "generate the Fibonacci sequence", "swap two variables",
    "count how often each character appears", "check if two strings are anagrams",
    "find the second smallest number in a list", "split a sentence into words",
]
_CONCEPT_REQUESTS = [
    "What is {t} in programming? Show a short example.",
    "When should I use {t}? Give an example.",
    "Describe {t} to someone who is new to coding.",
]
_CONCEPT_TOPICS = [
    "a Python dictionary", "a lambda function", "a for loop", "a class", "an exception",
    "a generator", "a decorator", "a REST API", "a linked list", "a binary search",
    "a JavaScript promise", "an interface in Java", "a pointer in C", "a regular expression",
    "a stack", "a queue", "type hints in Python", "a closure", "a tuple", "async and await",
]
_HOWTO_REQUESTS = [
    "How do I make {t} at home?",
    "What are the steps to {t}?",
    "Give me some advice on how to {t}.",
]
_HOWTO_TOPICS = [
    "a tomato soup", "banana bread", "a vegetable stir fry", "fresh lemonade", "a fruit salad",
    "an omelette", "plan a weekly budget", "prepare for a job interview", "start running",
    "learn a new language", "write a cover letter", "keep houseplants alive",
    "organise a small party", "fall asleep faster", "take better notes", "clean a laptop",
    "save money on groceries", "train a puppy", "stay calm before an exam", "pack for a trip",
]
_FAMILIES = [
    (_GENERAL_REQUESTS, _GENERAL_TOPICS),
    (_CODE_REQUESTS, _CODE_TOPICS),
    (_CONCEPT_REQUESTS, _CONCEPT_TOPICS),
    (_HOWTO_REQUESTS, _HOWTO_TOPICS),
]
# fmt: on


def chat_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts (at most every family's requests x topics), in a seeded order."""
    prompts = [r.format(t=t) for requests, topics in _FAMILIES for r in requests for t in topics]
    if not 0 < n <= len(prompts):
        raise ValueError(f"chat_prompts: n must be in 1..{len(prompts)}, got {n}")
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def _rows_done(path: Path, prompts: list[str]) -> int:
    """How many of ``prompts`` the file already answers. The file must be this command's own
    output for this prompt list; anything else is refused and left exactly as it is. Only then
    is a torn last row (a crash mid-write) cut off."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    *lines, torn = data.split(b"\n")
    if len(lines) > len(prompts):
        raise ValueError(f"{path} has {len(lines)} rows, more than the {len(prompts)} asked for")
    for i, (line, prompt) in enumerate(zip(lines, prompts, strict=False)):
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict) or set(row) != {"prompt", "text"}:
            raise ValueError(
                f"{path}:{i + 1} is not a row of eefast distill-data, so the file is not its "
                "output; "
                "write to a new file (this one was not changed)"
            )
        if row["prompt"] != prompt:
            raise ValueError(
                f"{path}: row {i} answers {row['prompt']!r}, but this prompt list has {prompt!r} "
                "there; write to a new file instead (this one was not changed)"
            )
    if torn:
        if not torn.startswith(b'{"prompt": '):
            raise ValueError(
                f"{path} ends in a line that is not a row of eefast distill-data; write to a new "
                "file (this one was not changed)"
            )
        path.write_bytes(data[: len(data) - len(torn)])
    return len(lines)


def greedy_replies(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """HF ``generate`` greedy on a left-padded batch of chat prompts; the reply texts."""
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    new = hf_greedy(model, ids, pad_id(tokenizer), max_new_tokens)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def write_self_distilled(
    model,
    tokenizer,
    path: Path,
    n_prompts: int,
    max_new_tokens: int,
    batch_size: int = 8,
    replies=None,
) -> int:
    """Append the model's greedy replies to ``n_prompts`` chat prompts to ``path`` (jsonl:
    ``prompt`` and the chat-formatted conversation as ``text``); resumes after the rows
    already there. ``replies(model, tokenizer, prompts, max_new_tokens)`` writes them (the
    CLI passes eefast's own full-depth decoding, HF greedy by default). Returns the number
    of rows in the file."""
    path = Path(path)
    replies = replies or greedy_replies
    prompts = chat_prompts(n_prompts)
    done = _rows_done(path, prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(prompts), initial=done, desc="self-distill", unit="prompt")
    with path.open("a") as f:
        for start in range(done, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            lines = []
            for prompt, reply in zip(
                batch, replies(model, tokenizer, batch, max_new_tokens), strict=True
            ):
                convo = [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": reply},
                ]
                text = tokenizer.apply_chat_template(convo, tokenize=False)
                lines.append(json.dumps({"prompt": prompt, "text": text}) + "\n")
            f.write("".join(lines))
            f.flush()
            bar.update(len(batch))
    bar.close()
    return _rows_done(path, prompts)
