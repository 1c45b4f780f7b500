"""Frozen float32 linears of a model's own modules through eefast's GEMM, without grad.

A frozen backbone's forward (EE-Tuning's first pass, hidden-state caches, evaluation) runs the
model's HF modules, whose ``nn.Linear`` calls ATen's MKL sgemm. On the AMD CPUs measured, the
oneDNN GEMM that ``decode_linear`` uses for many rows ran 2-2.7x faster. Inside
``frozen_linears()``, every ``F.linear`` on CPU float32 tensors with grad disabled goes to
``decode_linear``; anything else runs as it would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..ops.decode import decode_linear


class frozen_linears(TorchFunctionMode):  # noqa: N801 (used as a context manager)
    """``with frozen_linears(): model(...)`` under ``torch.no_grad()``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled():
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                x.device.type == "cpu"
                and x.dtype == torch.float32
                and weight.dtype == torch.float32
                and weight.dim() == 2
                and (bias is None or bias.dtype == torch.float32)
            ):
                return decode_linear(x, weight, bias)
        return func(*args, **kwargs)
