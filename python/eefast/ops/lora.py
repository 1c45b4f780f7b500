"""lora_linear: a frozen linear plus a LoRA update, forward and backward in one op.

Schema and kernels: csrc/lora_linear/ (autograd in C++, autograd.cpp). Here: the wrapper and
the fake kernels of the op and its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check, check_dtype, check_finite, check_same


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with a frozen ``W``/``b``.

    Shapes: ``x [..., in]``, ``weight [out, in]``, ``bias [out]`` or None,
    ``lora_a [r, in]``, ``lora_b [out, r]``. Gradients flow to ``x``, ``lora_a`` and ``lora_b``
    only. The backward keeps ``x`` (or the dropped ``x``) and the r-wide ``x Aᵀ``, nothing of
    size ``[tokens, out]``. Dropout uses torch's RNG, so seeds and ``torch.compile`` behave as
    for ``F.dropout``; its mask is applied before the fused op.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_linear: dropout must be in [0, 1), got {dropout}")
    x_lora = F.dropout(x, dropout, training) if dropout > 0.0 and training else None
    y, _ = torch.ops.eefast.lora_linear.default(
        x, weight, bias, lora_a, lora_b, float(scaling), x_lora
    )
    return y


@torch.library.register_fake("eefast::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scaling, x_lora=None):
    torch._check(x.dim() >= 1, lambda: "lora_linear: x must have at least 1 dimension")
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"lora_linear: x dtype {x.dtype} unsupported")
    for name, t in (
        ("weight", weight),
        ("lora_a", lora_a),
        ("lora_b", lora_b),
        ("bias", bias),
        ("x_lora", x_lora),
    ):
        if t is not None:
            check_same(name, t, x)
    torch._check(
        weight.dim() == 2 and lora_a.dim() == 2 and lora_b.dim() == 2,
        lambda: "lora_linear: weight, lora_a and lora_b must be 2-D",
    )
    out, in_features = weight.shape
    r = lora_a.shape[0]
    torch._check(x.shape[-1] == in_features, lambda: "lora_linear: x does not match weight")
    torch._check(lora_a.shape[1] == in_features, lambda: "lora_linear: lora_a must be [r, in]")
    torch._check(lora_b.shape[0] == out, lambda: "lora_linear: lora_b must be [out, r]")
    torch._check(lora_b.shape[1] == r, lambda: "lora_linear: lora_a and lora_b ranks differ")
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == out, "lora_linear", "bias must be [out]")
    if x_lora is not None:
        check(x_lora.shape == x.shape, "lora_linear", "x_lora must have the shape of x")
    check_finite("lora_linear", "scaling", scaling)
    lead = x.shape[:-1]
    return x.new_empty((*lead, out)), x.new_empty((*lead, r))


@torch.library.register_fake("eefast::lora_linear_backward")
def _lora_linear_backward_fake(
    grad_out, weight, lora_a, lora_b, x_lora, xa, scaling, needs_grad_x, split_grad_x
):
    op = "lora_linear_backward"
    check_dtype(op, "x", x_lora, FLOAT_DTYPES)
    for name, t in (("grad_out", grad_out), ("weight", weight), ("lora_a", lora_a),
                    ("lora_b", lora_b), ("xa", xa)):  # fmt: skip
        check_same(name, t, x_lora, op)
    check_finite(op, "scaling", scaling)
    in_features = weight.shape[1]
    grad_x = x_lora.new_empty(x_lora.shape if needs_grad_x else (0, in_features))
    grad_x_lora = x_lora.new_empty(
        x_lora.shape if needs_grad_x and split_grad_x else (0, in_features)
    )
    return grad_x, grad_x_lora, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)
