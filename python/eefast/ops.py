"""Python face of the eefast ops: typed wrappers, fake kernels, autograd and references.

Every op is defined once in C++ (cpp/registration.cpp). This module gives each one
- a wrapper that calls ``torch.ops.eefast.<op>.default``;
- a fake kernel (``torch.library.register_fake``) so it traces under ``torch.compile``;
- a pure-torch reference ``<op>_reference`` that the tests use as the oracle.
Autograd of the trainable ops is registered in C++ (cpp/<op>_autograd.cpp) and calls a separate
backward op, which has a fake here too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ExitStats",
    "exit_stats",
    "exit_stats_reference",
    "lora_linear",
    "lora_linear_reference",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# lora_linear
# --------------------------------------------------------------------------------------------


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
    x_lora = F.dropout(x, dropout, training) if dropout > 0.0 and training else None
    y, _ = torch.ops.eefast.lora_linear.default(
        x, weight, bias, lora_a, lora_b, float(scaling), x_lora
    )
    return y


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unfused pure-torch ``lora_linear`` (the test oracle); ``x_lora`` stands for dropout(x)."""
    x_lora = x if x_lora is None else x_lora
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_a), lora_b)


def _check_same(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    torch._check(
        t.dtype == x.dtype,
        lambda: (
            f"lora_linear: {name} has dtype {t.dtype} but x has {x.dtype}; "
            "all inputs must share one dtype"
        ),
    )
    torch._check(
        t.device == x.device,
        lambda: (
            f"lora_linear: {name} is on {t.device} but x is on {x.device}; "
            "all inputs must be on one device"
        ),
    )


@torch.library.register_fake("eefast::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scaling, x_lora=None):
    torch._check(x.dim() >= 1, lambda: "lora_linear: x must have at least 1 dimension")
    torch._check(x.dtype in _FLOAT_DTYPES, lambda: f"lora_linear: x dtype {x.dtype} unsupported")
    for name, t in (
        ("weight", weight),
        ("lora_a", lora_a),
        ("lora_b", lora_b),
        ("bias", bias),
        ("x_lora", x_lora),
    ):
        if t is not None:
            _check_same(name, t, x)
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
    lead = x.shape[:-1]
    return x.new_empty((*lead, out)), x.new_empty((*lead, r))


@torch.library.register_fake("eefast::lora_linear_backward")
def _lora_linear_backward_fake(
    grad_out, weight, lora_a, lora_b, x_lora, xa, scaling, needs_grad_x, split_grad_x
):
    in_features = weight.shape[1]
    grad_x = x_lora.new_empty(x_lora.shape if needs_grad_x else (0, in_features))
    grad_x_lora = x_lora.new_empty(
        x_lora.shape if needs_grad_x and split_grad_x else (0, in_features)
    )
    return grad_x, grad_x_lora, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


# --------------------------------------------------------------------------------------------
# exit_stats
# --------------------------------------------------------------------------------------------


class ExitStats(NamedTuple):
    """Per-row softmax statistics of an exit head's logits (all fp32 except argmax, int64)."""

    lse: torch.Tensor  # logsumexp of the (temperature-scaled) logits
    max_prob: torch.Tensor  # p of the argmax token
    argmax: torch.Tensor  # the greedy token
    entropy: torch.Tensor  # in nats
    margin: torch.Tensor  # top-1 minus top-2 probability


def exit_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> ExitStats:
    """Softmax statistics of ``(hidden Wᵀ + b) / temperature`` for each row of ``hidden``.

    ``hidden [..., d]`` (fp32/bf16/fp16), ``weight [vocab, d]`` (fp32 or bf16, accumulated in
    fp32), ``bias [vocab]`` or None. The ``[..., vocab]`` logits are never materialised: the
    vocab is streamed in chunks with an online softmax. Forward only (no autograd). A NaN
    logit makes the row's statistics NaN and its argmax the first NaN, as in torch.
    """
    return ExitStats(*torch.ops.eefast.exit_stats.default(hidden, weight, bias, float(temperature)))


def exit_stats_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> ExitStats:
    """Pure-torch ``exit_stats`` through full fp32 logits (the test oracle)."""
    b = None if bias is None else bias.float()
    logits = F.linear(hidden.float(), weight.float(), b) / temperature
    lse = logits.logsumexp(-1)
    logp = logits - lse.unsqueeze(-1)
    top = logits.topk(min(2, logits.shape[-1]), dim=-1).values
    p1 = (top[..., 0] - lse).exp()
    p2 = (top[..., 1] - lse).exp() if top.shape[-1] > 1 else torch.zeros_like(p1)
    entropy = -(logp.exp() * logp).sum(-1)
    return ExitStats(lse, p1, logits.argmax(-1), entropy, p1 - p2)


@torch.library.register_fake("eefast::exit_stats")
def _exit_stats_fake(hidden, weight, bias=None, temperature=1.0):
    torch._check(hidden.dim() >= 1, lambda: "exit_stats: hidden must be [..., d]")
    torch._check(weight.dim() == 2, lambda: "exit_stats: weight must be 2-D [vocab, d]")
    torch._check(
        hidden.shape[-1] == weight.shape[1],
        lambda: (
            f"exit_stats: hidden has d={hidden.shape[-1]} "
            f"but weight is [vocab, d={weight.shape[1]}]"
        ),
    )
    torch._check(
        weight.device == hidden.device,
        lambda: f"exit_stats: weight is on {weight.device} but hidden is on {hidden.device}",
    )
    torch._check(temperature > 0, lambda: "exit_stats: temperature must be a finite number > 0")
    lead = hidden.shape[:-1]
    f32 = hidden.new_empty(lead, dtype=torch.float32)
    return f32, f32.clone(), hidden.new_empty(lead, dtype=torch.int64), f32.clone(), f32.clone()
