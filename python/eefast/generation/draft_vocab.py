"""A draft vocabulary: the exit heads cut down to the tokens that replies actually use.

During decoding an exit's LM head is the single largest weight read (SmolLM2: 49152 x 576, as
much as four blocks), and every draft and every exit check pays one. Restricted to the most
frequent tokens of the model's own replies, the head reads a fraction of the rows. In
speculative mode this stays lossless: the draft distribution is simply zero outside the
draft vocabulary, and the full-vocabulary verifier decides every token. In threshold mode it
is part of the (lossy) exit decision: the confidence is measured within the draft vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def frequent_tokens(blocks: torch.Tensor, size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``blocks`` (ties to the lower id), plus the ids
    in ``always`` (EOS and the chat markers, which must stay draftable), sorted."""
    if size <= 0:
        raise ValueError(f"draft vocabulary size must be > 0, got {size}")
    counts = torch.bincount(blocks.flatten())
    order = torch.argsort(-counts, stable=True)  # stable: equal counts keep id order
    keep = order[: min(size, int((counts > 0).sum()))]
    ids = torch.cat([keep, torch.tensor(list(always), dtype=torch.long)])
    return torch.unique(ids)


def coverage(blocks: torch.Tensor, ids: torch.Tensor) -> float:
    """The share of the tokens in ``blocks`` that lie in the vocabulary ``ids``."""
    return float(torch.isin(blocks, ids).float().mean())
