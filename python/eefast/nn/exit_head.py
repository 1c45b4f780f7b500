"""ExitHead: an early-exit head, i.e. an optional block, an optional norm and an LM head.

The kinds follow EE-Tuning: ``embed`` (LM head only), ``norm`` (norm + LM head), ``mlp`` (a
residual MLP + norm + LM head) and ``layer`` (a whole decoder block + norm + LM head). A
``draft`` exit (EAGLE-style, see ``FeatureDraft``) sits on top of the last block instead:
from the top feature of one token and the embedding of the next, it predicts the next top
feature. The head returns the normed hidden state; the LM-head product lives in the fused ops
(`linear_cross_entropy`, `exit_stats`), so `[tokens, vocab]` logits are never built.
"""

from __future__ import annotations

import torch
from torch import nn

EXIT_KINDS = ("embed", "norm", "mlp", "layer", "draft")


def block_output(out) -> torch.Tensor:
    """The hidden states a decoder block returned (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class ResidualMLP(nn.Module):
    """``h + mlp(norm(h))``: the MLP half of a pre-norm decoder block, as an exit's body."""

    def __init__(self, norm: nn.Module, mlp: list[nn.Module], adds_residual: bool = False):
        super().__init__()
        self.norm = norm
        self.mlp = nn.Sequential(*mlp)
        self.adds_residual = adds_residual  # BLOOM's MLP takes (x, residual) and adds it itself

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.adds_residual:
            return self.mlp[0](self.norm(h), h)
        return h + self.mlp(self.norm(h))


def previous_features(feats: torch.Tensor) -> torch.Tensor:
    """feats [batch, seq, d] one position later (zeros first): what a draft exit pairs with
    each position's token."""
    return torch.cat([torch.zeros_like(feats[:, :1]), feats[:, :-1]], 1)


class FeatureDraft(nn.Module):
    """The body of a ``draft`` exit: ``block(fc([embed(x_s), f_{s-1}]))``, where f is the
    model's final-normed top feature. After the exit's norm it stands in for f_s: the LM head
    reads it and the next draft step feeds it back. One block per drafted token,
    instead of climbing through the lower blocks of the model."""

    def __init__(self, fc: nn.Linear, block: nn.Module):
        super().__init__()
        self.fc = fc
        self.block = block

    def forward(self, x: torch.Tensor, block_args: tuple = (), block_kwargs=None) -> torch.Tensor:
        return block_output(self.block(self.fc(x), *block_args, **(block_kwargs or {})))


class ExitHead(nn.Module):
    """One exit. ``lm_head`` is None when the exit shares the model's frozen LM head."""

    def __init__(
        self,
        kind: str,
        norm: nn.Module | None,
        lm_head: nn.Linear | None,
        block: nn.Module | None = None,
    ):
        super().__init__()
        if kind not in EXIT_KINDS:
            raise ValueError(f"unknown exit kind {kind!r}; choose from {EXIT_KINDS}")
        self.kind = kind
        self.block = block
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, h: torch.Tensor, block_args: tuple = (), block_kwargs=None) -> torch.Tensor:
        """The exit's hidden state just before its LM head, from the exit layer's output ``h``.

        ``block_args``/``block_kwargs`` are what the backbone passed its blocks (positions,
        masks) minus the hidden states; only a ``layer`` exit uses them.
        """
        if self.kind == "layer":
            h = block_output(self.block(h, *block_args, **(block_kwargs or {})))
        elif self.kind == "draft":  # h: [embed(x_s), f_{s-1}], see EarlyExitModel.exit_hidden
            h = self.block(h, block_args, block_kwargs)
        elif self.kind == "mlp":
            h = self.block(h)
        return h if self.norm is None else self.norm(h)
