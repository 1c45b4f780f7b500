"""The decode-step ops: decode_linear (few-row linear), decode_linear_q8 (the same with a
weight-only int8 weight) and decode_block (a whole llama-family block for a decode or verify
step, float or int8 weights).

Schemas and kernels: csrc/decode_linear/ and csrc/decode_block/. decode_linear's backward is
registered here in Python (two matmuls; its speed never matters, decode runs without grad);
decode_block is forward only (it writes the KV cache).
"""

from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, as_rows, check, check_device, check_dtype, check_same


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` for decode steps: ``x [..., in]`` with few rows, ``weight [out, in]``
    (fp32 or bf16, same dtype as x). On CPU up to 64 rows stream W once (MKL's sgemm is several
    times slower than its one-row GEMV at 2-16 rows), and each output is summed in an order
    that does not depend on the number of rows. More float32 rows run one oneDNN GEMM where
    torch has it; otherwise (and on CUDA) it is ``F.linear``. Differentiable.
    """
    return torch.ops.eefast.decode_linear.default(x, weight, bias)


@torch.library.register_fake("eefast::decode_linear")
def _decode_linear_fake(x, weight, bias=None):
    op = "decode_linear"
    torch._check(weight.dim() == 2, lambda: "decode_linear: weight must be [out, in]")
    torch._check(
        x.dim() >= 1 and x.shape[-1] == weight.shape[1],
        lambda: f"decode_linear: x's last dim must equal weight's in ({weight.shape[1]})",
    )
    check_dtype(op, "x", x, (*FLOAT_DTYPES, torch.float64))
    check_same("weight", weight, x, op)
    if bias is not None:
        check_same("bias", bias, x, op)
        check(bias.dim() == 1 and bias.shape[0] == weight.shape[0], op, "bias must be [out]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _decode_linear_setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _decode_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ weight
    if ctx.needs_input_grad[1]:
        grad_w = as_rows(grad).t() @ as_rows(x)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = as_rows(grad).sum(0)
    return grad_x, grad_w, grad_b


torch.library.register_autograd(
    "eefast::decode_linear", _decode_linear_backward, setup_context=_decode_linear_setup_context
)


def decode_linear_q8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``decode_linear`` with a weight-only int8 weight: ``x (scales[:, None] * qweight)^T +
    bias``, ``qweight`` int8 ``[out, in]``, ``scales`` float32 ``[out]`` (``quantize_rows``
    makes both). On CPU up to 8 rows stream the int8 weight once (a quarter of float32's
    bytes) with the same row-independent sums as ``decode_linear``; more rows, and CUDA for
    now, dequantise the weight and run a GEMM. Differentiable in ``x`` and ``bias``.
    """
    return torch.ops.eefast.decode_linear_q8.default(x, qweight, scales, bias)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per row): symmetric round-to-nearest, each row's largest
    magnitude mapped to 127 (an all-zero row gets scale 1)."""
    check(weight.dim() == 2 and weight.is_floating_point(), "quantize_rows",
          "weight must be a floating-point [out, in] matrix")  # fmt: skip
    w = weight.detach().float()
    scales = w.abs().amax(1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


@torch.library.register_fake("eefast::decode_linear_q8")
def _decode_linear_q8_fake(x, qweight, scales, bias=None):
    op = "decode_linear_q8"
    check(qweight.dtype == torch.int8 and qweight.dim() == 2, op, "qweight must be int8 [out, in]")
    check(scales.dtype == torch.float32 and scales.shape == (qweight.shape[0],), op,
          "scales must be float32 [out] (one per output row)")  # fmt: skip
    check(x.dim() >= 1 and x.shape[-1] == qweight.shape[1], op,
          "x's last dim must equal qweight's in features")  # fmt: skip
    check_dtype(op, "x", x, (*FLOAT_DTYPES, torch.float64))
    if bias is not None:
        check_same("bias", bias, x, op)
        check(bias.dim() == 1 and bias.shape[0] == qweight.shape[0], op, "bias must be [out]")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _decode_linear_q8_setup_context(ctx, inputs, output):
    x, qweight, scales, bias = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.has_bias = bias is not None


def _decode_linear_q8_backward(ctx, grad):
    qweight, scales = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ (qweight.to(grad.dtype) * scales[:, None].to(grad.dtype))
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = as_rows(grad).sum(0)
    return grad_x, None, None, grad_b


torch.library.register_autograd(
    "eefast::decode_linear_q8",
    _decode_linear_q8_backward,
    setup_context=_decode_linear_q8_setup_context,
)


def decode_block(
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    allowed: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int,
    norms: tuple[torch.Tensor, torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    eps: float,
    scaling: float,
    scales: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One llama-family decoder block (llama, mistral, qwen2) for a decode or verify step.

    ``h [batch, q, d]``; ``cos``/``sin [batch, q, head_dim]`` the rotary tables of the q new
    tokens; ``allowed [batch, q, cache_len + q]`` (bool) the keys each query sees; the caches
    ``[batch, kv_heads, slots, head_dim]`` (contiguous, ``slots >= cache_len + q``) get the new
    keys and values at ``[cache_len, cache_len + q)``. ``norms`` are the input and
    post-attention RMSNorm weights; ``weights``/``biases`` the q, k, v, o, gate, up and down
    projections; with ``scales`` (float32 ``[out]`` each) the weights are int8, as in
    ``decode_linear_q8``; uint8 weights are packed GGUF blocks, as in ``decode_linear_gguf``
    (CPU only). On CPU in float32 each row is computed alone in a fixed order, so a
    token's output does not depend on what else is in the call. Forward only.
    """
    return torch.ops.eefast.decode_block.default(
        h, cos, sin, allowed, k_cache, v_cache, int(cache_len), *norms, list(weights),
        list(biases), float(eps), float(scaling), list(scales or []),
    )  # fmt: skip


@torch.library.register_fake("eefast::decode_block")
def _decode_block_fake(h, cos, sin, allowed, k_cache, v_cache, cache_len, norm1, norm2, weights,
                       biases, eps, scaling, scales):  # fmt: skip
    op = "decode_block"
    check(h.dim() == 3, op, "h must be [batch, q, d]")
    check_dtype(op, "h", h, (*FLOAT_DTYPES, torch.float64))
    check(len(weights) == 7 and len(biases) == 7, op, "weights and biases must list the 7 linears")
    check(k_cache.dim() == 4 and v_cache.dim() == 4, op, "the caches must be 4-D")
    batch, q, d = h.shape
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    check(cache_len >= 0, op, "cache_len must be >= 0")
    keys = cache_len + q
    for c in (k_cache, v_cache):
        check(
            c.shape[0] == batch
            and c.shape[1] == kv_heads
            and c.shape[2] >= keys
            and c.shape[3] == head_dim,
            op,
            "k_cache and v_cache must be [batch, kv_heads, >= cache_len + q, head_dim]",
        )
    for t in (cos, sin):
        check(t.shape == (batch, q, head_dim), op, "cos and sin must be [batch, q, head_dim]")
    check(
        allowed.dtype == torch.bool and allowed.shape == (batch, q, keys),
        op,
        "allowed must be bool [batch, q, cache_len + q]",
    )
    check(norm1.shape == (d,) and norm2.shape == (d,), op, "norm weights must be [d]")
    check(len(scales) in (0, 7), op, "scales must be empty or list the 7 linears' scales")
    for w, sc in zip(weights, scales, strict=False):
        check(w.dtype == torch.int8 and sc.dtype == torch.float32 and sc.shape == (w.shape[0],),
              op, "with scales, each weight must be int8 with float32 scales [out]")  # fmt: skip
    gguf = [w for w in weights if w.dtype == torch.uint8]
    check(not (gguf and scales), op, "GGUF block weights take no scales")
    for w in gguf:
        check(w.dim() == 3 and w.shape[2] in (18, 20, 34), op,
              "uint8 weights must be GGUF blocks [out, in / 32, 18 | 20 | 34]")  # fmt: skip
        check_device(op, "a weight", w, h)
    floats = [] if scales else [w for w in weights if w.dtype != torch.uint8]
    same = [cos, sin, k_cache, v_cache, norm1, norm2, *floats,
            *(b for b in biases if b is not None)]  # fmt: skip
    for t in same:
        check(t.dtype == h.dtype, op, "every weight, cache and cos/sin must have h's dtype")
    for t in (*same, allowed):
        check_device(op, "a tensor", t, h)
    return torch.empty_like(h)
