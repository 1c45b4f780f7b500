"""bottleneck_adapter: a series or parallel bottleneck adapter in one op.

Schema and kernels: csrc/bottleneck_adapter/ (autograd in C++, autograd.cpp). Here: the
wrapper, the activation names the kernels know and the fake kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check, check_device, check_dtype, check_same

ADAPTER_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
}


def _scale_tensor(scale: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return scale.float()
    if not math.isfinite(scale):
        raise ValueError(f"bottleneck_adapter: scale must be finite, got {scale}")
    return torch.tensor(float(scale), dtype=torch.float32, device=x.device)


def bottleneck_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: float | torch.Tensor,
    activation: str = "relu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + scale · (act(x Dᵀ + b_d) Uᵀ + b_u)`` in one pass, forward and backward.

    ``x [..., in]``, ``down_weight [r, in]``, ``up_weight [out, r]``. With ``residual=None`` the
    residual is ``x`` itself (a series adapter, ``out == in``); a parallel adapter passes the
    output of the sublayer it sits beside. ``scale`` is a float or a one-element tensor, which
    may require grad (a learned scale). All weights get gradients; the backward keeps ``x`` and
    the r-wide pre-activation, nothing of size ``[tokens, out]``.
    """
    out, _ = torch.ops.eefast.bottleneck_adapter.default(
        x, residual, down_weight, down_bias, up_weight, up_bias, _scale_tensor(scale, x), activation
    )
    return out


@torch.library.register_fake("eefast::bottleneck_adapter")
def _bottleneck_adapter_fake(
    x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation
):
    torch._check(x.dim() >= 1, lambda: "bottleneck_adapter: x must have at least 1 dimension")
    for name, t in (
        ("residual", residual),
        ("down_weight", down_weight),
        ("down_bias", down_bias),
        ("up_weight", up_weight),
        ("up_bias", up_bias),
    ):
        if t is not None:
            check_same(name, t, x, "bottleneck_adapter")
    torch._check(
        activation in ADAPTER_ACTIVATIONS,
        lambda: f"bottleneck_adapter: unknown activation {activation!r}",
    )
    torch._check(
        down_weight.dim() == 2 and down_weight.shape[1] == x.shape[-1],
        lambda: "bottleneck_adapter: down_weight must be [bottleneck, in_features]",
    )
    torch._check(
        up_weight.dim() == 2 and up_weight.shape[1] == down_weight.shape[0],
        lambda: "bottleneck_adapter: up_weight must be [out_features, bottleneck]",
    )
    op = "bottleneck_adapter"
    check_dtype(op, "x", x, FLOAT_DTYPES)
    torch._check(scale.numel() == 1, lambda: "bottleneck_adapter: scale must hold one element")
    check(scale.dim() <= 1 and scale.dtype == torch.float32, op, "scale must be a float32 scalar")
    check_device(op, "scale", scale, x)
    out_features = up_weight.shape[0]
    r = down_weight.shape[0]
    if down_bias is not None:
        check(down_bias.dim() == 1 and down_bias.shape[0] == r, op, "down_bias must be [r]")
    if up_bias is not None:
        check(up_bias.dim() == 1 and up_bias.shape[0] == out_features, op, "up_bias must be [out]")
    if residual is not None:
        check(
            residual.shape == (*x.shape[:-1], out_features),
            op,
            "residual must be x's shape with out_features last",
        )
    if residual is None:
        torch._check(
            out_features == x.shape[-1],
            lambda: "bottleneck_adapter: without a residual, out_features must equal in_features",
        )
    lead = x.shape[:-1]
    return (
        x.new_empty((*lead, out_features)),
        x.new_empty((*lead, down_weight.shape[0]), dtype=torch.float32),
    )


@torch.library.register_fake("eefast::bottleneck_adapter_backward")
def _bottleneck_adapter_backward_fake(
    grad_out,
    x,
    down_weight,
    up_weight,
    up_bias,
    z,
    scale,
    activation,
    residual_is_x,
    needs_grad_x,
    needs_grad_scale,
):
    op = "bottleneck_adapter_backward"
    check_dtype(op, "x", x, FLOAT_DTYPES)
    for name, t in (("grad_out", grad_out), ("down_weight", down_weight),
                    ("up_weight", up_weight), ("up_bias", up_bias)):  # fmt: skip
        if t is not None:
            check_same(name, t, x, op)
    check_device(op, "z", z, x)
    check_device(op, "scale", scale, x)
    grad_x = x.new_empty(x.shape if needs_grad_x else (0, x.shape[-1]))
    grad_scale = scale.new_empty(scale.shape if needs_grad_scale else (0,))
    return (
        grad_x,
        down_weight.new_empty(down_weight.shape),
        down_weight.new_empty(down_weight.shape[:1]),
        up_weight.new_empty(up_weight.shape),
        up_weight.new_empty(up_weight.shape[:1]),
        grad_scale,
    )
