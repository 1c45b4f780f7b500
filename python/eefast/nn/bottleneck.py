"""BottleneckAdapter: ``residual + s · U(act(D x))`` on the fused ``bottleneck_adapter`` op."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import bottleneck_adapter


class BottleneckAdapter(nn.Module):
    """A down-projection, activation and up-projection, scaled and added to a residual.

    Called as ``adapter(x)`` it is a series adapter (``x + s·U(act(D x))``); called as
    ``adapter(x, residual)`` it is a parallel one beside the sublayer whose output is
    ``residual``. ``scaling`` is a float or ``"learned"`` (a trained scalar starting at 1).
    ``init="zero-up"`` zeroes U so a fresh adapter changes nothing; ``"normal"`` draws every
    weight from N(0, 0.02²), as LLM-Adapters' "bert" init does.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bottleneck_size: int,
        activation: str = "relu",
        scaling: float | str = 1.0,
        init: str = "zero-up",
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Linear(in_features, bottleneck_size, **kw)
        self.up = nn.Linear(bottleneck_size, out_features, **kw)
        self.activation, self.dropout = activation, dropout
        if scaling == "learned":
            self.scale = nn.Parameter(torch.ones((), device=device))
        else:
            self.register_buffer("scale", torch.tensor(float(scaling), device=device), False)
        with torch.no_grad():
            if init == "normal":
                for p in (self.down.weight, self.up.weight):
                    p.normal_(0.0, 0.02)
            else:
                self.up.weight.zero_()
            self.down.bias.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.dropout > 0.0 and self.training:
            # The dropped x feeds the adapter only; the residual stays the undropped stream.
            residual = x if residual is None else residual
            x = nn.functional.dropout(x, self.dropout, True)
        return bottleneck_adapter(
            x,
            self.down.weight,
            self.down.bias,
            self.up.weight,
            self.up.bias,
            self.scale,
            self.activation,
            residual,
        )
