"""Argument checks of the fake kernels. They state the same rules as the C++ checks
(csrc/common/checks.h and csrc/<op>/<op>.h), so that tracing refuses exactly what the kernels
refuse; tests/test_op_fuzz.py holds the two to that, case by case."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DTYPES = (torch.float32, torch.bfloat16)  # LM-head weights


def check(cond, op: str, msg: str) -> None:
    torch._check(cond, lambda: f"{op}: {msg}")


def check_same(name: str, t: torch.Tensor, x: torch.Tensor, op: str = "lora_linear") -> None:
    torch._check(
        t.dtype == x.dtype,
        lambda: (
            f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; all inputs must share one dtype"
        ),
    )
    check_device(op, name, t, x)


def check_device(op: str, name: str, t: torch.Tensor | None, ref: torch.Tensor) -> None:
    """One device for every tensor argument. A tensor on another device (the meta device
    included) would otherwise send the call to the wrong kernel."""
    if t is not None:
        torch._check(
            t.device == ref.device,
            lambda: (
                f"{op}: {name} is on {t.device} but the inputs are on {ref.device}; "
                "all inputs must be on one device"
            ),
        )


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes) -> None:
    torch._check(t.dtype in dtypes, lambda: f"{op}: {name} dtype {t.dtype} is not one of {dtypes}")


def check_finite(op: str, name: str, value: float) -> None:
    torch._check(math.isfinite(value), lambda: f"{op}: {name} must be finite, got {value}")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, last]``; ``reshape(-1, last)`` cannot infer rows when last is 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
