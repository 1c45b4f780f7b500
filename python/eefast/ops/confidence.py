"""exit_stats: an exit head's softmax statistics (the exit's confidence) without logits.

Schema and kernels: csrc/exit_stats/. Forward only. Here: the wrapper and the fake kernel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import FLOAT_DTYPES, HEAD_DTYPES, check, check_device, check_dtype

_F32 = torch.finfo(torch.float32)


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


@torch.library.register_fake("eefast::exit_stats")
def _exit_stats_fake(hidden, weight, bias=None, temperature=1.0):
    op = "exit_stats"
    check(hidden.dim() >= 1, op, "hidden must be [..., d]")
    check_dtype(op, "hidden", hidden, FLOAT_DTYPES)
    check_dtype(op, "weight", weight, HEAD_DTYPES)
    check_device(op, "weight", weight, hidden)
    check(weight.dim() == 2, op, "weight must be 2-D [vocab, d]")
    check(weight.shape[0] > 0, op, "weight has an empty vocab")
    torch._check(
        hidden.shape[-1] == weight.shape[1],
        lambda: (
            f"exit_stats: hidden has d={hidden.shape[-1]} "
            f"but weight is [vocab, d={weight.shape[1]}]"
        ),
    )
    if bias is not None:
        check(bias.dtype == weight.dtype, op, "bias must have weight's dtype")
        check_device(op, "bias", bias, hidden)
        check(bias.dim() == 1 and bias.shape[0] == weight.shape[0], op, "bias must be [vocab]")
    check(
        math.isfinite(temperature) and temperature >= _F32.tiny and 1.0 / temperature <= _F32.max,
        op,
        f"temperature must be a finite float32 number >= {_F32.tiny} (a normal float)",
    )
    lead = hidden.shape[:-1]
    f32 = hidden.new_empty(lead, dtype=torch.float32)
    return f32, f32.clone(), hidden.new_empty(lead, dtype=torch.int64), f32.clone(), f32.clone()
