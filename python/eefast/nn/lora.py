"""LoRALinear: a frozen linear layer plus a trainable low-rank update, on the fused op."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import lora_linear


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) · B(A(dropout(x)))``, computed by ``eefast.lora_linear``.

    The base ``weight``/``bias`` are frozen buffers-by-convention (``requires_grad=False``);
    only ``lora_a [r, in]`` and ``lora_b [out, r]`` train. ``lora_b`` starts at zero, so a fresh
    module computes exactly the base layer. ``merge()`` folds the update into ``weight`` for
    inference and ``unmerge()`` takes it out again. ``fan_in_fan_out`` stores ``weight`` as
    ``[in, out]``, the layout of GPT-2's Conv1D, so a wrapped Conv1D keeps its parameter.
    ``enabled = False`` computes the base layer alone.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRALinear: r must be a positive integer, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: dropout must be in [0, 1), got {dropout}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        self.dropout = dropout
        self.fan_in_fan_out = fan_in_fan_out
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(*shape, **kw), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None
        )
        self.lora_a = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r, **kw))
        self.merged = False
        self.enabled = True
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @classmethod
    def from_linear(
        cls, linear: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear`` or Conv1D; its weight and bias are shared, not copied."""
        w = linear.weight
        conv1d = not isinstance(linear, nn.Linear)  # GPT-2's Conv1D: weight [in, out]
        in_f, out_f = w.shape if conv1d else w.shape[::-1]
        module = cls(
            in_f,
            out_f,
            r,
            alpha,
            dropout,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
            fan_in_fan_out=conv1d,
        )
        module.weight = nn.Parameter(w.data, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return module

    def base_weight(self) -> torch.Tensor:
        """``weight`` as ``[out, in]`` (a view for fan_in_fan_out)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return nn.functional.linear(x, self.base_weight(), self.bias)
        return lora_linear(
            x,
            self.base_weight(),
            self.bias,
            self.lora_a,
            self.lora_b,
            self.scaling,
            self.dropout,
            self.training,
        )

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` in fp32, in the layout of ``weight``: what ``merge()`` adds."""
        delta = self.scaling * (self.lora_b.float() @ self.lora_a.float())
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the low-rank update into ``weight`` (inference only; idempotent)."""
        if self.merged:
            return
        merged = self.weight.float() + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("LoRALinear.merge: the merged weight is not finite; refusing to merge")
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the low-rank update back out of ``weight`` (idempotent)."""
        if not self.merged:
            return
        self.weight.copy_(self.weight.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, dropout={self.dropout}, merged={self.merged}, "
            f"enabled={self.enabled}"
        )
