"""The decode-step ops: decode_linear (few-row linear) and decode_block (a whole llama-family
block for a decode or verify step).

Schemas and kernels: csrc/decode_linear/ and csrc/decode_block/. decode_linear's backward is
registered here in Python (two matmuls; its speed never matters, decode runs without grad);
decode_block is forward only (it writes the KV cache).
"""

from __future__ import annotations

import torch


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` for decode steps: ``x [..., in]`` with few rows, ``weight [out, in]``
    (fp32 or bf16, same dtype as x). On CPU up to 8 rows stream W once (MKL's sgemm is several
    times slower than its one-row GEMV at 2-16 rows), and each output is summed in an order
    that does not depend on the number of rows. Otherwise (and on CUDA) it is ``F.linear``.
    Differentiable.
    """
    return torch.ops.eefast.decode_linear.default(x, weight, bias)


@torch.library.register_fake("eefast::decode_linear")
def _decode_linear_fake(x, weight, bias=None):
    torch._check(weight.dim() == 2, lambda: "decode_linear: weight must be [out, in]")
    torch._check(
        x.shape[-1] == weight.shape[1],
        lambda: f"decode_linear: x's last dim ({x.shape[-1]}) != weight's in ({weight.shape[1]})",
    )
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
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b


torch.library.register_autograd(
    "eefast::decode_linear", _decode_linear_backward, setup_context=_decode_linear_setup_context
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
) -> torch.Tensor:
    """One llama-family decoder block (llama, mistral, qwen2) for a decode or verify step.

    ``h [batch, q, d]``; ``cos``/``sin [batch, q, head_dim]`` the rotary tables of the q new
    tokens; ``allowed [batch, q, cache_len + q]`` (bool) the keys each query sees; the caches
    ``[batch, kv_heads, slots, head_dim]`` (contiguous, ``slots >= cache_len + q``) get the new
    keys and values at ``[cache_len, cache_len + q)``. ``norms`` are the input and
    post-attention RMSNorm weights; ``weights``/``biases`` the q, k, v, o, gate, up and down
    projections. On CPU in float32 each row is computed alone in a fixed order, so a token's
    output does not depend on what else is in the call. Forward only.
    """
    return torch.ops.eefast.decode_block.default(
        h, cos, sin, allowed, k_cache, v_cache, int(cache_len), *norms, list(weights),
        list(biases), float(eps), float(scaling),
    )  # fmt: skip


@torch.library.register_fake("eefast::decode_block")
def _decode_block_fake(h, cos, sin, allowed, k_cache, v_cache, cache_len, norm1, norm2, weights,
                       biases, eps, scaling):  # fmt: skip
    torch._check(h.dim() == 3, lambda: "decode_block: h must be [batch, q, d]")
    torch._check(len(weights) == 7, lambda: "decode_block: weights must list the 7 linears")
    torch._check(
        k_cache.shape[2] >= cache_len + h.shape[1],
        lambda: "decode_block: the caches must hold cache_len + q slots",
    )
    return torch.empty_like(h)
