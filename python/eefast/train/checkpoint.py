"""Resumable training checkpoints: step-stamped directories plus an atomically updated pointer.

A checkpoint directory is written in full before ``latest.json`` names it, so a crash at any
moment leaves the previous checkpoint intact. Optimizer tensors go to safetensors, everything
else (step, metrics, param groups) to JSON.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io import read_json, reading, write_json, write_safetensors


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    """Load what `save_checkpoint` wrote for the optimizer back into it."""
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    root: Path, step: int, modules_state: dict, optimizer, info: dict, keep: int = 1
) -> Path:
    """Write ``root/step-XXXXXXX`` (module tensors, optimizer, info) and point latest.json at it."""
    root = Path(root)
    directory = root / f"step-{step:07d}"
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    write_safetensors(directory / "model.safetensors", modules_state)
    write_safetensors(directory / "optimizer.safetensors", opt_tensors)
    write_json(directory / "state.json", {"step": step, "optimizer": opt_meta, **info})
    write_json(root / "latest.json", {"directory": directory.name, "step": step})
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p != directory)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return directory


def load_checkpoint(root: Path) -> tuple[dict, dict, dict, dict] | None:
    """(module tensors, optimizer tensors, optimizer meta, state) of the latest checkpoint."""
    pointer = Path(root) / "latest.json"
    if not pointer.is_file():
        return None
    latest = read_json(pointer)
    with reading(pointer):
        name, step = latest["directory"], latest["step"]
        if not re.fullmatch(r"step-\d{7}", str(name)) or name != f"step-{step:07d}":
            raise ValueError(f"it names {name!r} at step {step!r}, not a checkpoint of this run")
    directory = Path(root) / name
    state = read_json(directory / "state.json")
    with reading(directory / "state.json"):
        if state["step"] != step:
            raise ValueError(f"step {state['step']} where latest.json says {step}")
        meta = state.pop("optimizer")
    tensors = []
    for file in ("model.safetensors", "optimizer.safetensors"):
        with reading(directory / file):
            tensors.append(load_file(directory / file))
    return tensors[0], tensors[1], meta, state
