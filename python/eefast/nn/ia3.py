"""IA3Linear: a frozen linear layer whose output (or, for a feed-forward layer, input) is scaled
by a learned vector, as in (IA)³ and PEFT's IA3 layers."""

from __future__ import annotations

import torch
from torch import nn


class IA3Linear(nn.Module):
    """``(W x + b) ⊙ l`` or, with ``feedforward``, ``W (x ⊙ l) + b``.

    ``weight``/``bias`` are the wrapped layer's own frozen parameters (``[in, out]`` with
    ``fan_in_fan_out``, GPT-2's Conv1D layout). ``ia3_l`` starts at one, so a fresh module is
    the base layer; its shape is PEFT's: ``[out, 1]``, or ``[1, in]`` for feed-forward.
    ``merge()`` scales the weight (and, for output scaling, the bias) in place.
    """

    def __init__(self, linear: nn.Module, feedforward: bool) -> None:
        super().__init__()
        w = linear.weight
        self.fan_in_fan_out = not isinstance(linear, nn.Linear)
        self.in_features, self.out_features = w.shape if self.fan_in_fan_out else w.shape[::-1]
        self.feedforward = feedforward
        self.weight = nn.Parameter(w.data, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, False)
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=w.dtype))
        self.merged = False
        self.enabled = True

    def base_weight(self) -> torch.Tensor:
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return nn.functional.linear(x, self.base_weight(), self.bias)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return nn.functional.linear(x * scale, self.base_weight(), self.bias)
        return nn.functional.linear(x, self.base_weight(), self.bias) * scale

    def _weight_scale(self) -> torch.Tensor:
        """``ia3_l`` shaped to broadcast over ``weight`` in its stored layout."""
        lw = self.ia3_l.float()  # [out, 1] or [1, in], for an [out, in] weight
        return lw.t() if self.fan_in_fan_out else lw

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if (self.ia3_l == 0).any():
            raise ValueError("IA3Linear.merge: a scaling entry is 0; the merge could not be undone")
        scaled = self.weight.float() * self._weight_scale()
        if not torch.isfinite(scaled).all():
            raise ValueError("IA3Linear.merge: the merged weight is not finite; refusing to merge")
        self.weight.copy_(scaled)
        if self.bias is not None and not self.feedforward:
            self.bias.copy_(self.bias.float() * self.ia3_l.float().flatten())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self.weight.float() / self._weight_scale())
        if self.bias is not None and not self.feedforward:
            self.bias.copy_(self.bias.float() / self.ia3_l.float().flatten())
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"feedforward={self.feedforward}, merged={self.merged}, enabled={self.enabled}"
        )
