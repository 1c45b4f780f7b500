"""`eefast info` (what this build registered) and `eefast demo-ops` (a tour of the fused ops)."""

from __future__ import annotations

import argparse
from functools import partial

import torch

from ..nn import LoRALinear
from ..ops import exit_stats, lora_linear, reference
from ..timing import time_median
from .common import positive_int


def registered_ops() -> list[str]:
    """Every op of this build's ``eefast`` namespace, as the dispatcher knows them."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::", 1)[1] for n in names if n.startswith("eefast::"))


def op_backends(op: str) -> tuple[list[str], str]:
    """(the backends with a kernel for ``eefast::op``, where its autograd is registered)."""
    table = "\n" + torch._C._dispatch_dump(f"eefast::{op}")
    if "\nCompositeExplicitAutograd[alias]:" in table:
        backends = ["any device (ATen composite)"]
    else:
        backends = [key for key in ("CPU", "CUDA") if f"\n{key}:" in table]
    autograd = "none"
    line = next((x for x in table.splitlines() if x.startswith("Autograd[alias]:")), "")
    if line:
        autograd = "Python" if "torch/library.py" in line else "C++"
    return backends, autograd


def cmd_info(_args: argparse.Namespace) -> None:
    """Print what this build provides."""
    import eefast

    print(
        f"eefast {eefast.__version__}  torch {torch.__version__}  threads {torch.get_num_threads()}"
    )
    ops = registered_ops()
    if not ops:
        print("  no torch.ops.eefast.* registered: eefast._C is not built")
    for op in ops:
        backends, autograd = op_backends(op)
        print(f"  torch.ops.eefast.{op}: {', '.join(backends) or 'no kernel'}; autograd {autograd}")
    print(f"  CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")


def _median_ms(fn, reps: int) -> float:
    return time_median(fn, min_reps=reps, budget_s=0.0)[0] * 1e3


def _fwd_bwd_ms(fwd, x, grad, leaves, reps: int) -> float:
    """Median milliseconds of fwd(x).backward(grad), after one warm-up call."""

    def step():
        fwd(x).backward(grad)
        for t in leaves:
            t.grad = None

    return _median_ms(step, reps)


def cmd_demo_ops(args: argparse.Namespace) -> None:
    """A short tour of the fused ops: exactness, a tiny training run, and their speed."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cmd_info(args)

    print("\n1. lora_linear equals the unfused reference (fp32, 3-D input):")
    x = torch.randn(2, 50, 96, requires_grad=True)
    w, a, b = torch.randn(80, 96), torch.randn(8, 96, requires_grad=True), torch.randn(80, 8)
    b.requires_grad_()
    y = lora_linear(x, w, None, a, b, 0.5)
    ref = reference.lora_linear(x, w, None, a, b, 0.5)
    print(f"   max |y - reference| = {(y - ref).abs().max().item():.2e}")

    print("\n2. LoRALinear learns a low-rank change of a frozen layer (Adam, 200 steps):")
    layer = LoRALinear(64, 64, r=4, alpha=4)
    target = layer.weight.detach() + 0.3 * torch.randn(64, 4) @ torch.randn(4, 64) / 8
    opt = torch.optim.Adam([layer.lora_a, layer.lora_b], lr=3e-2)
    data = torch.randn(256, 64)
    for step in range(201):
        loss = (layer(data) - data @ target.t()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"   step {step:3d}  loss {loss.item():.5f}")

    n, d, r = args.tokens, args.dim, 16
    print(f"\n3. forward+backward, {n} tokens, d={d}, r={r}, {args.threads} threads (median):")
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(d, d) / d**0.5).to(dtype)
        a = (torch.randn(r, d) / d**0.5).to(dtype).requires_grad_()
        b = (torch.randn(d, r) / r**0.5).to(dtype).requires_grad_()
        x = torch.randn(n, d, dtype=dtype, requires_grad=True)
        g = torch.randn(n, d, dtype=dtype)

        fused = _fwd_bwd_ms(
            partial(lora_linear, weight=w, bias=None, lora_a=a, lora_b=b, scaling=1.0),
            x,
            g,
            (x, a, b),
            args.reps,
        )
        eager = _fwd_bwd_ms(
            partial(reference.lora_linear, weight=w, bias=None, lora_a=a, lora_b=b, scaling=1.0),
            x,
            g,
            (x, a, b),
            args.reps,
        )
        print(
            f"   {str(dtype):15} eefast {fused:8.1f} ms   eager PyTorch {eager:8.1f} ms   "
            f"speedup {eager / fused:5.2f}x"
        )

    print("\n4. exit_stats: the exit decision at decode, from an LM head of SmolLM2's size")
    print("   (d=576, vocab=49152), without materialising the logits (median):")
    for dtype in (torch.float32, torch.bfloat16):
        head = (torch.randn(49152, 576) / 24).to(dtype)
        h = torch.randn(1, 576)
        fused = _median_ms(lambda h=h, head=head: exit_stats(h, head), args.reps * 5)
        eager = _median_ms(lambda h=h, head=head: reference.exit_stats(h, head), args.reps * 5)
        stats = exit_stats(h, head)
        print(
            f"   weight {str(dtype):15} eefast {fused:6.2f} ms   "
            f"full-logits PyTorch {eager:6.2f} ms"
            f"   speedup {eager / fused:5.2f}x   (max prob {stats.max_prob.item():.3f})"
        )
    print("\nFull comparison against HF PEFT, eager and torch.compile: make bench")


def add_commands(sub) -> None:
    info = sub.add_parser("info", help="what this build provides")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo-ops", help="a short tour of the fused ops and their speed")
    demo.add_argument("--tokens", type=positive_int, default=512)
    demo.add_argument("--dim", type=positive_int, default=2048)
    demo.add_argument("--threads", type=positive_int, default=2)
    demo.add_argument("--reps", type=positive_int, default=3)
    demo.set_defaults(func=cmd_demo_ops)
