"""Early exits on a frozen Hugging Face causal LM: attach them (model.py) and save or load
them (files.py)."""

from .files import (
    CLASSIFIER_FILE,
    DRAFT_VOCAB_FILE,
    check_fingerprint,
    exits_config,
    load_exits,
    model_fingerprint,
    save_classifier,
    save_draft_vocab,
    save_exits,
)
from .model import BackboneStates, EarlyExitModel, add_exits

__all__ = [
    "CLASSIFIER_FILE",
    "DRAFT_VOCAB_FILE",
    "BackboneStates",
    "EarlyExitModel",
    "add_exits",
    "check_fingerprint",
    "exits_config",
    "load_exits",
    "model_fingerprint",
    "save_classifier",
    "save_draft_vocab",
    "save_exits",
]
