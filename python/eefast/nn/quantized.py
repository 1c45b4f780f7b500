"""QuantizedLinear: a frozen linear layer with low-bit weights, for a decoding backbone that
reads a quarter (int8) or about a sixth (GGUF Q4) of float32's bytes per token.

Two weight formats, told apart by the buffers:
- ``int8``: weight-only int8, one float32 scale per output row (``qweight`` int8 [out, in],
  ``scales`` [out]); ``decode_linear_q8``.
- GGUF blocks (``q4_0``, ``q4_1``, ``q8_0``): ``qweight`` packed uint8 [out, in / 32, block
  bytes], read from a GGUF file or quantised like llama.cpp; ``decode_linear_gguf``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import (
    decode_linear_gguf,
    decode_linear_q8,
    dequantize_gguf,
    gguf_type,
    quantize_gguf,
    quantize_rows,
)
from .replace import replace_module

KINDS = ("int8", "q4_0", "q4_1", "q8_0")


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor | None,
                     bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """``x W^T + bias`` for either format (``scales`` only with int8)."""
    if scales is not None:
        return decode_linear_q8(x, qweight, scales, bias)
    return decode_linear_gguf(x, qweight, bias)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """The float32 weight either format holds."""
    if scales is not None:
        return qweight.float() * scales[:, None]
    return dequantize_gguf(qweight)


def quantize(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(qweight, scales or None) of a float [out, in] weight in format ``kind``."""
    if kind == "int8":
        q, s = quantize_rows(weight)
        return q, s.to(weight.device)
    if kind not in KINDS:
        raise ValueError(f"quantize: kind must be one of {KINDS}, got {kind!r}")
    return quantize_gguf(weight, kind), None


class QuantizedLinear(nn.Module):
    """``y = x W^T + bias`` with W low-bit (see the module docstring): few rows (decode steps)
    stream the low-bit weight; many rows (a prefill, a tuning forward) dequantise it for a
    GEMM. Frozen: the weight has no gradient (x and the output do)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor | None,
                 bias: torch.Tensor | None):  # fmt: skip
        super().__init__()
        self.kind = "int8" if scales is not None else gguf_type(qweight)
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * (1 if scales is not None else 32)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Module, kind: str = "int8") -> QuantizedLinear:
        """From an ``nn.Linear``, or a transformers ``Conv1D`` (GPT-2's, weight [in, out])."""
        weight = linear.weight.t() if type(linear).__name__ == "Conv1D" else linear.weight
        return cls(*quantize(weight, kind), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return quantized_linear(x, self.qweight, self.scales, bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def float_copy(module: nn.Module) -> nn.Module:
    """A trainable copy of a backbone module: a low-bit backbone's ``QuantizedLinear`` layers
    come back as float ``nn.Linear`` layers holding their dequantised weights, and an LM
    head's low-bit copy is dropped (exits stay in full precision)."""
    module = copy.deepcopy(module)
    if isinstance(module, QuantizedLinear):
        return _as_float_linear(module)
    for m in module.modules():
        if isinstance(m, nn.Linear):  # an LM head's low-bit copy (hf.quantize_backbone)
            m._buffers.pop("qweight", None)
            m._buffers.pop("scales", None)
    low_bit = [(n, m) for n, m in module.named_modules() if isinstance(m, QuantizedLinear)]
    for name, m in low_bit:
        replace_module(module, name, _as_float_linear(m))
    return module


def _as_float_linear(m: QuantizedLinear) -> nn.Linear:
    weight = m.dequantized()
    linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                       device=weight.device, dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(weight)
        if m.bias is not None:
            linear.bias.copy_(m.bias)
    return linear
