"""What every `eefast` command module shares: progress lines and argument types that refuse a
bad value at parse time, naming the argument (argparse prints one line and exits with 2)."""

from __future__ import annotations

import argparse
import math
import os

import torch


def say(msg: str) -> None:
    """A progress line; under torchrun, from rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[eefast] {msg}", flush=True)


def _number(text: str, cast, what: str, ok) -> int | float:
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "an integer >= 1", lambda v: v >= 1)


def count(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def finite(text: str) -> float:
    return _number(text, float, "a finite number", math.isfinite)


def nonnegative(text: str) -> float:
    return _number(text, float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


def positive(text: str) -> float:
    return _number(text, float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def probability(text: str) -> float:
    return _number(text, float, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated floats, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_model_arguments(p: argparse.ArgumentParser, default: str) -> None:
    """--model, and the device and dtype to run it in."""
    p.add_argument("--model", default=default, help="HF id or path (default: SmolLM2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    """--weights, for commands that decode."""
    p.add_argument(
        "--weights",
        choices=("fp32", "bf16", "int8", "q4"),
        default=None,
        help="the backbone's weights: as --dtype (default); int8: the blocks' linears int8 "
        "(GGUF Q8_0 blocks on the CPU; about a quarter of the bytes per decoded token); q4: "
        "GGUF Q4_1 blocks, for the default model its shipped GGUF's own (CPU only)",
    )


def load(args: argparse.Namespace):
    """(model, tokenizer) as --model, --device, --dtype and --weights say."""
    from ..hf import load_model

    return load_model(args.model, DTYPES[args.dtype], args.device, getattr(args, "weights", None))


def add_timeout_argument(p) -> None:
    from ..distributed import DEFAULT_TIMEOUT_S

    p.add_argument("--dist-timeout", type=positive, default=DEFAULT_TIMEOUT_S,
                   help="seconds a rank waits for another before it fails (a dead or hung "
                   "rank)")  # fmt: skip


def resolve_model_path_once(name: str | None, parallel) -> str:
    """The model's local path; rank 0 builds the default model's cache first, alone."""
    from ..hf.loading import resolve_model_path

    if parallel.is_writer:
        resolve_model_path(name)
    parallel.barrier()
    return resolve_model_path(name)
