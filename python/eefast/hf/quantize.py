"""A low-bit frozen backbone for decoding: ``quantize_backbone(model, "int8" | "q4")``.

Every ``nn.Linear`` (and GPT-2's ``Conv1D``) inside the decoder blocks becomes a
``QuantizedLinear`` (``formats`` says which format):
- ``int8``: GGUF Q8_0 blocks (groups of 32 int8 weights with an fp16 scale), multiplied with
  llama.cpp's int8 arithmetic, on the CPU where every block linear's input width is a
  multiple of 32; otherwise (CUDA, other widths) weight-only int8 with one scale per output
  row, whose kernel keeps float activations but converts every weight (1.3x slower here);
- ``q4``: GGUF Q4_1 blocks (groups of 32 with a scale and a min), llama.cpp's format. With
  ``gguf=path`` the blocks are read straight from that file (so the model is bit for bit the
  one the file describes); otherwise the float weights are quantised as llama.cpp would.

The LM head keeps its float weight, which exits copy or share ("exits stay in full
precision"), and gains a low-bit copy (non-persistent buffers ``qweight`` and ``scales``) that
generation's final logits read, Q8_0 blocks (for ``q4`` the file's own head where it has one)
or int8 rows. Embeddings, norms and exits are untouched. The prefill and EE-Tuning's
backbone forward dequantise per linear (they are GEMM-bound).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..nn.quantized import QuantizedLinear, quantize
from ..nn.replace import replace_module
from ..ops import pack_gguf
from .arch import decoder_parts

WEIGHTS = ("fp32", "bf16", "int8", "q4")


def formats(model: nn.Module, weights: str) -> tuple[str, str]:
    """(the decoder blocks' format, the LM head copy's) for ``weights`` ("int8" or "q4") on
    ``model`` (a QuantizedLinear kind: "q4_1", "q8_0" or "int8"; see the module docstring)."""
    if weights == "q4":
        return "q4_1", "q8_0"
    parts = decoder_parts(model)
    widths = [_in_features(m) for m in parts.layers.modules() if type(m) in (nn.Linear, Conv1D)]
    on_cpu = parts.lm_head.weight.device.type == "cpu"
    if on_cpu and all(n % 32 == 0 for n in [*widths, parts.lm_head.weight.shape[1]]):
        return "q8_0", "q8_0"
    return "int8", "int8"


def quantize_backbone(model: nn.Module, weights: str = "int8", gguf: str | Path | None = None
                      ) -> nn.Module:  # fmt: skip
    """Make ``model``'s decoder blocks low-bit in place (see the module docstring); returns
    it. ``gguf``: for ``q4``, a llama GGUF file of this model to read the blocks from."""
    if weights not in ("int8", "q4"):
        raise ValueError(f"quantize_backbone: weights must be 'int8' or 'q4', got {weights!r}")
    if gguf is not None and weights != "q4":
        raise ValueError("quantize_backbone: a GGUF file is read only for weights='q4'")
    parts = decoder_parts(model)
    if any(isinstance(m, QuantizedLinear) for m in parts.layers.modules()):
        raise ValueError("quantize_backbone: this model's blocks are already low-bit")
    if weights == "q4" and parts.lm_head.weight.device.type != "cpu":
        device = parts.lm_head.weight.device
        raise ValueError(f"quantize_backbone: q4 (GGUF blocks) runs on CPU only for now; on "
                         f"{device} use weights='int8' or a float dtype")  # fmt: skip
    file_blocks = _GGUFBlocks(model, gguf) if gguf is not None else None
    prefix = next(name for name, m in model.named_modules() if m is parts.layers)
    block_format, head_format = formats(model, weights)
    for i, block in enumerate(parts.layers):
        quantize_block(block, block_format, f"{prefix}.{i}", file_blocks)
    head = parts.lm_head
    if file_blocks is not None:
        q, s = file_blocks.read_head(), None
    else:
        q, s = quantize(head.weight, head_format)
    head.register_buffer("qweight", q, persistent=False)
    head.register_buffer("scales", s, persistent=False)
    return model


def quantize_block(block: nn.Module, kind: str, path: str, file_blocks=None) -> nn.Module:
    """Make one decoder block's linears (and GPT-2's ``Conv1D``) ``QuantizedLinear`` of format
    ``kind`` in place, from ``file_blocks`` (a GGUF file's, for q4) or quantised from their
    float weights; ``path`` is the block's module path, for the file and for errors. Returns
    the block."""
    targets = [(name, m) for name, m in block.named_modules() if type(m) in (nn.Linear, Conv1D)]
    for name, linear in targets:
        if file_blocks is not None:
            low_bit = QuantizedLinear(file_blocks.read(f"{path}.{name}"), None, linear.bias)
        else:
            if kind != "int8" and _in_features(linear) % 32:
                raise ValueError(f"quantize_backbone: q4 quantises groups of 32 input features;"
                                 f" {path}.{name} has {_in_features(linear)}")  # fmt: skip
            low_bit = QuantizedLinear.from_linear(linear, kind)
        replace_module(block, name, low_bit)
    return block


def _in_features(linear: nn.Module) -> int:
    return linear.weight.shape[0 if type(linear) is Conv1D else 1]


class _GGUFBlocks:
    """The Q4/Q8 blocks of a llama GGUF file, by the HF module they belong to."""

    def __init__(self, model: nn.Module, path: str | Path):
        import gguf  # the smollm2 extra; only needed to read GGUF files

        self.reader = gguf.GGUFReader(str(path))
        arch_field = self.reader.get_field("general.architecture")
        arch = arch_field.contents() if arch_field is not None else "?"
        if arch != "llama":
            raise ValueError(f"quantize_backbone: reading blocks from a {arch!r} GGUF is not "
                             "supported (llama only); leave gguf unset to quantise")  # fmt: skip
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = model.config
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA,
                                              self.config.num_hidden_layers)  # fmt: skip
        self.types = {gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                      gguf.GGMLQuantizationType.Q8_0}  # fmt: skip
        self.path = path

    def _rows(self, name: str) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise ValueError(f"quantize_backbone: {self.path} has no tensor {name}")
        if t.tensor_type not in self.types:
            raise ValueError(f"quantize_backbone: {self.path}'s {name} is {t.tensor_type.name};"
                             " eefast reads Q4_0, Q4_1 and Q8_0 blocks")  # fmt: skip
        out = int(t.shape[1])
        return torch.from_numpy(t.data.copy()).view(out, int(t.shape[0]) // 32, -1)

    def read(self, module_path: str) -> torch.Tensor:
        """The packed blocks of the linear at ``module_path``, its rows in HF's order."""
        name = self.names.get_name(module_path)
        if name is None:
            raise ValueError(f"quantize_backbone: no GGUF tensor for {module_path}")
        rows = self._rows(name + ".weight")
        # llama.cpp's converter interleaves each head's rotary halves in q and k; undo it.
        heads = {"attn_q": self.config.num_attention_heads,
                 "attn_k": self.config.num_key_value_heads}.get(name.split(".")[-1])  # fmt: skip
        if heads is not None:
            out = rows.shape[0]
            rows = rows.reshape(heads, out // heads // 2, 2, *rows.shape[1:])
            rows = rows.transpose(1, 2).reshape(out, *rows.shape[3:])
        return pack_gguf(rows.contiguous())

    def read_head(self) -> torch.Tensor:
        """The LM head's blocks: ``output.weight``, or the tied token embedding."""
        name = "output.weight" if "output.weight" in self.tensors else "token_embd.weight"
        return pack_gguf(self._rows(name))
