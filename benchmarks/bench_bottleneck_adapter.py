"""bottleneck_adapter forward+backward: eefast against the eager module and torch.compile of it.

Every provider computes out = h + s·U(act(D h + b_d)) + s·b_u (a series adapter, Pfeiffer
style, as LLM-Adapters places it) on the same tensors, then backward to h and all four adapter
parameters. `eager` is bottleneck_adapter_reference, the module a user writes by hand.
"""

from __future__ import annotations

import itertools

import torch

import eefast
from eefast.ops.reference import bottleneck_adapter as bottleneck_adapter_reference
from eefast.timing import time_median

from .common import Row, peak_extra_memory_mib, seeded_generator

QUICK = {"tokens": [256, 2048], "dims": [576, 2048], "ranks": [64]}
FULL = {"tokens": [1, 256, 2048, 8192], "dims": [576, 2048, 4096], "ranks": [16, 64, 256]}
PROVIDERS = ["eefast", "eager", "compile"]
ACTIVATION = "relu"
SCALE = 1.0


def _forward_fn(provider: str):
    if provider == "eefast":
        return eefast.bottleneck_adapter
    if provider == "eager":
        return bottleneck_adapter_reference
    if provider == "compile":
        return torch.compile(bottleneck_adapter_reference, dynamic=True)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def run(tokens, dims, ranks, dtypes, providers, budget_s: float = 2.0) -> list[Row]:
    rows = []
    for dtype, n, d, r in itertools.product(dtypes, tokens, dims, ranks):
        gen = seeded_generator()
        params = [
            (torch.randn(r, d, generator=gen, dtype=dtype) / d**0.5).requires_grad_(),
            torch.zeros(r, dtype=dtype).requires_grad_(),
            (torch.randn(d, r, generator=gen, dtype=dtype) / r**0.5).requires_grad_(),
            torch.zeros(d, dtype=dtype).requires_grad_(),
        ]
        x = torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_()
        grad = torch.randn(n, d, generator=gen, dtype=dtype)
        case = {"tokens": n, "d": d, "r": r, "dtype": str(dtype).removeprefix("torch.")}
        for provider in providers:
            fwd = _forward_fn(provider)

            def step(fwd=fwd, inputs=(x, *params), grad=grad):
                fwd(*inputs, SCALE, ACTIVATION).backward(grad)
                for t in inputs:
                    t.grad = None

            median_s, _ = time_median(step, budget_s=budget_s)
            peak = peak_extra_memory_mib(step)
            rows.append(Row("bottleneck_adapter", case, provider, median_s * 1e3, peak))
            print(f"  {case} {provider:<8} {median_s * 1e3:9.3f} ms  peak {peak} MiB", flush=True)
    return rows
