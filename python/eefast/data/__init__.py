"""Data: corpora cut into token blocks (corpus.py), instruction rows and their batches
(rows.py), the shipped arithmetic task (arith.py), self-distilled chat data (chat.py) and the
built-in chat prompts (prompts.py)."""

from .corpus import (
    CHAT_CORPUS,
    DEFAULT_CORPUS,
    IGNORE,
    load_documents,
    next_token_targets,
    split_blocks,
    token_blocks,
)
from .prompts import PROMPTS
from .rows import TASK, Example, collate, load_rows, tokenize_rows

__all__ = [
    "CHAT_CORPUS",
    "DEFAULT_CORPUS",
    "IGNORE",
    "PROMPTS",
    "TASK",
    "Example",
    "collate",
    "load_documents",
    "load_rows",
    "next_token_targets",
    "split_blocks",
    "token_blocks",
    "tokenize_rows",
]
