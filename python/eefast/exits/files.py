"""Exits on disk: ``exits.safetensors`` + ``exits.json`` (only the exits, never the base
model), and the exit classifier and draft vocabulary saved beside them. Every write is atomic;
a checkpoint written for another base model is refused by its fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..hf.arch import decoder_parts
from ..io import read_json, reading, write_json, write_safetensors
from ..nn.exit_classifier import ExitClassifier
from .model import EarlyExitModel, add_exits

EXITS_FORMAT = "eefast-exits/1"
CLASSIFIER_FILE = "classifier.safetensors"
DRAFT_VOCAB_FILE = "draft_vocab.safetensors"


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies a base model for an exits checkpoint: shapes and a weight checksum."""
    parts = decoder_parts(model)
    cfg = model.config
    head = parts.lm_head.weight.detach()
    return {
        "model_type": cfg.model_type,
        "num_layers": len(parts.layers),
        "hidden_size": head.shape[1],
        "vocab_size": head.shape[0],
        "weight_checksum": float(head[:64].double().abs().sum()),
    }


def exits_config(ee: EarlyExitModel) -> dict:
    return {
        "format": EXITS_FORMAT,
        "layers": ee.exit_layers,
        "kind": ee.kind,
        "share_lm_head": ee.shares_lm_head,
        "base_model": getattr(ee.model.config, "_name_or_path", ""),
        "fingerprint": model_fingerprint(ee.model),
    }


def save_exits(ee: EarlyExitModel, directory) -> None:
    """Write only the exits (``exits.safetensors`` + ``exits.json``), atomically. An exit
    classifier fitted to earlier exits there is removed: it no longer describes them."""
    write_exits(directory, ee.exits.state_dict(), exits_config(ee))


def write_exits(directory, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """`save_exits` from the pieces: what a pipeline's rank 0 writes for all its stages."""
    directory = Path(directory)
    write_safetensors(directory / "exits.safetensors", tensors)
    write_json(directory / "exits.json", config)
    (directory / CLASSIFIER_FILE).unlink(missing_ok=True)


def save_classifier(ee: EarlyExitModel, directory) -> None:
    """Write ``ee.classifier`` beside the exits (``classifier.safetensors``), atomically."""
    if ee.classifier is None:
        raise ValueError("save_classifier: this model has no exit classifier")
    meta = {"layers": json.dumps(ee.classifier.layers)}
    write_safetensors(Path(directory) / CLASSIFIER_FILE, ee.classifier.state_dict(), meta)


def _load_classifier(ee: EarlyExitModel, path: Path) -> None:
    with reading(path), safe_open(path, "pt") as f:
        layers = json.loads(f.metadata()["layers"])
    if layers != ee.exit_layers:
        raise ValueError(f"{path} is for exits {layers}, these are at {ee.exit_layers}")
    clf = ExitClassifier(layers, ee.parts.final_norm.weight.shape[0])
    with reading(path):
        clf.load_state_dict(load_file(path), strict=True)
    ee.classifier = clf.to(ee.model.device).requires_grad_(False)


def save_draft_vocab(directory, ids: torch.Tensor, coverage: float) -> None:
    """Write a draft vocabulary (sorted token ids) beside the exits, atomically. It depends on
    the tokenizer and the data, not on the exits' weights, so re-tuning keeps it."""
    meta = {"coverage": f"{coverage:.6f}"}
    write_safetensors(Path(directory) / DRAFT_VOCAB_FILE, {"ids": ids.long().contiguous()}, meta)


def _load_draft_vocab(ee: EarlyExitModel, path: Path) -> None:
    with reading(path):
        ids = load_file(path)["ids"]
    vocab = ee.parts.lm_head.weight.shape[0]
    if ids.dim() != 1 or not len(ids) or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"{path} holds token ids outside this model's vocabulary of {vocab}")
    ee.draft_vocab = ids.to(ee.model.device)


def check_fingerprint(saved: dict, model: nn.Module, what: str) -> None:
    """Refuse a checkpoint written for another base model."""
    here = model_fingerprint(model)
    for key, value in saved.items():
        mine = here.get(key)
        same = (
            abs(mine - value) <= 1e-4 * max(1.0, abs(value))
            if key == "weight_checksum"
            else (mine == value)
        )
        if not same:
            raise ValueError(
                f"{what} was written for another model: its {key} is {value!r}, this model's "
                f"is {mine!r}"
            )


def load_exits(model: nn.Module, directory) -> EarlyExitModel:
    """Attach exits saved by `save_exits` to an unchanged base model (and their exit
    classifier and draft vocabulary, when they were saved beside them)."""
    directory = Path(directory)
    cfg_path = directory / "exits.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"load_exits: no exits.json in {directory}")
    cfg = read_json(cfg_path)
    if cfg.get("format") != EXITS_FORMAT:
        raise ValueError(f"load_exits: {cfg_path} is not an {EXITS_FORMAT} file")
    with reading(cfg_path):
        layers, kind, share = cfg["layers"], cfg["kind"], cfg["share_lm_head"]
        fingerprint = cfg["fingerprint"]
        missing = sorted(set(model_fingerprint(model)) - set(fingerprint))
        if missing:
            raise KeyError(f"its fingerprint lacks {missing}")
    check_fingerprint(fingerprint, model, f"exits checkpoint {directory}")
    ee = add_exits(model, layers, kind, share_lm_head=share)
    weights = directory / "exits.safetensors"
    with reading(weights):
        ee.exits.load_state_dict(load_file(weights, device=str(model.device)), strict=True)
    if (directory / CLASSIFIER_FILE).exists():
        _load_classifier(ee, directory / CLASSIFIER_FILE)
    if (directory / DRAFT_VOCAB_FILE).exists():
        _load_draft_vocab(ee, directory / DRAFT_VOCAB_FILE)
    return ee
