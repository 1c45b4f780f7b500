"""Token choice: greedy, or sampling through temperature, top-k and top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """``temperature=0`` is greedy. Draft and verifier go through the same processors."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # NaN fails this too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The processed distribution over the vocab, for each row of logits [..., V]."""
        z = logits.float() / self.temperature
        if self.top_k and self.top_k < z.shape[-1]:
            kth = z.topk(self.top_k, dim=-1).values[..., -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_z, order = z.sort(dim=-1, descending=True)
            sorted_p = sorted_z.softmax(-1)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # smallest set reaching p
            z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
        return z.softmax(-1)

    def pick(self, logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """One token per row of logits [B, V]."""
        if self.greedy:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1, generator=gen).squeeze(-1)
