"""GGUF's 4- and 8-bit blocks as decode weights: ``decode_linear_gguf``, ``pack_gguf``,
``dequantize_gguf`` and ``quantize_gguf``.

A GGUF tensor stores each row of ``in`` weights as ``in / 32`` blocks: Q4_0 (18 bytes: fp16
scale d, 32 nibbles; w = d (q - 8)), Q4_1 (20 bytes: d, fp16 min m, 32 nibbles; w = d q + m)
and Q8_0 (34 bytes: d, 32 int8; w = d q). eefast keeps such a matrix as uint8 ``[out, in / 32,
block bytes]`` "packed": the same bytes regrouped in tiles of 16 rows, so one 512-bit load
feeds sixteen output rows, or one 256-bit load eight (``csrc/cpu/gguf_blocks.h``). The block
size names the type.

Schemas and kernels: ``csrc/decode_linear/`` and ``csrc/cpu/gguf_*``. CPU only for now; on
CUDA the ops say so.
"""

from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, as_rows, check, check_dtype, check_same

GGUF_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
GROUP = 32  # weights per block


def gguf_type(qweight: torch.Tensor) -> str:
    """The GGUF type ("q4_0", "q4_1" or "q8_0") of packed blocks, told by their size."""
    for name, size in GGUF_BLOCK_BYTES.items():
        if qweight.dim() == 3 and qweight.shape[2] == size:
            return name
    raise ValueError(f"not GGUF blocks: {tuple(qweight.shape)}")


def _check_blocks(op: str, name: str, w: torch.Tensor) -> None:
    check(w.dtype == torch.uint8 and w.dim() == 3 and w.shape[2] in GGUF_BLOCK_BYTES.values(),
          op, f"{name} must be GGUF blocks, uint8 [out, in / 32, 18 (Q4_0) | 20 (Q4_1) | "
          f"34 (Q8_0)], got {w.dtype} {tuple(w.shape)}")  # fmt: skip


def decode_linear_gguf(
    x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` held as packed GGUF blocks ``qweight``. On CPU up
    to 64 rows quantise ``x`` per group of 32 to int8 (as llama.cpp does) and stream the
    blocks once with integer dot products; each output's sum does not depend on the number
    of rows. More rows (a long prefill, a tuning forward) dequantise ``W`` for a GEMM in x's
    dtype. Differentiable in ``x`` and ``bias``."""
    return torch.ops.eefast.decode_linear_gguf.default(x, qweight, bias)


def pack_gguf(rows: torch.Tensor) -> torch.Tensor:
    """A GGUF tensor's blocks as the file stores them, uint8 ``[out, in / 32, block bytes]``,
    regrouped for the kernels (the same bytes)."""
    return torch.ops.eefast.pack_gguf.default(rows)


def dequantize_gguf(qweight: torch.Tensor) -> torch.Tensor:
    """The float32 ``[out, in]`` weight that packed blocks define (exactly GGUF's values)."""
    return torch.ops.eefast.dequantize_gguf.default(qweight)


def quantize_gguf(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Packed GGUF blocks of a float ``[out, in]`` weight (``in`` a multiple of 32), rounded
    as llama.cpp's reference quantiser does (the ``gguf`` package's, bit for bit)."""
    check(kind in GGUF_BLOCK_BYTES, "quantize_gguf",
          f"kind must be one of {sorted(GGUF_BLOCK_BYTES)}, got {kind!r}")  # fmt: skip
    check(weight.dim() == 2 and weight.is_floating_point(), "quantize_gguf",
          "weight must be a floating-point [out, in] matrix")  # fmt: skip
    out, n_in = weight.shape
    check(n_in % GROUP == 0, "quantize_gguf",
          f"in features ({n_in}) must be a multiple of {GROUP}, GGUF's block size")  # fmt: skip
    g = weight.detach().float().cpu().reshape(out, n_in // GROUP, GROUP)

    def inverse(d):
        return torch.where(d == 0, torch.zeros_like(d), 1 / d)

    def half_bytes(v):
        return v.to(torch.float16).view(torch.uint8).reshape(out, -1, 2)

    def nibbles(q):  # [out, groups, 32] in 0..15 -> [out, groups, 16]: w[j] | w[j + 16] << 4
        q = q.to(torch.uint8)
        return q[..., :16] | (q[..., 16:] << 4)

    if kind == "q8_0":
        d = g.abs().amax(-1, keepdim=True) / 127
        v = g * inverse(d)
        q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)  # C's roundf
        blocks = torch.cat([half_bytes(d), q.view(torch.uint8)], -1)
    elif kind == "q4_1":
        hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
        d = (hi - lo) / 15
        q = torch.trunc((g - lo) * inverse(d) + 0.5).clamp(0, 15)
        blocks = torch.cat([half_bytes(d), half_bytes(lo), nibbles(q)], -1)
    else:  # q4_0: the largest magnitude, with its sign, maps to -8
        big = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True))
        d = big / -8
        q = torch.trunc(g * inverse(d) + 8.5).clamp(0, 15)
        blocks = torch.cat([half_bytes(d), nibbles(q)], -1)
    return pack_gguf(blocks).to(weight.device)


@torch.library.register_fake("eefast::decode_linear_gguf")
def _decode_linear_gguf_fake(x, qweight, bias=None):
    op = "decode_linear_gguf"
    _check_blocks(op, "qweight", qweight)
    n_in = qweight.shape[1] * GROUP
    check(x.dim() >= 1 and x.shape[-1] == n_in, op,
          f"x's last dim must equal qweight's in features ({n_in})")  # fmt: skip
    check_dtype(op, "x", x, (*FLOAT_DTYPES, torch.float64))
    check(qweight.device == x.device, op, "qweight must be on x's device")
    if bias is not None:
        check_same("bias", bias, x, op)
        check(bias.dim() == 1 and bias.shape[0] == qweight.shape[0], op, "bias must be [out]")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("eefast::pack_gguf")
def _pack_gguf_fake(rows):
    _check_blocks("pack_gguf", "rows", rows)
    return torch.empty_like(rows)


@torch.library.register_fake("eefast::dequantize_gguf")
def _dequantize_gguf_fake(qweight):
    _check_blocks("dequantize_gguf", "qweight", qweight)
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * GROUP), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, qweight, bias = inputs
    ctx.save_for_backward(qweight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    (qweight,) = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ dequantize_gguf(qweight).to(grad.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = as_rows(grad).sum(0)
    return grad_x, None, grad_b


torch.library.register_autograd(
    "eefast::decode_linear_gguf", _backward, setup_context=_setup_context
)
