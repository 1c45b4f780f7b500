"""A tiny learned exit decision: per exit, a logistic probe on the hidden state the exit's LM
head would read, estimating P(this exit's argmax equals the full model's).

Its point is cost: answering "not yet" takes one d-wide dot product per token, where max-prob,
margin and entropy all need the exit's full LM head first.
"""

from __future__ import annotations

import torch
from torch import nn


class ExitClassifier(nn.Module):
    def __init__(self, layers: list[int], hidden_size: int):
        super().__init__()
        self.probes = nn.ModuleDict({str(layer): nn.Linear(hidden_size, 1) for layer in layers})

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self.probes]

    def logit(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] (the exit's pre-head hidden state) -> logit [...]."""
        probe = self.probes[str(layer)]
        return probe(h.to(probe.weight.dtype)).squeeze(-1)

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The probability that exit ``layer`` already has the final answer, in [0, 1]."""
        return torch.sigmoid(self.logit(layer, h).float())
