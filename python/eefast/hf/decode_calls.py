"""How generation calls each architecture's own modules (the ``decode`` column of the
architecture table, arch.py): the token (and learned position) embedding, what every block of
a run shares (rotary tables or ALiBi biases) and the block call itself, over a KV cache that
implements HF's ``update``.

Positions always count a sequence's valid slots (``DecodeState.pos``), so left padding,
rejected drafts and finished rows never shift them, whichever way the architecture encodes
them:

* learned absolute positions, added to the embedding: gpt2, opt (with OPT's offset of 2,
  inside its embedding module);
* rotary tables computed once per run by the model's rotary module: llama, mistral, qwen2,
  gpt_neox (partial rotary, ``rotary_pct``);
* rotary inside the attention from position ids: gptj (``rotary_dim``);
* ALiBi, a bias on each key from its position: bloom, built from the valid slots as HF
  builds it from the attention mask.

Every block takes the additive ``[batch, 1, q, keys]`` mask of the valid, causal (and, with a
sliding window, recent) slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DecodeCalls:
    # (decoder stack, token ids [B, q], positions [B, q]) -> hidden states [B, q, d]
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    # (decoder stack, h, positions [B, q], valid key slots [B, keys]) -> block kwargs
    shared: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict]
    # (block, h, additive mask, cache, positions, shared kwargs) -> h
    call: Callable[..., object]
    # CALM's KV propagation (threshold mode, kv="propagate") knows these blocks' projections
    propagates_kv: bool = False
    # Positions come from DecodeState.pos alone (not from counting valid key slots), so the
    # candidates of a draft tree can share one
    explicit_positions: bool = True


def _rotary(stack, h, pos, _valid) -> dict:
    return {"position_embeddings": stack.rotary_emb(h, position_ids=pos)}


def _nothing(_stack, _h, _pos, _valid) -> dict:
    return {}


def _alibi(stack, h, _pos, valid) -> dict:
    return {"alibi": stack.build_alibi_tensor(valid.long(), stack.num_heads, h.dtype)}


def _llama_call(block, h, mask, cache, pos, shared):
    return block(h, attention_mask=mask, position_ids=pos, past_key_values=cache,
                 use_cache=True, **shared)  # fmt: skip


def _neox_call(block, h, mask, cache, pos, shared):
    return block(h, attention_mask=mask, position_ids=pos, layer_past=cache, use_cache=True,
                 **shared)  # fmt: skip


def _gpt2_call(block, h, mask, cache, _pos, _shared):
    return block(h, past_key_values=cache, attention_mask=mask, use_cache=True)


def _opt_embed(stack, ids, pos):
    h = stack.embed_tokens(ids)
    if stack.project_in is not None:
        h = stack.project_in(h)
    return h + stack.embed_positions(None, 0, position_ids=pos)


def _bloom_call(block, h, mask, cache, _pos, shared):
    return block(h, shared["alibi"], mask, layer_past=cache, use_cache=True)


def _gptj_call(block, h, mask, cache, pos, _shared):
    return block(h, layer_past=cache, attention_mask=mask, position_ids=pos, use_cache=True)


LLAMA_CALLS = DecodeCalls(lambda s, ids, _pos: s.embed_tokens(ids), _rotary, _llama_call, True)
GPT2_CALLS = DecodeCalls(lambda s, ids, pos: s.wte(ids) + s.wpe(pos), _nothing, _gpt2_call)
OPT_CALLS = DecodeCalls(_opt_embed, _nothing, _llama_call)
GPT_NEOX_CALLS = DecodeCalls(lambda s, ids, _pos: s.embed_in(ids), _rotary, _neox_call)
BLOOM_CALLS = DecodeCalls(
    lambda s, ids, _pos: s.word_embeddings_layernorm(s.word_embeddings(ids)),
    _alibi,
    _bloom_call,
    explicit_positions=False,
)
GPTJ_CALLS = DecodeCalls(lambda s, ids, _pos: s.wte(ids), _nothing, _gptj_call)
