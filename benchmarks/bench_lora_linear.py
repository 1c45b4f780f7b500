"""lora_linear forward+backward: eefast against HF PEFT, eager PyTorch and torch.compile.

Every provider computes the same thing on the same tensors: y = x Wᵀ + s·(x Aᵀ) Bᵀ with W
frozen, then backward to x, A and B. `base` is the frozen linear alone (forward + input
grad), the floor any LoRA implementation pays; eefast/base is the LoRA overhead.
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn

import eefast
from eefast.ops.reference import lora_linear as lora_linear_reference
from eefast.timing import time_median

from .common import Row, peak_extra_memory_mib, seeded_generator

QUICK = {"tokens": [1, 512, 2048], "dims": [576, 2048], "ranks": [16]}
FULL = {"tokens": [1, 512, 2048], "dims": [576, 2048, 4096], "ranks": [8, 16, 64]}
PROVIDERS = ["eefast", "peft", "eager", "compile", "base"]
ALPHA = 16.0


def _peft_layer(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    out_f, in_f = weight.shape
    base = nn.Linear(in_f, out_f, bias=False, dtype=weight.dtype)
    base.weight = nn.Parameter(weight, requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = lora_a.shape[0]
        config = LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0)
        layer = PeftLoraLinear(base, "default", config=config, r=r, lora_alpha=ALPHA)
    layer.lora_A["default"].weight = nn.Parameter(lora_a)
    layer.lora_B["default"].weight = nn.Parameter(lora_b)
    return layer


def _forward_fn(provider: str, weight, lora_a, lora_b, scaling):
    if provider == "eefast":
        return lambda x: eefast.lora_linear(x, weight, None, lora_a, lora_b, scaling)
    if provider == "peft":
        return _peft_layer(weight, lora_a, lora_b)
    if provider == "eager":
        return lambda x: lora_linear_reference(x, weight, None, lora_a, lora_b, scaling)
    if provider == "compile":
        compiled = torch.compile(lora_linear_reference, dynamic=True)
        return lambda x: compiled(x, weight, None, lora_a, lora_b, scaling)
    if provider == "base":
        return lambda x: nn.functional.linear(x, weight)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def train_step(fwd, x, grad, leaves):
    """One forward+backward. The grads are dropped inside the step, so the memory baseline
    holds none of them and the measured peak includes the ones the step makes."""

    def step():
        fwd(x).backward(grad)
        for t in leaves:
            t.grad = None

    return step


def run(
    tokens, dims, ranks, dtypes, providers, budget_s: float = 2.0, slow_cap_s: float = 30.0
) -> list[Row]:
    """Every provider on every case. A provider whose warm-up call takes over slow_cap_s is
    recorded from that one call and not run on cases with as much work or more (same dtype):
    bf16 GEMMs in ATen on AVX2 CPUs take minutes per step at the largest shapes."""
    rows = []
    too_slow: dict[tuple[str, torch.dtype], int] = {}  # (provider, dtype) -> work that was
    for dtype, n, d, r in itertools.product(dtypes, tokens, dims, ranks):
        gen = seeded_generator()
        weight = torch.randn(d, d, generator=gen, dtype=dtype) / d**0.5
        lora_a = (torch.randn(r, d, generator=gen, dtype=dtype) / d**0.5).requires_grad_()
        lora_b = (torch.randn(d, r, generator=gen, dtype=dtype) / r**0.5).requires_grad_()
        x = torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_()
        grad = torch.randn(n, d, generator=gen, dtype=dtype)
        case = {"tokens": n, "d": d, "r": r, "dtype": str(dtype).removeprefix("torch.")}
        work = n * d * d
        for provider in providers:
            if work >= too_slow.get((provider, dtype), work + 1):
                print(
                    f"  {case} {provider:<8} skipped: slower than {slow_cap_s:.0f} s at less work"
                )
                continue
            fwd = _forward_fn(provider, weight, lora_a, lora_b, ALPHA / r)
            step = train_step(fwd, x, grad, (x, lora_a, lora_b))
            median_s, warmup_s = time_median(step, budget_s=budget_s)
            if warmup_s > slow_cap_s:
                too_slow[(provider, dtype)] = work
                ms, peak = warmup_s * 1e3, None
            else:
                ms, peak = median_s * 1e3, peak_extra_memory_mib(step)
            rows.append(Row("lora_linear", case, provider, ms, peak))
            print(f"  {case} {provider:<8} {ms:9.3f} ms  peak {peak} MiB", flush=True)
    return rows
