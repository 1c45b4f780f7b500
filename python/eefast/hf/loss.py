"""HF's causal-LM loss with the LM head fused into ``linear_cross_entropy``: the decoder stack
runs, then the fused op on its last hidden states, so ``[tokens, vocab]`` logits (and their
gradient) never exist. What adapter fine-tuning and ``eefast.patch`` both train on."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import linear_cross_entropy
from .arch import decoder_stack


def fused_causal_lm_loss(
    model: nn.Module, input_ids, attention_mask, labels, num_items_in_batch=None, **kwargs
) -> torch.Tensor:
    """HF's loss for ``model(..., labels=labels)``: the next token is the target, ``-100``
    ignored; the mean over labelled tokens, or with ``num_items_in_batch`` (HF Trainer's
    gradient accumulation) their sum divided by it; the logits soft-capped first where the
    config says so (Gemma-2). ``kwargs`` go to the decoder stack."""
    kwargs["use_cache"] = False
    out = decoder_stack(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    head = model.get_output_embeddings()
    softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:].to(hidden.device),
                                head.bias, reduction=reduction, softcap=softcap)  # fmt: skip
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=loss.dtype)
    return loss
