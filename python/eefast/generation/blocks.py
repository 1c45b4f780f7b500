"""A llama-family decoder block called without module dispatch, or as one fused op.

At batch 1 a SmolLM2 block's weights stream in about 1.4 ms, and calling HF's block module
(its submodules, decorators and attention-interface lookup) adds a noticeable share on top.
``lean_block`` runs the same operations in the same order, with the block's own rotary and
the attention function the module would pick (eager or SDPA), and the linears on
``decode_linear``, so its output is bit-identical to the module's under
``Runner.decode_linears`` (tested). Only blocks that are exactly HF's qualify; one with
hooks, adapters or another attention backend runs through its module.

``fused_block`` goes further for decode steps: the whole block is one ``decode_block`` call
(CPU kernel in float32), which computes each row alone in a fixed order. Its output is close
to the module's, not bit-identical, but a token's output no longer depends on what else is in
the call, which is what speculative decoding needs to be exact.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..hf.arch import ArchSpec
from ..nn.quantized import QuantizedLinear
from ..ops import decode_block, decode_linear

_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def hf_rotary(attn: nn.Module):
    """``apply_rotary_pos_emb`` of the attention module's own modeling file (None if absent)."""
    return getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)


def lean_attention(layer: nn.Module):
    """The attention function this block's module calls, when ``lean_block`` computes exactly
    what the module computes; else None."""
    if layer.training or any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
        return None  # a hook library (adapters) changes the computation
    try:
        linears = [layer.get_submodule(name) for name in _LINEARS]
    except AttributeError:
        return None
    kinds = {getattr(m, "kind", type(m)) for m in linears}
    if len(kinds) != 1 or {type(m) for m in linears} - {nn.Linear, QuantizedLinear}:
        return None  # mixed, or another module
    if any("forward" in m.__dict__ for m in linears):
        return None  # patched by a hook library
    attn = layer.self_attn
    modeling = sys.modules[type(attn).__module__]
    impl = getattr(attn.config, "_attn_implementation", None)
    if impl not in ("eager", "sdpa") or hf_rotary(attn) is None:
        return None
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, modeling.eager_attention_forward)


@dataclass
class FusedBlock:
    """A block's tensors and constants in ``decode_block``'s order (int8 weights come with
    their scales; GGUF blocks need none)."""

    norms: tuple[torch.Tensor, torch.Tensor]
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    eps: float
    scaling: float
    kv_heads: int
    head_dim: int
    scales: list[torch.Tensor] | None = None


def fused_block(layer: nn.Module, spec: ArchSpec) -> FusedBlock | None:
    """The ``decode_block`` arguments of a block that qualifies for ``lean_block`` and whose
    norms, MLP and activation are the ones the architecture table names; else None."""
    names = spec.decode_block
    if names is None or lean_attention(layer) is None:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if (
        any(type(n).__name__ != names.norm for n in norms)
        or norms[0].variance_epsilon != norms[1].variance_epsilon
        or type(mlp).__name__ != names.mlp
        or type(mlp.act_fn).__name__ not in names.act
    ):
        return None
    linears = [layer.get_submodule(name) for name in _LINEARS]
    low_bit = isinstance(linears[0], QuantizedLinear)
    int8 = low_bit and linears[0].kind == "int8"
    return FusedBlock(
        norms=(norms[0].weight, norms[1].weight),
        weights=[m.qweight if low_bit else m.weight for m in linears],
        biases=[m.bias for m in linears],
        eps=float(norms[0].variance_epsilon),
        scaling=float(attn.scaling),
        kv_heads=attn.k_proj.out_features // attn.head_dim,
        head_dim=attn.head_dim,
        scales=[m.scales for m in linears] if int8 else None,
    )


def run_fused(block: FusedBlock, layer_idx: int, h, cos, sin, allowed, cache) -> torch.Tensor:
    """``block`` on h [batch, q, d] as one ``decode_block`` call; the new keys and values go to
    the cache's next q slots of this layer."""
    batch, q = h.shape[:2]
    keys, values, first = cache.append(layer_idx, (batch, block.kv_heads, q, block.head_dim), h)
    return decode_block(h, cos, sin, allowed, keys, values, first, block.norms, block.weights,
                        block.biases, block.eps, block.scaling, block.scales)  # fmt: skip


def _linear(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    if type(m) is QuantizedLinear:
        return m(x)
    return decode_linear(x, m.weight, m.bias)


def lean_block(layer, attention, h, position_embeddings, mask, cache) -> torch.Tensor:
    """HF's llama-family decoder block forward on h [batch, q, d] with an additive mask, a
    cache that implements ``update`` and ``attention`` from ``lean_attention``."""
    attn, mlp = layer.self_attn, layer.mlp
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    rotary = hf_rotary(attn)
    shape = (*h.shape[:-1], -1, attn.head_dim)

    x = type(norm1).forward(norm1, h)
    q = _linear(x, attn.q_proj).view(shape).transpose(1, 2)
    k = _linear(x, attn.k_proj).view(shape).transpose(1, 2)
    v = _linear(x, attn.v_proj).view(shape).transpose(1, 2)
    q, k = rotary(q, k, *position_embeddings)
    k, v = cache.update(k, v, attn.layer_idx)
    o, _ = attention(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
    h = h + _linear(o.reshape(*h.shape[:-1], -1).contiguous(), attn.o_proj)

    x = type(norm2).forward(norm2, h)
    return h + _linear(
        mlp.act_fn(_linear(x, mlp.gate_proj)) * _linear(x, mlp.up_proj), mlp.down_proj
    )
