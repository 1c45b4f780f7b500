"""decode_linear: eefast against F.linear (eager) and torch.compile at decode row counts.

Shapes are SmolLM2-135M's: the MLP's up and down projections and the LM head. Row counts are
a decode step (1), a speculative verify step or decode batch (2-16) and the fallback limit.
Weights cycle through enough copies to leave the caches, as a real forward pass does, so the
numbers are bandwidth-bound like a model's.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import eefast
from eefast.timing import time_median

from .common import Row, peak_extra_memory_mib, seeded_generator

QUICK = {"rows": [1, 2, 5, 8, 16, 32], "shapes": [(1536, 576), (576, 1536), (49152, 576)]}
PROVIDERS = ["eefast", "eager", "compile"]
CACHE_BYTES = 256 * 2**20  # weights cycled per case: well past the last-level cache


def _cycler(weights, fn, x):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(weights)
        return fn(x, weights[state["i"]])

    return call


def run(rows, shapes, dtypes, providers, budget_s: float = 2.0) -> list[Row]:
    out = []
    compiled = torch.compile(F.linear, dynamic=True)
    for dtype, (n_out, n_in), n in itertools.product(dtypes, shapes, rows):
        gen = seeded_generator()
        w = (torch.randn(n_out, n_in, generator=gen) / n_in**0.5).to(dtype)
        copies = max(1, CACHE_BYTES // (w.numel() * w.element_size()))
        weights = [w.clone() for _ in range(copies)]
        x = torch.randn(n, n_in, generator=gen).to(dtype)
        case = {"rows": n, "out": n_out, "in": n_in, "dtype": str(dtype).removeprefix("torch.")}
        fns = {
            "eefast": _cycler(weights, eefast.ops.decode_linear, x),
            "eager": _cycler(weights, F.linear, x),
            "compile": _cycler(weights, compiled, x),
        }
        for provider in providers:
            seconds, _ = time_median(fns[provider], budget_s=budget_s)
            row = Row(
                "decode_linear",
                case,
                provider,
                seconds * 1e3,
                peak_extra_memory_mib(fns[provider]),
                {"weight_GBps": w.numel() * w.element_size() / seconds / 1e9},
            )
            out.append(row)
            print(
                f"  {case} {provider:<8} {row.ms:9.3f} ms  "
                f"W-stream {row.extra['weight_GBps']:.1f} GB/s",
                flush=True,
            )
    return out
