"""A low-bit frozen backbone for decoding: ``quantize_backbone(model, "int8")``.

Every ``nn.Linear`` (and GPT-2's ``Conv1D``) inside the decoder blocks becomes an
``Int8Linear`` (weight-only int8, one scale per output row). The LM head keeps its float
weight, which exits copy or share ("exits stay in full precision"), and gains an int8 copy
(non-persistent buffers ``qweight`` and ``scales``) that generation's final logits read.
Embeddings, norms and exits are untouched. The prefill and EE-Tuning's backbone forward
dequantise per linear (they are GEMM-bound).
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..nn.quantized import Int8Linear
from ..nn.replace import replace_module
from ..ops import quantize_rows
from .arch import decoder_parts

WEIGHTS = ("fp32", "bf16", "int8")


def quantize_backbone(model: nn.Module, weights: str = "int8") -> nn.Module:
    """Quantise ``model``'s decoder blocks in place (see the module docstring); returns it."""
    if weights != "int8":
        raise ValueError(f"quantize_backbone: weights must be 'int8', got {weights!r}")
    parts = decoder_parts(model)
    if any(isinstance(m, Int8Linear) for m in parts.layers.modules()):
        raise ValueError("quantize_backbone: this model's blocks are already int8")
    for block in parts.layers:
        targets = [(name, m) for name, m in block.named_modules()
                   if type(m) in (nn.Linear, Conv1D)]  # fmt: skip
        for name, linear in targets:
            replace_module(block, name, Int8Linear.from_linear(linear))
    head = parts.lm_head
    q, s = quantize_rows(head.weight)
    head.register_buffer("qweight", q, persistent=False)
    head.register_buffer("scales", s.to(head.weight.device), persistent=False)
    return model
