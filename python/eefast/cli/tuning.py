"""What `eefast tune` shares between one process and torchrun: the token blocks, the tuning
config and the exit layers from the arguments, and the scaled-out run itself (one pipeline
stage of one replica per rank). Not a command module: exits.py calls it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..data import load_documents, split_blocks, token_blocks
from ..distributed import shutdown
from ..distributed.pipeline import auto_microbatches, build_stage
from ..train import TuneConfig, ee_tune
from .common import DTYPES, resolve_model_path_once, say


def tune_blocks(args, tokenizer):
    """(training blocks, held-out blocks) of --data, as --seq-len, --eval-blocks and
    --train-blocks say."""
    blocks = token_blocks(tokenizer, load_documents(args.data), args.seq_len)
    train, held_out = split_blocks(blocks, args.eval_blocks)
    train = train[: getattr(args, "train_blocks", None)]
    say(
        f"corpus {args.data}: {blocks.numel():,} tokens = {len(blocks)} blocks of "
        f"{args.seq_len}; training on {len(train)}, {len(held_out)} held out"
    )
    return train, held_out


def tune_config(args) -> TuneConfig:
    return TuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        kd_weight=args.kd_weight,
        targets=args.targets,
        z_loss=args.z_loss,
        exit_weights=args.exit_weights,
        exit_weight_warmup_steps=args.exit_weight_warmup,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        cache_hidden=args.cache_hidden,
        cache_path=args.cache_path,
        microbatches=getattr(args, "microbatches", None) or 1,
    )


# Where exits go when --exits is not given: three exits for SmolLM2's 30 blocks; a draft
# exit always sits on top.
DEFAULT_EXITS = [8, 15, 22]


def exit_layers(args, num_layers: int) -> list[int]:
    if args.exits is not None:
        return args.exits
    return [num_layers] if args.kind == "draft" else DEFAULT_EXITS


def tune_scaled_out(args, parallel) -> None:
    """`eefast tune` under torchrun: this rank's pipeline stage (P = --pipeline-stages) of
    one of D = N / P data-parallel replicas. Rank 0 prints and writes the files."""
    from transformers import AutoTokenizer

    try:
        path = resolve_model_path_once(args.model, parallel)
        train, held_out = tune_blocks(args, AutoTokenizer.from_pretrained(path))
        layout = parallel.layout
        args.microbatches = args.microbatches or auto_microbatches(args.batch_size, layout)
        device = args.device
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        from transformers import AutoConfig

        layers = exit_layers(args, AutoConfig.from_pretrained(path).num_hidden_layers)
        stage = build_stage(path, layers, parallel, args.kind, args.init, args.share_lm_head,
                            to_top=args.kd_weight > 0 or args.targets == "model",
                            dtype=DTYPES[args.dtype],
                            device=device)  # fmt: skip
        say(
            f"{layout.world} processes: {layout.stages} pipeline stages x {layout.replicas} "
            f"data-parallel replicas; {args.microbatches} microbatches per replica and step"
        )
        for i, plan in enumerate(stage.plans):
            say(f"stage {i}: blocks {plan.first + 1}-{plan.last}, exits {list(plan.exits)}")
        out = Path(args.out)
        t0 = time.perf_counter()
        metrics = ee_tune(stage.ee, train, held_out, tune_config(args), out,
                          resume=not args.no_resume, stage=stage)  # fmt: skip
        say(f"tuned in {time.perf_counter() - t0:.0f} s; exits in {out}")
        if metrics:
            last = metrics[-1]
            say(f"step {last['step']}: loss {last['loss']:.3f}, "
                f"{last['tokens_per_s']:.0f} tokens/s")  # fmt: skip
            held = {k.removeprefix("eval_loss_exit"): round(v, 3) for k, v in last.items()
                    if k.startswith("eval_loss_exit")}  # fmt: skip
            if held:
                say(f"held-out loss per exit: {held}")
        say(f"the full report needs the whole model: eefast eval-exits --exits {out}")
    finally:
        shutdown(parallel)
