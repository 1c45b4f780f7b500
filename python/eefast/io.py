"""Files: atomic writes (a reader never sees a half-written checkpoint), and reads whose
failures name the file."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _atomic(path, write)


def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


@contextmanager
def reading(path: Path):
    """Turns any failure to parse ``path`` inside the block (bad JSON, a truncated safetensors
    file, missing keys, tensors that do not fit) into one ValueError naming the file. A
    missing file stays a FileNotFoundError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as e:
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"{path} is damaged or not what eefast wrote there: {detail}") from e


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` (an error naming the file otherwise)."""
    with reading(path):
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise TypeError("expected a JSON object")
        return data
