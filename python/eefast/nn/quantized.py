"""Int8Linear: a frozen linear layer with weight-only int8 weights (one float32 scale per
output row), for a decoding backbone that reads a quarter of float32's bytes per token."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import decode_linear_q8, quantize_rows


class Int8Linear(nn.Module):
    """``y = x (scales[:, None] * qweight)^T + bias`` through ``decode_linear_q8``: few rows
    (decode steps) stream the int8 weight; many rows (a prefill, a tuning forward) dequantise
    it for a GEMM. Frozen: the weight has no gradient (x and the output do)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Module) -> Int8Linear:
        """From an ``nn.Linear``, or a transformers ``Conv1D`` (GPT-2's, weight [in, out])."""
        weight = linear.weight.t() if type(linear).__name__ == "Conv1D" else linear.weight
        q, s = quantize_rows(weight)
        return cls(q, s.to(weight.device), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return decode_linear_q8(x, self.qweight, self.scales, bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scales[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
