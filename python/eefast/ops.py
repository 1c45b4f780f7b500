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
    "ADAPTER_ACTIVATIONS",
    "ExitStats",
    "bottleneck_adapter",
    "bottleneck_adapter_reference",
    "decode_block",
    "decode_block_reference",
    "decode_linear",
    "exit_stats",
    "exit_stats_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "multi_exit_cross_entropy",
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


def _check_same(name: str, t: torch.Tensor, x: torch.Tensor, op: str = "lora_linear") -> None:
    torch._check(
        t.dtype == x.dtype,
        lambda: (
            f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; all inputs must share one dtype"
        ),
    )
    torch._check(
        t.device == x.device,
        lambda: (
            f"{op}: {name} is on {t.device} but x is on {x.device}; "
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
# bottleneck_adapter
# --------------------------------------------------------------------------------------------

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


def bottleneck_adapter_reference(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: float | torch.Tensor,
    activation: str = "relu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unfused pure-torch ``bottleneck_adapter`` (the test oracle and the eager baseline)."""
    residual = x if residual is None else residual
    hidden = ADAPTER_ACTIVATIONS[activation](F.linear(x, down_weight, down_bias))
    return residual + scale * F.linear(hidden, up_weight, up_bias)


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
            _check_same(name, t, x, "bottleneck_adapter")
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
    torch._check(scale.numel() == 1, lambda: "bottleneck_adapter: scale must hold one element")
    out_features = up_weight.shape[0]
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


# --------------------------------------------------------------------------------------------
# decode_linear
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------------

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _teacher_inputs(teacher):
    """(teacher_hidden [tokens, d_t], teacher_weight), detached (the teacher gets no gradient)."""
    if teacher is None:
        return None, None
    teacher_hidden, teacher_weight = teacher
    return teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach()


def _head_needs_grad(weight, bias) -> bool:
    return weight.requires_grad or (bias is not None and bias.requires_grad)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
    kd_weight: float = 0.0,
) -> torch.Tensor:
    """Fused LM head + cross-entropy: ``CE(hidden Wᵀ + b, targets)`` without ``[tokens, vocab]``.

    Optional terms per non-ignored row: ``z_loss · lse²`` and ``kd_weight · KL(p_teacher ‖ p)``
    where the teacher is ``(teacher_hidden, teacher_weight)``, whose logits are never
    materialised either (it gets no gradient). ``reduction`` is ``"mean"`` (over non-ignored
    rows; 0 when there are none, where ``F.cross_entropy`` gives NaN), ``"sum"`` or ``"none"``.
    Gradients reach ``hidden`` and, when they require grad, ``weight`` and ``bias``. For mean
    and sum they are computed during the forward (no logits recompute).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {list(_REDUCTIONS)}")
    lead = hidden.shape[:-1]
    teacher_hidden, teacher_weight = _teacher_inputs(teacher)
    weight_grad = _head_needs_grad(weight, bias)
    loss, *_ = torch.ops.eefast.linear_cross_entropy.default(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1),
        bias,
        teacher_hidden,
        teacher_weight,
        ignore_index,
        _REDUCTIONS[reduction],
        float(z_loss),
        float(kd_weight),
        weight_grad,
    )
    return loss.reshape(lead) if reduction == "none" else loss


def multi_exit_cross_entropy(
    hiddens: list[torch.Tensor],
    weights: torch.Tensor | list[torch.Tensor],
    targets: torch.Tensor,
    exit_weights: list[float] | None = None,
    bias: torch.Tensor | list[torch.Tensor | None] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
    kd_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several exits in one call: ``(sum_e exit_weights[e] · loss_e, losses [exits])``.

    ``weights`` is one LM-head weight shared by every exit, or one per exit; ``bias`` likewise
    (a list, one per exit, goes with per-exit weights). A shared head with
    ``reduction`` mean or sum runs as one fused op that accumulates the weight gradient of all
    exits in one buffer; other cases run ``linear_cross_entropy`` per exit. The per-exit
    losses are for logging (no gradient); backpropagate the total.
    """
    n_exits = len(hiddens)
    exit_weights = [1.0] * n_exits if exit_weights is None else [float(c) for c in exit_weights]
    if len(exit_weights) != n_exits:
        raise ValueError(
            f"multi_exit_cross_entropy: {n_exits} exits but {len(exit_weights)} exit weights"
        )
    kw = {
        "ignore_index": ignore_index,
        "reduction": reduction,
        "z_loss": z_loss,
        "teacher": teacher,
        "kd_weight": kd_weight,
    }
    shared = isinstance(weights, torch.Tensor) and not isinstance(bias, list)
    if shared and reduction in ("mean", "sum"):
        teacher_hidden, teacher_weight = _teacher_inputs(teacher)
        weight_grad = _head_needs_grad(weights, bias)
        total, losses, *_ = torch.ops.eefast.linear_cross_entropy_multi.default(
            [h.reshape(-1, h.shape[-1]) for h in hiddens],
            weights,
            targets.reshape(-1),
            bias,
            exit_weights,
            teacher_hidden,
            teacher_weight,
            ignore_index,
            _REDUCTIONS[reduction],
            float(z_loss),
            float(kd_weight),
            weight_grad,
        )
        return total, losses
    if isinstance(weights, torch.Tensor):
        weights = [weights] * n_exits
    biases = bias if isinstance(bias, list) else [bias] * n_exits
    if len(weights) != n_exits or len(biases) != n_exits:
        raise ValueError(
            f"multi_exit_cross_entropy: {n_exits} exits but {len(weights)} weights and "
            f"{len(biases)} biases"
        )
    losses = [
        linear_cross_entropy(h, w, targets, bias=b, **kw)
        for h, w, b in zip(hiddens, weights, biases, strict=True)
    ]
    total = sum(c * loss for c, loss in zip(exit_weights, losses, strict=True))
    return total, torch.stack([loss.detach() for loss in losses])


def linear_cross_entropy_reference(
    hidden,
    weight,
    targets,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    z_loss=0.0,
    teacher=None,
    kd_weight=0.0,
):
    """Pure-torch ``linear_cross_entropy`` through full fp32 logits (the test oracle)."""
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    valid = targets != ignore_index
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    loss = loss + z_loss * logits.logsumexp(-1).square()
    if teacher is not None:
        t_logits = F.linear(teacher[0].float(), teacher[1].float()).reshape(logits.shape)
        log_pt = t_logits.log_softmax(-1)
        loss = loss + kd_weight * (log_pt.exp() * (log_pt - logits.log_softmax(-1))).sum(-1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(hidden.shape[:-1])
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def _lce_grad_shapes(hidden, weight, bias, grads: bool, weight_grad: bool):
    rows, vocab = hidden.shape[0], weight.shape[0]
    grad_hidden = hidden.new_empty((rows if grads else 0, hidden.shape[1]))
    grad_weight = weight.new_empty((vocab if grads and weight_grad else 0, weight.shape[1]))
    has_bias_grad = grads and weight_grad and bias is not None
    grad_bias = (bias if bias is not None else weight).new_empty(
        (vocab if has_bias_grad else 0,), dtype=bias.dtype if bias is not None else torch.float32
    )
    return grad_hidden, grad_weight, grad_bias


@torch.library.register_fake("eefast::linear_cross_entropy")
def _lce_fake(
    hidden,
    weight,
    targets,
    bias,
    teacher_hidden,
    teacher_weight,
    ignore_index,
    reduction,
    z_loss,
    kd_weight,
    weight_grad,
):
    torch._check(hidden.dim() == 2 and weight.dim() == 2, lambda: "linear_cross_entropy: 2-D")
    torch._check(hidden.shape[1] == weight.shape[1], lambda: "linear_cross_entropy: d mismatch")
    torch._check(targets.shape[0] == hidden.shape[0], lambda: "linear_cross_entropy: targets")
    loss = hidden.new_empty((hidden.shape[0],) if reduction == 0 else (), dtype=torch.float32)
    return (loss, *_lce_grad_shapes(hidden, weight, bias, reduction != 0, weight_grad))


@torch.library.register_fake("eefast::linear_cross_entropy_backward")
def _lce_backward_fake(
    grad_rows,
    hidden,
    weight,
    targets,
    bias,
    teacher_hidden,
    teacher_weight,
    ignore_index,
    z_loss,
    kd_weight,
    weight_grad,
):
    return _lce_grad_shapes(hidden, weight, bias, True, weight_grad)


def _lce_setup_context(ctx, inputs, output):
    (
        hidden,
        weight,
        targets,
        bias,
        teacher_hidden,
        teacher_weight,
        ignore_index,
        reduction,
        z_loss,
        kd_weight,
        weight_grad,
    ) = inputs
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)
    ctx.reduction = reduction
    ctx.args = (ignore_index, z_loss, kd_weight, weight_grad)
    if reduction != 0:  # mean/sum: the forward already computed the gradients
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    else:  # none: recompute with the per-row upstream gradient
        ctx.save_for_backward(hidden, weight, targets, bias, teacher_hidden, teacher_weight)


def _lce_backward(ctx, grad_loss, *_unused):
    if ctx.reduction != 0:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = (
            g * grad_loss.to(g.dtype) for g in (grad_hidden, grad_weight, grad_bias)
        )
    else:
        hidden, weight, targets, bias, teacher_hidden, teacher_weight = ctx.saved_tensors
        ignore_index, z_loss, kd_weight, weight_grad = ctx.args
        grad_hidden, grad_weight, grad_bias = (
            torch.ops.eefast.linear_cross_entropy_backward.default(
                grad_loss.contiguous(),
                hidden,
                weight,
                targets,
                bias,
                teacher_hidden,
                teacher_weight,
                ignore_index,
                z_loss,
                kd_weight,
                weight_grad,
            )
        )
    needs = ctx.needs_input_grad
    return (
        grad_hidden if needs[0] else None,
        grad_weight if needs[1] else None,
        None,
        grad_bias if len(needs) > 3 and needs[3] else None,
        *([None] * 7),
    )[: len(needs)]


torch.library.register_autograd(
    "eefast::linear_cross_entropy", _lce_backward, setup_context=_lce_setup_context
)


@torch.library.register_fake("eefast::linear_cross_entropy_multi")
def _lce_multi_fake(
    hiddens,
    weight,
    targets,
    bias,
    exit_weights,
    teacher_hidden,
    teacher_weight,
    ignore_index,
    reduction,
    z_loss,
    kd_weight,
    weight_grad,
):
    torch._check(len(hiddens) == len(exit_weights), lambda: "one exit weight per exit")
    f32 = hiddens[0].new_empty((), dtype=torch.float32)
    _, grad_weight, grad_bias = _lce_grad_shapes(hiddens[0], weight, bias, True, weight_grad)
    return (
        f32,
        f32.new_empty((len(hiddens),)),
        [h.new_empty(h.shape) for h in hiddens],
        grad_weight,
        grad_bias,
    )


def _lce_multi_setup_context(ctx, inputs, output):
    _, losses, grad_hiddens, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(losses, *grad_hiddens, grad_weight, grad_bias)
    ctx.n_exits = len(grad_hiddens)
    ctx.save_for_backward(grad_weight, grad_bias, *grad_hiddens)


def _lce_multi_backward(ctx, grad_total, *_unused):
    grad_weight, grad_bias, *grad_hiddens = ctx.saved_tensors
    needs = ctx.needs_input_grad
    return (
        [g * grad_total.to(g.dtype) for g in grad_hiddens],
        grad_weight * grad_total.to(grad_weight.dtype) if needs[1] else None,
        None,
        grad_bias * grad_total.to(grad_bias.dtype) if len(needs) > 3 and needs[3] else None,
        *([None] * 8),
    )[: len(needs)]


torch.library.register_autograd(
    "eefast::linear_cross_entropy_multi",
    _lce_multi_backward,
    setup_context=_lce_multi_setup_context,
)


# --------------------------------------------------------------------------------------------
# decode_block
# --------------------------------------------------------------------------------------------


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


def decode_block_reference(h, cos, sin, allowed, k_cache, v_cache, cache_len, norms, weights,
                           biases, eps, scaling) -> torch.Tensor:  # fmt: skip
    """Pure-torch ``decode_block`` in float32 (the test oracle); writes the caches too."""

    def rms(x, w):
        return w.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x, i):
        b = biases[i]
        return F.linear(x, weights[i].float(), None if b is None else b.float())

    def rotate(x):  # [B, n, q, hd]
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos.float()[:, None] + turned * sin.float()[:, None]

    batch, q, _ = h.shape
    hd = k_cache.shape[-1]
    x = rms(h.float(), norms[0])
    query, key, value = (lin(x, i).view(batch, q, -1, hd).transpose(1, 2) for i in range(3))
    k_cache[:, :, cache_len : cache_len + q] = rotate(key).to(k_cache.dtype)
    v_cache[:, :, cache_len : cache_len + q] = value.to(v_cache.dtype)
    group = query.shape[1] // k_cache.shape[1]
    keys = k_cache[:, :, : cache_len + q].float().repeat_interleave(group, 1)
    values = v_cache[:, :, : cache_len + q].float().repeat_interleave(group, 1)
    scores = (rotate(query) @ keys.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = scores.softmax(-1).masked_fill(~allowed[:, None], 0.0)
    h_mid = h.float() + lin((probs @ values).transpose(1, 2).reshape(batch, q, -1), 3)
    x = rms(h_mid, norms[1])
    return (h_mid + lin(F.silu(lin(x, 4)) * lin(x, 5), 6)).to(h.dtype)


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
