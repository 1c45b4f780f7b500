"""linear_cross_entropy, one or several exits, forward+backward: eefast against eager PyTorch,
torch.compile of the same loss (full [tokens, vocab] logits per exit, then cross-entropy) and
Cut Cross-Entropy's CPU path (``impl="torch_compile"``, when ``cut-cross-entropy`` and
``triton`` are installed). The exits share one LM-head weight, trainable (every provider also
builds its gradient) or frozen."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import eefast
from eefast.timing import time_median

from .common import Row, peak_extra_memory_mib, seeded_generator

QUICK = {"tokens": [4096], "d": 576, "vocab": 49152, "exits": 3}
PROVIDERS = ["eefast", "eager", "compile", "cce"]


def _cce_loss():
    """Cut Cross-Entropy's loss on CPU (its torch.compile implementation), or None."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        print("  cce: not installed (pip install cut-cross-entropy triton); skipped", flush=True)
        return None

    def loss(hiddens, weight, targets):
        return sum(linear_cross_entropy(h, weight, targets, impl="torch_compile") for h in hiddens)

    return loss


def eager_multi_exit(hiddens, weight, targets):
    return sum(F.cross_entropy(h @ weight.t(), targets) for h in hiddens)


def _case(n, d, vocab, exits, dtype, providers, compiled, cce, frozen, budget_s) -> list[Row]:
    gen = seeded_generator()
    weight = (torch.randn(vocab, d, generator=gen) / d**0.5).to(dtype).requires_grad_(not frozen)
    hiddens = [torch.randn(n, d, generator=gen).to(dtype).requires_grad_() for _ in range(exits)]
    targets = torch.randint(0, vocab, (n,), generator=gen)
    case = {
        "tokens": n,
        "d": d,
        "vocab": vocab,
        "exits": exits,
        "head": "frozen" if frozen else "trainable",
        "dtype": str(dtype).removeprefix("torch."),
    }
    losses = {
        "eefast": lambda: eefast.multi_exit_cross_entropy(hiddens, weight, targets)[0],
        "eager": lambda: eager_multi_exit(hiddens, weight, targets),
        "compile": lambda: compiled(hiddens, weight, targets),
        "cce": lambda: cce(hiddens, weight, targets),
    }
    rows = []
    for provider in providers:
        if provider == "cce" and cce is None:
            continue
        loss_fn = losses[provider]

        def step(loss_fn=loss_fn):
            loss_fn().backward()
            for t in (weight, *hiddens):
                t.grad = None

        seconds, _ = time_median(step, min_reps=3, budget_s=budget_s)
        row = Row(
            "linear_cross_entropy", case, provider, seconds * 1e3, peak_extra_memory_mib(step)
        )
        rows.append(row)
        print(f"  {case} {provider:<8} {row.ms:9.1f} ms  peak {row.peak_mib} MiB", flush=True)
    return rows


def run(
    tokens, d, vocab, exits, dtypes, providers, budget_s: float = 2.0, heads=("trainable",)
) -> list[Row]:
    compiled = torch.compile(eager_multi_exit)
    cce = _cce_loss() if "cce" in providers else None
    return [
        row
        for dtype in dtypes
        for n in tokens
        for head in heads
        for row in _case(
            n, d, vocab, exits, dtype, providers, compiled, cce, head == "frozen", budget_s
        )  # fmt: skip
    ]
