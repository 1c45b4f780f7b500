"""Int8Linear: a frozen linear layer with weight-only int8 weights (one float32 scale per
output row), for a decoding backbone that reads a quarter of float32's bytes per token."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import decode_linear_q8, quantize_rows
from .replace import replace_module


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


def float_copy(module: nn.Module) -> nn.Module:
    """A trainable copy of a backbone module: an int8 backbone's ``Int8Linear`` layers come
    back as float ``nn.Linear`` layers holding their dequantised weights, and an LM head's
    int8 copy is dropped (exits stay in full precision)."""
    module = copy.deepcopy(module)
    if isinstance(module, Int8Linear):
        return _as_float_linear(module)
    for m in module.modules():
        if isinstance(m, nn.Linear):  # an LM head's int8 copy (hf.quantize_backbone)
            m._buffers.pop("qweight", None)
            m._buffers.pop("scales", None)
    int8 = [(n, m) for n, m in module.named_modules() if isinstance(m, Int8Linear)]
    for name, m in int8:
        replace_module(module, name, _as_float_linear(m))
    return module


def _as_float_linear(m: Int8Linear) -> nn.Linear:
    weight = m.dequantized()
    linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                       device=weight.device, dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(weight)
        if m.bias is not None:
            linear.bias.copy_(m.bias)
    return linear
