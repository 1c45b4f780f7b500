"""Model surgery on Hugging Face causal LMs: per-architecture maps and early exits."""

from .arch import ARCHS, decoder_parts
from .exits import (
    DRAFT_VOCAB_FILE,
    EarlyExitModel,
    add_exits,
    load_exits,
    save_classifier,
    save_draft_vocab,
    save_exits,
)
from .loading import load_model

__all__ = [
    "ARCHS",
    "EarlyExitModel",
    "add_exits",
    "decoder_parts",
    "load_exits",
    "load_model",
    "save_classifier",
    "save_draft_vocab",
    "DRAFT_VOCAB_FILE",
    "save_exits",
]
