"""The `eefast` command line: demo (the main job), tune, eval-exits, generate, finetune, eval,
demo-ops, info."""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from . import LoRALinear, cli_adapters, cli_generate, exit_stats, lora_linear
from .cli_ee import add_commands
from .ops import exit_stats_reference, lora_linear_reference


def _registered_backends(op: str) -> list[str]:
    table = torch._C._dispatch_dump(f"eefast::{op}")
    if "\nCompositeExplicitAutograd[alias]:" in f"\n{table}":
        return ["any device (ATen composite)"]
    return [key for key in ("CPU", "CUDA") if f"\n{key}:" in f"\n{table}"]


def cmd_info(_args: argparse.Namespace) -> None:
    """Print what this build provides."""
    import eefast

    print(
        f"eefast {eefast.__version__}  torch {torch.__version__}  threads {torch.get_num_threads()}"
    )
    for op in (
        "lora_linear",
        "lora_linear_backward",
        "bottleneck_adapter",
        "bottleneck_adapter_backward",
        "exit_stats",
        "linear_cross_entropy",
        "linear_cross_entropy_multi",
        "linear_cross_entropy_backward",
    ):
        print(f"  torch.ops.eefast.{op}: {', '.join(_registered_backends(op)) or 'not built'}")
    print(f"  CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")


def _median_call_ms(fn, reps: int) -> float:
    """Median milliseconds of fn(), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _fwd_bwd_ms(fwd, x, grad, leaves, reps: int) -> float:
    """Median milliseconds of fwd(x).backward(grad), after one warm-up call."""
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        fwd(x).backward(grad)
        times.append(time.perf_counter() - t0)
        for t in leaves:
            t.grad = None
    return statistics.median(times[1:]) * 1e3


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
    ref = lora_linear_reference(x, w, None, a, b, 0.5)
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
            partial(lora_linear_reference, weight=w, bias=None, lora_a=a, lora_b=b, scaling=1.0),
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
        fused = _median_call_ms(lambda h=h, head=head: exit_stats(h, head), args.reps * 5)
        eager = _median_call_ms(lambda h=h, head=head: exit_stats_reference(h, head), args.reps * 5)
        stats = exit_stats(h, head)
        print(
            f"   weight {str(dtype):15} eefast {fused:6.2f} ms   "
            f"full-logits PyTorch {eager:6.2f} ms"
            f"   speedup {eager / fused:5.2f}x   (max prob {stats.max_prob.item():.3f})"
        )
    print("\nFull comparison against HF PEFT, eager and torch.compile: make bench")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eefast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what this build provides")
    info.set_defaults(func=cmd_info)
    add_commands(sub)
    cli_generate.add_commands(sub)
    cli_adapters.add_commands(sub)
    demo = sub.add_parser("demo-ops", help="a short tour of the fused ops and their speed")
    demo.add_argument("--tokens", type=int, default=512)
    demo.add_argument("--dim", type=int, default=2048)
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--reps", type=int, default=3)
    demo.set_defaults(func=cmd_demo_ops)
    args = parser.parse_args(argv)
    args.func(args)
