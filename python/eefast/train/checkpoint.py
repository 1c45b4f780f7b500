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


def optimizer_state(optimizer, params: dict[str, torch.nn.Parameter]) -> tuple[dict, dict]:
    """(tensors, scalars) of the optimizer's per-parameter state, keyed
    ``<parameter name>.<state key>``: by name, so a run resumes onto another layout (a
    pipeline stage reads back only its own parameters' state)."""
    tensors, scalars = {}, {}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            (tensors if torch.is_tensor(value) else scalars)[f"{name}.{key}"] = value
    return tensors, scalars


def optimizer_meta(optimizer, scalars: dict) -> dict:
    """What the optimizer's JSON keeps: its hyper-parameters and the non-tensor state."""
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return {"param_groups": [group], "scalars": scalars}


def restore_optimizer(optimizer, params: dict[str, torch.nn.Parameter], tensors: dict,
                      meta: dict) -> None:  # fmt: skip
    """Load the state `optimizer_state` saved for ``params`` (name -> parameter, in the
    optimizer's order) back into the optimizer; other parameters' state is ignored.
    Checkpoints from before the state was keyed by name used the parameter's index."""
    order = list(params)
    index = {name: i for i, name in enumerate(order)}
    state: dict[int, dict] = {}
    for full, value in [*tensors.items(), *meta["scalars"].items()]:
        name, key = full.rsplit(".", 1)
        i = index.get(name, int(name) if name.isdigit() else None)
        if i is not None:
            state.setdefault(i, {})[key] = value
    group = {k: v for k, v in meta["param_groups"][0].items() if k != "params"}
    group["params"] = list(range(len(order)))
    optimizer.load_state_dict({"state": state, "param_groups": [group]})


def save_checkpoint(
    root: Path,
    step: int,
    modules_state: dict,
    opt_tensors: dict,
    opt_meta: dict,
    info: dict,
    keep: int = 1,
) -> Path:
    """Write ``root/step-XXXXXXX`` (module tensors, optimizer, info) and point latest.json at it."""
    root = Path(root)
    directory = root / f"step-{step:07d}"
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
