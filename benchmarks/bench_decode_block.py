"""decode_block: one fused call against HF's LlamaDecoderLayer (eager module) and the same
layer under torch.compile, for a decode step, a speculative verify step and a decode batch.

The blocks are SmolLM2-135M's shape (d 576, 9 heads, 3 kv heads, MLP 1536) with random weights,
and each call moves on to the next of 30 blocks, as a forward pass does, so the weights stream
from memory like a model's. Each call attends over a 256-slot cache and writes its new keys and
values to the same slots every time.
"""

from __future__ import annotations

import itertools

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from eefast.generation.blocks import fused_block
from eefast.hf import ARCHS
from eefast.ops import decode_block
from eefast.timing import time_median

from .common import Row, peak_extra_memory_mib, seeded_generator

QUICK = {"shapes": [(1, 1), (1, 5), (4, 1), (4, 5)], "cache": 256, "layers": 30}
PROVIDERS = ["eefast", "eager", "compile"]


class _FixedSlots:
    """The cache interface HF attention calls: writes the step's keys and values at slots
    [cache_len, cache_len + q) and returns the filled prefix, the same slots on every call."""

    def __init__(self, keys, values, cache_len):
        self.keys, self.values, self.cache_len = keys, values, cache_len

    def update(self, key, value, layer_idx, cache_kwargs=None):
        end = self.cache_len + key.shape[2]
        self.keys[:, :, self.cache_len : end] = key
        self.values[:, :, self.cache_len : end] = value
        return self.keys[:, :, :end], self.values[:, :, :end]


def _smollm2_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=layers, rms_norm_eps=1e-5, rope_theta=100000.0,
        attn_implementation="sdpa",
    )  # fmt: skip


def _calls(blocks, fused, compiled, config, batch: int, q: int, cache: int, dtype, gen) -> dict:
    """provider -> a call that runs the next block on one step of ``q`` tokens per sequence."""
    hd = config.hidden_size // config.num_attention_heads
    h = torch.randn(batch, q, config.hidden_size, generator=gen).to(dtype)
    pos = torch.arange(cache, cache + q).expand(batch, q)
    cos, sin = LlamaRotaryEmbedding(config)(h, position_ids=pos)
    allowed = torch.ones(batch, q, cache + q, dtype=torch.bool).tril(cache)
    mask = torch.zeros(batch, 1, q, cache + q, dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    kv = [torch.randn(batch, 3, cache + q, hd, generator=gen).to(dtype) for _ in range(2)]
    slots = _FixedSlots(*kv, cache)
    turn = itertools.cycle(range(len(blocks)))

    def eefast_call():
        b = fused[next(turn)]
        return decode_block(h, cos, sin, allowed, *kv, cache, b.norms, b.weights, b.biases,
                            b.eps, b.scaling)  # fmt: skip

    def module_call(modules):
        def call():
            with torch.no_grad():
                return modules[next(turn)](
                    h, attention_mask=mask, position_ids=pos, past_key_values=slots,
                    position_embeddings=(cos, sin),
                )  # fmt: skip

        return call

    return {"eefast": eefast_call, "eager": module_call(blocks), "compile": module_call(compiled)}


def run(shapes, cache: int, layers: int, dtypes, providers, budget_s: float = 2.0) -> list[Row]:
    out = []
    config = _smollm2_config(layers)
    gen = seeded_generator()
    for dtype in dtypes:
        blocks = [LlamaDecoderLayer(config, i).to(dtype).eval() for i in range(layers)]
        for p in (p for block in blocks for p in block.parameters()):
            p.requires_grad_(False)
            p.normal_(0, 0.02, generator=gen)
        fused = [fused_block(block, ARCHS["llama"]) for block in blocks]
        compiled = [torch.compile(block) for block in blocks]
        for batch, q in shapes:
            fns = _calls(blocks, fused, compiled, config, batch, q, cache, dtype, gen)
            case = {"batch": batch, "q": q, "cache": cache, "dtype": str(dtype).split(".")[-1]}
            for provider in providers:
                for _ in range(layers):  # compiles every block before timing
                    fns[provider]()
                seconds, _ = time_median(fns[provider], budget_s=budget_s)
                row = Row("decode_block", case, provider, seconds * 1e3,
                          peak_extra_memory_mib(fns[provider]))  # fmt: skip
                out.append(row)
                print(f"  {case} {provider:<8} {row.ms:9.3f} ms", flush=True)
    return out
