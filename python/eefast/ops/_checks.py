"""Argument checks the fake kernels share (the C++ checks live in csrc/common/checks.h)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_same(name: str, t: torch.Tensor, x: torch.Tensor, op: str = "lora_linear") -> None:
    torch._check(
        t.dtype == x.dtype,
        lambda: (
            f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; all inputs must share one dtype"
        ),
    )
    torch._check(
        t.device == x.device,
        lambda: (
            f"{op}: {name} is on {t.device} but x is on {x.device}; "
            "all inputs must be on one device"
        ),
    )
