"""exit_stats: eefast against eager PyTorch and torch.compile of the same statistics.

The reference computes full [N, vocab] logits, then log_softmax, max/argmax, entropy and the
top-2 margin. At decode (few rows) the floor is reading the LM-head weight once, so the eefast
rows also report the weight-streaming bandwidth next to this machine's copy bandwidth,
measured in the same run.
"""

from __future__ import annotations

import itertools

import torch

import eefast
from eefast.timing import time_median

from .common import Row, peak_extra_memory_mib, seeded_generator

QUICK = {"rows": [1, 8, 2048], "d": 576, "vocab": 49152}
PROVIDERS = ["eefast", "eager", "compile"]


def eager_stats(hidden: torch.Tensor, weight: torch.Tensor):
    logits = hidden.float() @ weight.float().t()
    logp = logits.log_softmax(-1)
    top = logp.topk(2, dim=-1)
    p = top.values.exp()
    entropy = -(logp.exp() * logp).sum(-1)
    return logits.logsumexp(-1), p[..., 0], top.indices[..., 0], entropy, p[..., 0] - p[..., 1]


def copy_bandwidth_gbps(numel: int = 64 * 2**20) -> float:
    """Bytes read plus written per second by a large tensor copy."""
    src, dst = torch.randn(numel // 4), torch.empty(numel // 4)
    seconds, _ = time_median(lambda: dst.copy_(src), budget_s=0.5)
    return 2 * src.numel() * 4 / seconds / 1e9


def run(rows, d, vocab, dtypes, providers, budget_s: float = 2.0) -> list[Row]:
    out = []
    copy_gbps = copy_bandwidth_gbps()
    print(f"  copy bandwidth (read + write): {copy_gbps:.1f} GB/s")
    compiled = torch.compile(eager_stats, dynamic=True)
    for dtype, n in itertools.product(dtypes, rows):
        gen = seeded_generator()
        weight = (torch.randn(vocab, d, generator=gen) / d**0.5).to(dtype)
        hidden = torch.randn(n, d, generator=gen)
        case = {"rows": n, "d": d, "vocab": vocab, "weight": str(dtype).removeprefix("torch.")}
        fns = {
            "eefast": lambda h=hidden, w=weight: eefast.exit_stats(h, w),
            "eager": lambda h=hidden, w=weight: eager_stats(h, w),
            "compile": lambda h=hidden, w=weight: compiled(h, w),
        }
        for provider in providers:
            seconds, _ = time_median(fns[provider], budget_s=budget_s)
            extra = {}
            if provider == "eefast":
                w_bytes = weight.numel() * weight.element_size()
                extra = {"weight_GBps": w_bytes / seconds / 1e9, "copy_GBps": copy_gbps}
            row = Row(
                "exit_stats",
                case,
                provider,
                seconds * 1e3,
                peak_extra_memory_mib(fns[provider]),
                extra,
            )
            out.append(row)
            note = f"  W-stream {extra['weight_GBps']:.1f} GB/s" if extra else ""
            print(
                f"  {case} {provider:<8} {row.ms:9.3f} ms  peak {row.peak_mib} MiB{note}",
                flush=True,
            )
    return out
