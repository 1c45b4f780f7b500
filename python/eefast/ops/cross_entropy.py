"""linear_cross_entropy: the fused LM head + cross-entropy, for one exit or several at once.

Schemas and kernels: csrc/linear_cross_entropy/. For mean and sum the forward already
computes the gradients, so the autograd registered here only scales them; reduction='none'
calls the backward op. Python ``register_autograd`` stays for this op: its backward is a
multiply by the upstream scalar, which C++ would not make faster.
"""

from __future__ import annotations

import math

import torch

from ._checks import HEAD_DTYPES, as_rows, check, check_device, check_dtype

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _teacher_inputs(teacher):
    """(teacher_hidden [tokens, d_t], teacher_weight), detached (the teacher gets no gradient)."""
    if teacher is None:
        return None, None
    teacher_hidden, teacher_weight = teacher
    return as_rows(teacher_hidden.detach()), teacher_weight.detach()


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
    label_smoothing: float = 0.0,
    softcap: float = 0.0,
    class_weight: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused LM head + cross-entropy: ``CE(hidden Wᵀ + b, targets)`` without ``[tokens, vocab]``.

    Optional terms per non-ignored row: ``z_loss · lse²`` and ``kd_weight · KL(p_teacher ‖ p)``
    where the teacher is ``(teacher_hidden, teacher_weight)``, whose logits are never
    materialised either (it gets no gradient). ``label_smoothing`` and ``class_weight``
    (``[vocab]``) are torch's ``cross_entropy``'s (a weighted mean divides by the targets'
    weights); ``softcap > 0`` caps the logits at ``softcap · tanh(z / softcap)`` first
    (Gemma-2). ``reduction`` is ``"mean"`` (over non-ignored rows; 0 when there are none,
    where ``F.cross_entropy`` gives NaN), ``"sum"`` or ``"none"``. With ``return_lse`` it
    returns ``(loss, lse)``, each row's fp32 logsumexp (0 where ignored; no gradient).
    Gradients reach ``hidden`` and, when they require grad, ``weight`` and ``bias``. For mean
    and sum they are computed during the forward (no logits recompute).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {list(_REDUCTIONS)}")
    lead = hidden.shape[:-1]
    teacher_hidden, teacher_weight = _teacher_inputs(teacher)
    weight_grad = _head_needs_grad(weight, bias)
    loss, _, _, _, lse = torch.ops.eefast.linear_cross_entropy.default(
        as_rows(hidden),
        weight,
        targets.reshape(-1),
        bias,
        teacher_hidden,
        teacher_weight,
        ignore_index,
        _REDUCTIONS[reduction],
        float(z_loss),
        float(kd_weight),
        float(label_smoothing),
        float(softcap),
        _detached(class_weight),
        weight_grad,
    )
    loss = loss.reshape(lead) if reduction == "none" else loss
    return (loss, lse.reshape(lead)) if return_lse else loss


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


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
    label_smoothing: float = 0.0,
    softcap: float = 0.0,
    class_weight: torch.Tensor | None = None,
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
        "label_smoothing": label_smoothing,
        "softcap": softcap,
        "class_weight": class_weight,
    }
    shared = isinstance(weights, torch.Tensor) and not isinstance(bias, list)
    if shared and reduction in ("mean", "sum"):
        teacher_hidden, teacher_weight = _teacher_inputs(teacher)
        weight_grad = _head_needs_grad(weights, bias)
        total, losses, *_ = torch.ops.eefast.linear_cross_entropy_multi.default(
            [as_rows(h) for h in hiddens],
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
            float(label_smoothing),
            float(softcap),
            _detached(class_weight),
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


def _check_lce_args(op, hidden, weight, targets, bias, teacher_hidden, teacher_weight, z_loss,
                    kd_weight, label_smoothing, softcap, class_weight):  # fmt: skip
    """The fake kernels' form of csrc/linear_cross_entropy's check_args."""
    check(hidden.dim() == 2, op, "hidden must be [tokens, d]")
    check(hidden.dtype.is_floating_point, op, "hidden must be floating point")
    check_dtype(op, "weight", weight, HEAD_DTYPES)
    check(weight.dim() == 2 and weight.shape[0] > 0, op, "weight must be [vocab, d], vocab > 0")
    check(hidden.shape[1] == weight.shape[1], op, "hidden and weight disagree on d")
    check(targets.dim() == 1 and targets.shape[0] == hidden.shape[0], op, "targets: [tokens]")
    check(targets.dtype == torch.int64, op, "targets must be int64")
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == weight.shape[0], op, "bias must be [vocab]")
    check((teacher_hidden is None) == (teacher_weight is None), op, "teacher comes in a pair")
    if teacher_hidden is not None:
        check(
            teacher_weight.dim() == 2 and teacher_weight.shape[0] == weight.shape[0], op,
            "teacher_weight must have the student's vocab",
        )  # fmt: skip
        check(
            teacher_hidden.dim() == 2
            and teacher_hidden.shape[0] == hidden.shape[0]
            and teacher_hidden.shape[1] == teacher_weight.shape[1],
            op,
            "teacher_hidden must be [tokens, teacher d]",
        )
    check(
        math.isfinite(z_loss) and z_loss >= 0 and math.isfinite(kd_weight) and kd_weight >= 0,
        op,
        "z_loss and kd_weight must be finite and >= 0",
    )
    check(kd_weight == 0 or teacher_hidden is not None, op, "kd_weight > 0 needs a teacher")
    check(0 <= label_smoothing <= 1, op, "label_smoothing must be in [0, 1]")
    check(math.isfinite(softcap) and softcap >= 0, op, "softcap must be finite and >= 0")
    if class_weight is not None:
        check(
            class_weight.dim() == 1
            and class_weight.shape[0] == weight.shape[0]
            and class_weight.dtype.is_floating_point,
            op,
            "class_weight must be a float [vocab]",
        )
    others = {"weight": weight, "targets": targets, "bias": bias,
              "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight,
              "class_weight": class_weight}  # fmt: skip
    for name, t in others.items():
        check_device(op, name, t, hidden)


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
    label_smoothing,
    softcap,
    class_weight,
    weight_grad,
):
    op = "linear_cross_entropy"
    _check_lce_args(op, hidden, weight, targets, bias, teacher_hidden, teacher_weight, z_loss,
                    kd_weight, label_smoothing, softcap, class_weight)  # fmt: skip
    check(0 <= reduction <= 2, op, "reduction must be 0 (none), 1 (mean) or 2 (sum)")
    loss = hidden.new_empty((hidden.shape[0],) if reduction == 0 else (), dtype=torch.float32)
    lse = hidden.new_empty((hidden.shape[0],), dtype=torch.float32)
    return (loss, *_lce_grad_shapes(hidden, weight, bias, reduction != 0, weight_grad), lse)


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
    label_smoothing,
    softcap,
    class_weight,
    weight_grad,
):
    op = "linear_cross_entropy_backward"
    _check_lce_args(op, hidden, weight, targets, bias, teacher_hidden, teacher_weight, z_loss,
                    kd_weight, label_smoothing, softcap, class_weight)  # fmt: skip
    check(grad_rows.dim() == 1 and grad_rows.shape[0] == hidden.shape[0], op, "grad_rows: [tokens]")
    return _lce_grad_shapes(hidden, weight, bias, True, weight_grad)


def _is_one(grad: torch.Tensor) -> bool:
    """Whether an upstream gradient is the scalar 1 (``loss.backward()``), checked eagerly on
    the CPU only (a device tensor would cost a sync): then the forward's gradients are returned
    without a scaled copy of the [vocab, d] weight gradient."""
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        return False  # traced (fake or functional tensors): no data-dependent branch
    return grad.device.type == "cpu" and grad.numel() == 1 and bool(grad == 1)


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
        label_smoothing,
        softcap,
        class_weight,
        weight_grad,
    ) = inputs
    _, grad_hidden, grad_weight, grad_bias, lse = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias, lse)
    # The other outputs get no gradient: without this, autograd would hand the backward a zero
    # tensor for each of them, a [vocab, d] one for grad_weight.
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.args = (ignore_index, z_loss, kd_weight, label_smoothing, softcap)
    ctx.weight_grad = weight_grad
    if reduction != 0:  # mean/sum: the forward already computed the gradients
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    else:  # none: recompute with the per-row upstream gradient
        ctx.save_for_backward(hidden, weight, targets, bias, teacher_hidden, teacher_weight,
                              class_weight)  # fmt: skip


def _lce_backward(ctx, grad_loss, *_unused):
    if ctx.reduction != 0:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if not _is_one(grad_loss):  # backward of loss itself: the forward's gradients as they are
            grad_hidden, grad_weight, grad_bias = (
                g * grad_loss.to(g.dtype) for g in (grad_hidden, grad_weight, grad_bias)
            )
    else:
        hidden, weight, targets, bias, teacher_hidden, teacher_weight, class_weight = (
            ctx.saved_tensors
        )
        grad_hidden, grad_weight, grad_bias = (
            torch.ops.eefast.linear_cross_entropy_backward.default(
                grad_loss.contiguous(),
                hidden,
                weight,
                targets,
                bias,
                teacher_hidden,
                teacher_weight,
                *ctx.args,
                class_weight,
                ctx.weight_grad,
            )
        )
    needs = ctx.needs_input_grad
    return (
        grad_hidden if needs[0] else None,
        grad_weight if needs[1] else None,
        None,
        grad_bias if len(needs) > 3 and needs[3] else None,
        *([None] * 10),
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
    label_smoothing,
    softcap,
    class_weight,
    weight_grad,
):
    op = "linear_cross_entropy_multi"
    check(len(hiddens) > 0, op, "no exits")
    torch._check(len(hiddens) == len(exit_weights), lambda: "one exit weight per exit")
    check(reduction in (1, 2), op, "reduction must be 1 (mean) or 2 (sum)")
    check(all(math.isfinite(c) for c in exit_weights), op, "exit weights must be finite")
    for h in hiddens:
        _check_lce_args(op, h, weight, targets, bias, teacher_hidden, teacher_weight, z_loss,
                        kd_weight, label_smoothing, softcap, class_weight)  # fmt: skip
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
    ctx.set_materialize_grads(False)  # as in _lce_setup_context
    ctx.n_exits = len(grad_hiddens)
    ctx.save_for_backward(grad_weight, grad_bias, *grad_hiddens)


def _lce_multi_backward(ctx, grad_total, *_unused):
    grad_weight, grad_bias, *grad_hiddens = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not _is_one(grad_total):
        grad_weight, grad_bias = (g * grad_total.to(g.dtype) for g in (grad_weight, grad_bias))
        grad_hiddens = [g * grad_total.to(g.dtype) for g in grad_hiddens]
    return (
        grad_hiddens,
        grad_weight if needs[1] else None,
        None,
        grad_bias if len(needs) > 3 and needs[3] else None,
        *([None] * 11),
    )[: len(needs)]


torch.library.register_autograd(
    "eefast::linear_cross_entropy_multi",
    _lce_multi_backward,
    setup_context=_lce_multi_setup_context,
)
