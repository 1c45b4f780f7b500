"""Lossless speculative decoding drafted by the backbone's own low-bit copy.

A float backbone's blocks and LM head are quantised once (``low_bit_draft``: GGUF Q4_1 or
Q8_0 blocks as llama.cpp makes them, in the formats ``quantize_backbone`` picks). Drafting
runs every block on that copy (one ``decode_block`` call per llama-family block, the block
module's own code on the other architectures), which reads a sixth (q4) or about a quarter
(int8) of float32's bytes per token, and whose argmax is the float model's on almost every
token. The float model then
verifies the drafts in one pass. SmolLM2's float weights are themselves the dequantised Q4_1
file, so its q4 copy differs only in how activations are rounded.

The draft shares the decoding state's KV cache: a draft step reads the verifier's exact keys
and values for every emitted token and writes its own, approximate, ones for the drafts. Those
slots are rolled back before the verify step, which writes the exact ones in their place. So
the draft needs no cache or prefill of its own.

A round, with the last emitted token x0 at slot S:

* draft: x0, then each draft, climbs the low-bit blocks one slot at a time; it stops after
  ``draft.k`` drafts (adaptive) or at the first draft whose top probability falls below
  ``threshold`` in every row (kept only if it is the first);
* verify: the cache rolls back to S, and x0 and the drafts run through the float blocks at
  once; each row accepts its own longest matching prefix (greedy) or follows speculative
  sampling, as in ``decode_speculative``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..exits.model import EarlyExitModel
from ..hf.quantize import formats, quantize_block
from ..nn.quantized import QuantizedLinear, quantize, quantized_linear
from .blocks import FusedBlock, fused_block
from .cache import DecodeState
from .decode import DecodeStats, DraftLength, Outputs, _emit_each, verify
from .runner import Runner
from .sampling import Sampling

DRAFT_WEIGHTS = ("q4", "int8")


@dataclass
class LowBitDraft:
    """A backbone's low-bit copy: per block, ``decode_block``'s arguments where the block
    qualifies for it (the llama family), else a low-bit copy of the block module; and the LM
    head's (qweight, scales, bias)."""

    weights: str
    blocks: list[FusedBlock | nn.Module]
    head: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def low_bit_draft(ee: EarlyExitModel, weights: str = "q4") -> LowBitDraft:
    """Quantise ``ee``'s float32 backbone into a draft for ``generate(..., draft=...)``: a copy
    of every block with its linears low-bit and of the LM head, in the formats
    ``quantize_backbone`` uses (``hf.quantize.formats``). The model is not changed.
    Blocks with hooks or adapters are refused (merge adapters first); q4 runs on the CPU."""
    if weights not in DRAFT_WEIGHTS:
        raise ValueError(f"low_bit_draft: weights must be one of {DRAFT_WEIGHTS}, got {weights!r}")
    parts = ee.parts
    head = parts.lm_head
    if any(isinstance(m, QuantizedLinear) for m in parts.layers.modules()):
        raise ValueError(
            "low_bit_draft: the backbone must be float32, and this one's blocks are already "
            "low-bit (what a draft would be); decode it as it is"
        )
    if head.weight.dtype != torch.float32:
        raise ValueError(f"low_bit_draft: the backbone must be float32, not {head.weight.dtype}")
    if weights == "q4" and head.weight.device.type != "cpu":
        device = head.weight.device
        raise ValueError(f"low_bit_draft: q4 runs on the CPU only for now, not {device}")
    blocks = []
    block_format, head_format = formats(ee.model, weights)
    for i, layer in enumerate(parts.layers):
        if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
            raise ValueError(f"low_bit_draft: block {i} has hooks (adapters?); merge them first")
        low_bit = quantize_block(copy.deepcopy(layer), block_format, f"block {i}")
        left = [type(m).__name__ for m in low_bit.modules() if not isinstance(m, QuantizedLinear)
                and getattr(m, "weight", None) is not None and m.weight.dim() == 2]  # fmt: skip
        if left:
            raise ValueError(f"low_bit_draft: block {i} has modules it cannot quantise: {left}")
        blocks.append(fused_block(low_bit, parts.spec) or low_bit)
    q, s = quantize(head.weight.detach(), head_format)
    return LowBitDraft(weights, blocks, (q, s, head.bias))


def decode_low_bit_draft(
    runner: Runner,
    state: DecodeState,
    logits: torch.Tensor,
    out: Outputs,
    sampling: Sampling,
    gen,
    draft: DraftLength,
    threshold: float,
    low_bit: LowBitDraft,
) -> DecodeStats:
    """Speculative decoding with ``low_bit`` drafting after ``prefill``: greedy output equals
    full-depth greedy, sampled output follows the full model's distribution."""
    stats = DecodeStats()
    L = runner.num_layers
    x0 = sampling.pick(logits, gen)
    (x0,) = out.drop(_emit_each(out, stats, x0, [L] * len(x0)), state, x0)
    while out.rows:
        batch, device = x0.shape[0], x0.device
        start = state.slots
        one = torch.ones(batch, 1, dtype=torch.bool, device=device)
        tok, drafts, q_probs = x0, [], []
        while len(drafts) < draft.k:
            state.add_slots(one)
            h = runner.run(runner.embed(tok[:, None], state), 0, L, state, blocks=low_bit.blocks)
            tok, conf, q = _draft_token(runner, h[:, -1], low_bit, sampling, gen)
            if drafts and not bool((conf >= threshold).any()):
                break
            drafts.append(tok)
            q_probs.append(q)
        state.truncate(start)  # the drafts' approximate KV makes way for the verifier's
        m = len(drafts)
        dr = torch.stack(drafts, 1)
        state.add_slots(torch.ones(batch, m + 1, dtype=torch.bool, device=device))
        h = runner.run(runner.embed(torch.cat([x0[:, None], dr], 1), state), 0, L, state)
        v = verify(out, stats, state, start, runner.final_logits(h), dr, q_probs, sampling, gen, L)
        draft.update(v.all_accepted)
        (x0,) = out.drop(v.finished, state, v.next_token)
        state.trim()
    return stats


def _draft_token(runner: Runner, h: torch.Tensor, low_bit: LowBitDraft, sampling: Sampling, gen):
    """(token, confidence, q or None) of the low-bit head on the top hidden state h [B, d]."""
    runner.head_calls += 1
    logits = quantized_linear(runner.ee.parts.final_norm(h), *low_bit.head).float()
    if sampling.greedy:
        conf, tok = logits.softmax(-1).max(-1)
        return tok, conf, None
    q = sampling.probs(logits)
    return torch.multinomial(q, 1, generator=gen).squeeze(-1), q.amax(-1), q
