"""Adapter commands: `eefast finetune` (train one adapter) and `eefast eval` (answer accuracy)."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapters import (
    IA3Config,
    LoraConfig,
    ParallelConfig,
    PrefixConfig,
    SeriesConfig,
    add_adapters,
    config_to_dict,
    load_adapter,
    mark_only_adapters_trainable,
    save_adapter,
)
from ..data import TASK, load_rows, tokenize_rows
from ..distributed import init_parallel, shutdown
from ..eval import answer_accuracy
from ..hf import DEFAULT_MODEL, pad_id
from ..io import write_json
from ..ops import ADAPTER_ACTIVATIONS
from ..train import FinetuneConfig, finetune
from .common import (
    add_model_arguments,
    add_timeout_argument,
    add_weights_argument,
    count,
    finite,
    load,
    positive,
    positive_int,
    probability,
    resolve_model_path_once,
    say,
)

METHODS = ("lora", "series", "parallel", "prefix", "ia3")
# Peak learning rates that move SmolLM2 within a few hundred steps (docs/adapters.md).
DEFAULT_LR = {"lora": 1e-3, "series": 1e-3, "parallel": 1e-3, "prefix": 1e-2, "ia3": 1e-2}


def _names(text: str | None) -> tuple[str, ...] | None:
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None


def _scaling(text: str) -> float | str:
    return text if text == "learned" else finite(text)


def adapter_config(args) -> object:
    if args.feedforward and not args.targets:
        raise ValueError("--feedforward names some of --targets; give --targets too")
    targets = _names(args.targets)
    bottleneck = {
        "bottleneck_size": args.bottleneck_size,
        "activation": args.activation,
        "scaling": args.scaling,
        "init": args.init,
        "dropout": args.adapter_dropout,
        "target_modules": targets,
    }
    if args.method == "lora":
        return LoraConfig(args.r, args.alpha, args.lora_dropout, targets)
    if args.method == "series":
        return SeriesConfig(**bottleneck, placement=args.placement)
    if args.method == "parallel":
        return ParallelConfig(**bottleneck)
    if args.method == "prefix":
        return PrefixConfig(args.virtual_tokens, args.projection_size or None)
    return IA3Config(targets, _names(args.feedforward) if targets else None)


def _evaluate(model, tokenizer, args, out: Path | None) -> dict:
    rows = load_rows(args.eval_data, "test")[: args.limit or None]
    t0 = time.perf_counter()
    result = answer_accuracy(
        model, tokenizer, rows, args.eval_batch_size, args.max_new_tokens, not args.no_chat
    )
    say(
        f"accuracy {result['accuracy']:.1%} ({result['correct']}/{result['total']}) on "
        f"{args.eval_data} in {time.perf_counter() - t0:.0f} s"
    )
    for s in result["samples"][:3]:
        say(f"  {s['instruction'][:60]!r} -> {s['reply'][:60]!r} (gold {s['gold']})")
    if out is not None:
        write_json(out, result)
        say(f"wrote {out}")
    return result


def cmd_finetune(args) -> None:
    """Train one adapter; under torchrun, data-parallel over the N processes (rank 0 writes)."""
    parallel = init_parallel(1, args.dist_timeout)
    try:
        _finetune(args, parallel)
    finally:
        shutdown(parallel)


def _finetune(args, parallel) -> None:
    if not parallel.active:
        torch.set_num_threads(args.threads)  # torchrun sets each rank's threads
    config = adapter_config(args)
    requested = args.model
    if parallel.active:
        args.model = resolve_model_path_once(args.model, parallel)
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    model, tokenizer = load(args)
    torch.manual_seed(args.seed)  # the adapter's initialisation: the same --seed, the same run
    adapter = add_adapters(model, config)
    trainable = mark_only_adapters_trainable(model)
    total = sum(p.numel() for p in model.parameters())
    say(
        f"{args.method} adapter on {model.config._name_or_path}: {trainable:,} trainable "
        f"parameters ({trainable / total:.3%} of {total:,}) at {len(adapter.targets)} places"
    )
    examples = tokenize_rows(tokenizer, load_rows(args.data, "train"), chat=not args.no_chat)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    ft = FinetuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=lr,
        max_len=args.max_len,
        mask_prompt=not args.no_mask_prompt,
        seed=args.seed,
        save_every=args.save_every,
    )
    out = Path(args.out)
    say(
        f"{len(examples)} examples from {args.data}; {ft.steps} steps of "
        f"{ft.batch_size}x{ft.grad_accum} at lr {lr:g}; checkpoints in {out / 'checkpoints'}"
    )
    t0 = time.perf_counter()
    log = finetune(
        model,
        examples,
        ft,
        out,
        fingerprint={"adapter": config_to_dict(config), "model": requested, "data": args.data},
        resume=not args.no_resume,
        pad_id=pad_id(tokenizer),
        parallel=parallel,
    )
    if not parallel.is_writer:
        return
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-10:]) / len(log[-10:])
    say(
        f"loss {first:.3f} -> {last:.3f} (mean of the last 10 steps) in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    save_adapter(model, out)
    write_json(out / "finetune.json", {"config": asdict(ft), "log": log})
    say(f"wrote the adapter to {out}")
    if args.eval:
        _evaluate(model, tokenizer, args, out / f"eval_{Path(args.eval_data).stem}.json")


def cmd_eval(args) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args)
    out = None
    if args.adapter:
        adapter = load_adapter(model, args.adapter)
        say(f"loaded a {adapter.method} adapter from {args.adapter}")
        out = Path(args.adapter) / f"eval_{Path(args.eval_data).stem}.json"
    if args.out:
        out = Path(args.out)
    _evaluate(model, tokenizer, args, out)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-data", default=TASK, help=f"{TASK!r} (its test split) or a .jsonl")
    p.add_argument("--limit", type=count, default=0, help="evaluate the first N rows only")
    p.add_argument("--eval-batch-size", type=positive_int, default=16)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)


def _shared(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, DEFAULT_MODEL)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--no-chat", action="store_true", help="Alpaca-style prompts, no chat template")


def add_commands(sub) -> None:
    ft = sub.add_parser("finetune", help="train an adapter (LoRA, series, parallel, prefix, IA3)")
    _shared(ft)
    ft.add_argument("--method", choices=METHODS, default="lora")
    ft.add_argument("--data", default=TASK, help=f"{TASK!r} (shipped), a .jsonl or a .txt")
    ft.add_argument("--out", required=True, help="adapter files, checkpoints and logs")
    ft.add_argument("--steps", type=positive_int, default=200)
    ft.add_argument("--batch-size", type=positive_int, default=8)
    ft.add_argument("--grad-accum", type=positive_int, default=1)
    ft.add_argument("--lr", type=positive, default=None, help=f"default per method: {DEFAULT_LR}")
    ft.add_argument("--max-len", type=positive_int, default=256)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--save-every", type=positive_int, default=50)
    ft.add_argument("--no-mask-prompt", action="store_true", help="train on prompt tokens too")
    ft.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    ft.add_argument("--targets", help="comma-separated module names (default: per architecture)")
    lora = ft.add_argument_group("lora")
    lora.add_argument("--r", type=positive_int, default=8)
    lora.add_argument("--alpha", type=finite, default=16.0)
    lora.add_argument("--lora-dropout", type=probability, default=0.0)
    bn = ft.add_argument_group("series / parallel")
    bn.add_argument("--bottleneck-size", type=positive_int, default=64)
    bn.add_argument("--placement", choices=("pfeiffer", "houlsby"), default="pfeiffer")
    bn.add_argument("--activation", choices=sorted(ADAPTER_ACTIVATIONS), default="relu")
    bn.add_argument("--scaling", type=_scaling, default=1.0, help="a number or 'learned'")
    bn.add_argument("--init", choices=("zero-up", "normal"), default="zero-up")
    bn.add_argument("--adapter-dropout", type=probability, default=0.0)
    pre = ft.add_argument_group("prefix")
    pre.add_argument("--virtual-tokens", type=positive_int, default=16)
    pre.add_argument("--projection-size", type=count, default=0, help="0: no reparameterisation")
    ia3 = ft.add_argument_group("ia3")
    ia3.add_argument("--feedforward", help="with --targets: which of them scale their input")
    add_timeout_argument(ft)
    ft.add_argument("--eval", action="store_true", help="evaluate on --eval-data afterwards")
    _eval_args(ft)
    ft.set_defaults(func=cmd_finetune)

    ev = sub.add_parser("eval", help="answer accuracy of the model, with or without an adapter")
    _shared(ev)
    add_weights_argument(ev)
    ev.add_argument("--adapter", help="a directory written by finetune (or by PEFT)")
    ev.add_argument("--out", help="where to write the JSON (default: in --adapter)")
    _eval_args(ev)
    ev.set_defaults(func=cmd_eval)
