"""`python -m benchmarks ops|ee-tune|adapters|trainer|verify|scaleout|archs|lowbit [...]`:
time eefast against its peers in one run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from eefast import io

from . import (
    bench_adapters,
    bench_archs,
    bench_bottleneck_adapter,
    bench_decode_block,
    bench_decode_linear,
    bench_ee_tune,
    bench_exit_stats,
    bench_linear_cross_entropy,
    bench_lora_linear,
    bench_lowbit,
    bench_scaleout,
    bench_trainer,
    bench_verify,
)
from .common import machine_info, plot_speedups, print_table, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _providers(args: argparse.Namespace, bench) -> list[str]:
    """The requested providers that this benchmark has."""
    return [p for p in args.providers.split(",") if p in bench.PROVIDERS]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="suite", required=True)
    ops = sub.add_parser(
        "ops",
        help="op microbenchmarks: lora_linear, bottleneck_adapter, exit_stats, "
        "linear_cross_entropy, decode_linear, decode_block",
    )
    ops.add_argument(
        "--op",
        choices=[
            "all",
            "lora_linear",
            "bottleneck_adapter",
            "exit_stats",
            "linear_cross_entropy",
            "decode_linear",
            "decode_block",
        ],
        default="all",
    )
    ops.add_argument("--full", action="store_true", help="the whole shape grid (slow)")
    ops.add_argument("--tokens", type=_ints, help="comma-separated token (row) counts")
    ops.add_argument("--dims", type=_ints, help="comma-separated in=out feature sizes")
    ops.add_argument("--ranks", type=_ints, help="comma-separated LoRA ranks / bottleneck sizes")
    ops.add_argument(
        "--dtypes",
        help="comma-separated: fp32,bf16 (default both; fp32 only for linear_cross_entropy, "
        "whose bf16 peers spend minutes per step in ATen's bf16 GEMM on AVX2 CPUs)",
    )
    ops.add_argument(
        "--providers",
        default="eefast,peft,eager,compile,base,cce",
        help="each op's benchmark runs those it has",
    )
    ops.add_argument("--lce-exits", type=int, default=None, help="linear_cross_entropy: exits")
    ops.add_argument(
        "--lce-heads", default="trainable", help="linear_cross_entropy: trainable,frozen"
    )
    ops.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ops.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ops.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per case")
    ops.add_argument(
        "--slow-cap",
        type=float,
        default=30.0,
        help="a provider slower than this per step (s) skips larger cases",
    )
    ops.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ops.add_argument("--plot", action="store_true", help="also write a PNG of the ratios")
    ee = sub.add_parser("ee-tune", help="EE-Tuning step throughput on SmolLM2 vs naive")
    ee.add_argument("--exits", type=_ints, default=[8, 15, 22])
    ee.add_argument("--kind", default="mlp")
    ee.add_argument("--batch-size", type=int, default=4)
    ee.add_argument("--seq-len", type=int, default=128)
    ee.add_argument("--providers", default=",".join(bench_ee_tune.PROVIDERS))
    ee.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ee.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ee.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ee.add_argument("--budget", type=float, default=10.0, help="seconds of repeats per case")
    ee.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ee.add_argument("--plot", action="store_true", help="also write a PNG of the ratios")
    ad = sub.add_parser("adapters", help="adapter training steps on SmolLM2 vs HF PEFT")
    ad.add_argument("--methods", default=",".join(bench_adapters.METHODS))
    ad.add_argument("--batch-size", type=int, default=1)
    ad.add_argument("--seq-len", type=int, default=256)
    ad.add_argument("--providers", default=",".join(bench_adapters.PROVIDERS))
    ad.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ad.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ad.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ad.add_argument("--budget", type=float, default=10.0, help="seconds of repeats per case")
    ad.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ad.add_argument("--plot", action="store_true", help="also write a PNG of the ratios")
    tr = sub.add_parser("trainer", help="HF Trainer LoRA SFT on SmolLM2: eefast.patch vs unpatched")
    tr.add_argument("--steps", type=int, default=20)
    tr.add_argument("--batch-size", type=int, default=4)
    tr.add_argument("--seq-len", type=int, default=128)
    tr.add_argument("--providers", default=",".join(bench_trainer.PROVIDERS))
    tr.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    tr.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    tr.add_argument("--plot", action="store_true", help="also write a PNG of the ratios")
    ve = sub.add_parser("verify", help="speculative verify-step cost by rows, draft-step cost")
    ve.add_argument("--rows", type=_ints, default=[1, 2, 3, 4, 5, 6, 8])
    ve.add_argument("--context", type=int, default=150, help="prompt tokens before the step")
    ve.add_argument("--repeats", type=int, default=5)
    ve.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ve.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    so = sub.add_parser("scaleout", help="pipeline x data-parallel EE-Tuning on SmolLM2")
    so.add_argument("--layouts", default="1x1,2x1,1x2,3x1,2x2", help="STAGESxREPLICAS,...")
    so.add_argument("--steps", type=int, default=12)
    so.add_argument("--batch-size", type=int, default=8)
    so.add_argument("--seq-len", type=int, default=128)
    so.add_argument("--exits", type=_ints, default=[8, 15, 22])
    so.add_argument("--kind", default="mlp")
    so.add_argument("--threads", type=int, default=2, help="unused: each job splits the cores")
    so.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ar = sub.add_parser("archs", help="decoding gpt_neox / gpt2 / llama shapes vs HF generate")
    ar.add_argument("--new-tokens", type=int, default=64)
    ar.add_argument("--repeats", type=int, default=3)
    ar.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ar.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    lb = sub.add_parser(
        "lowbit", help="SmolLM2 decoding: float32 vs int8 vs q4 backbone (vs llama.cpp)"
    )
    lb.add_argument("--prompts", type=int, default=4)
    lb.add_argument("--new-tokens", type=int, default=128)
    lb.add_argument("--repeats", type=int, default=3)
    lb.add_argument("--gguf", type=Path, action="append", default=[],
                    help="another GGUF file for llama.cpp besides the shipped Q4_1 (repeat; needs "
                    "llama-cpp-python)")  # fmt: skip
    lb.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    lb.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_default_device(getattr(args, "device", "cpu"))
    print(f"machine: {machine_info()}")
    if args.suite == "verify":
        rows = bench_verify.run(args.rows, args.context, args.repeats)
        path = args.out / f"verify-{time.strftime('%Y%m%d-%H%M%S')}.json"
        io.write_json(path, {"machine": machine_info(), "rows": rows})
        print(f"wrote {path}")
        return
    if args.suite == "lowbit":
        rows = bench_lowbit.run(args.prompts, args.new_tokens, args.repeats, args.gguf,
                                args.threads)  # fmt: skip
        path = args.out / f"lowbit-{time.strftime('%Y%m%d-%H%M%S')}.json"
        io.write_json(path, {"machine": machine_info(), "rows": rows})
        print(f"wrote {path}")
        return
    if args.suite == "archs":
        rows = bench_archs.run(args.new_tokens, repeats=args.repeats)
        path = args.out / f"archs-{time.strftime('%Y%m%d-%H%M%S')}.json"
        io.write_json(path, {"machine": machine_info(), "rows": rows})
        print(f"wrote {path}")
        return
    if args.suite == "scaleout":
        rows = bench_scaleout.run(args.layouts.split(","), args.steps, args.batch_size,
                                  args.seq_len, args.exits, args.kind, args.out)  # fmt: skip
        path = args.out / f"scaleout-{time.strftime('%Y%m%d-%H%M%S')}.json"
        io.write_json(path, {"machine": machine_info(), "rows": rows})
        print(f"wrote {path}")
        return
    if args.suite == "ee-tune":
        rows = bench_ee_tune.run(
            args.exits,
            args.kind,
            args.batch_size,
            args.seq_len,
            _providers(args, bench_ee_tune),
            args.budget,
            DTYPES[args.dtype],
        )
    elif args.suite == "trainer":
        rows = bench_trainer.run(
            args.steps,
            args.batch_size,
            args.seq_len,
            _providers(args, bench_trainer),
            str(args.out),
        )
    elif args.suite == "adapters":
        rows = bench_adapters.run(
            args.methods.split(","),
            args.batch_size,
            args.seq_len,
            _providers(args, bench_adapters),
            args.budget,
            DTYPES[args.dtype],
        )
    else:
        rows = _ops(args)
    print()
    print_table(rows)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"{args.suite}-{stamp}.json"
    write_json(rows, json_path)
    print(f"\nwrote {json_path}")
    if args.plot:
        png = json_path.with_suffix(".png")
        plot_speedups(rows, png)
        print(f"wrote {png}")


def _ops(args: argparse.Namespace) -> list:
    grid = bench_lora_linear.FULL if args.full else bench_lora_linear.QUICK
    dtypes = [DTYPES[d] for d in (args.dtypes or "fp32,bf16").split(",")]
    rows = []
    if args.op in ("all", "lora_linear"):
        rows += bench_lora_linear.run(
            tokens=args.tokens or grid["tokens"],
            dims=args.dims or grid["dims"],
            ranks=args.ranks or grid["ranks"],
            dtypes=dtypes,
            providers=_providers(args, bench_lora_linear),
            budget_s=args.budget,
            slow_cap_s=args.slow_cap,
        )
    if args.op in ("all", "bottleneck_adapter"):
        ba = bench_bottleneck_adapter.FULL if args.full else bench_bottleneck_adapter.QUICK
        rows += bench_bottleneck_adapter.run(
            tokens=args.tokens or ba["tokens"],
            dims=args.dims or ba["dims"],
            ranks=args.ranks or ba["ranks"],
            dtypes=dtypes,
            providers=_providers(args, bench_bottleneck_adapter),
            budget_s=args.budget,
        )
    if args.op in ("all", "exit_stats"):
        es = bench_exit_stats.QUICK
        rows += bench_exit_stats.run(
            rows=args.tokens or es["rows"],
            d=es["d"],
            vocab=es["vocab"],
            dtypes=dtypes,
            providers=_providers(args, bench_exit_stats),
            budget_s=args.budget,
        )
    if args.op in ("all", "linear_cross_entropy"):
        lce = bench_linear_cross_entropy.QUICK
        rows += bench_linear_cross_entropy.run(
            tokens=args.tokens or lce["tokens"],
            d=lce["d"],
            vocab=lce["vocab"],
            exits=args.lce_exits or lce["exits"],
            dtypes=dtypes if args.dtypes else [torch.float32],
            providers=_providers(args, bench_linear_cross_entropy),
            budget_s=args.budget,
            heads=args.lce_heads.split(","),
        )
    if args.op in ("all", "decode_linear"):
        dl = bench_decode_linear.QUICK
        rows += bench_decode_linear.run(
            rows=args.tokens or dl["rows"],
            shapes=dl["shapes"],
            dtypes=dtypes,
            providers=_providers(args, bench_decode_linear),
            budget_s=args.budget,
        )
    if args.op in ("all", "decode_block"):
        db = bench_decode_block.QUICK
        rows += bench_decode_block.run(
            shapes=db["shapes"],
            cache=db["cache"],
            layers=db["layers"],
            dtypes=dtypes,
            providers=_providers(args, bench_decode_block),
            budget_s=args.budget,
        )
    return rows


if __name__ == "__main__":
    main()
