"""Generation commands: `eefast generate`, `eefast calibrate` and `eefast bench-generate`."""

from __future__ import annotations

from pathlib import Path

from ..data.prompts import PROMPTS, load_prompts
from ..eval.agreement import CALIBRATION_THRESHOLDS, calibrate
from ..exits import add_exits, load_exits
from ..generation import (
    CONFIDENCE_MEASURES,
    DRAFT_K,
    DRAFT_THRESHOLD,
    DRAFT_WEIGHTS,
    FEATURE_DRAFT_K,
    FEATURE_DRAFT_THRESHOLD,
    FEATURE_DRAFT_WIDTH,
    KV_MODES,
    MODES,
    generate,
)
from ..hf import DEFAULT_MODEL, prompt_ids
from ..io import write_json
from .common import (
    add_model_arguments,
    add_weights_argument,
    count,
    finite,
    float_list,
    int_list,
    load,
    nonnegative,
    positive_int,
    probability,
    say,
)


def _load(args):
    if args.exits is None and args.mode != "full" and args.draft is None:  # before loading
        raise ValueError(
            "give --exits (tuned exits draft), --draft q4|int8 (the backbone's low-bit copy "
            "drafts) or --mode full"
        )
    model, tokenizer = load(args)
    if args.exits is None:
        # generate() runs on an EarlyExitModel; this exit is never consulted.
        return add_exits(model, [1], "norm", share_lm_head=True), tokenizer
    ee = load_exits(model, args.exits)
    say(f"exits at {ee.exit_layers} of {ee.num_layers} blocks ({ee.kind}) from {args.exits}")
    if ee.draft_vocab is not None:
        if args.no_draft_vocab:
            ee.draft_vocab = None
        else:
            say(f"exit heads cut to a draft vocabulary of {len(ee.draft_vocab):,} tokens")
    return ee, tokenizer


def _prompts(args) -> list[str]:
    """--prompts-file's prompts, else the built-in ones: the first --prompts of them (default:
    all of the file's, 4 built-in)."""
    if args.prompts_file:
        return load_prompts(args.prompts_file)[: args.prompts]
    return PROMPTS[: args.prompts or 4]


def cmd_generate(args) -> None:
    ee, tokenizer = _load(args)
    prompts = args.prompt or PROMPTS[:1]
    res = generate(
        ee,
        tokenizer,
        prompts,
        args.mode,
        args.max_new_tokens,
        exit_layer=args.exit_layer,
        exits=args.exit_layers,
        draft_k=args.draft_k,
        draft_width=args.draft_width,
        adaptive=False if args.fixed_k else None,
        threshold=args.threshold,
        measure=args.measure,
        kv=args.kv,
        min_exit=args.min_exit,
        draft=args.draft,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=not args.no_chat,
        stop=args.stop,
    )
    lossy = " (lossy)" if args.mode == "threshold" else ""
    for prompt, text in zip(prompts, res.texts, strict=True):
        print(f"\n>>> {prompt}\n{text}")
    say(f"{args.mode}{lossy}: {res.summary()}")


def cmd_calibrate(args) -> None:
    ee, tokenizer = _load(args)
    ids = prompt_ids(tokenizer, _prompts(args), chat=True)
    rows, best = calibrate(
        ee, tokenizer, ids, args.thresholds, args.target, args.max_new_tokens, args.measure, say
    )
    out = Path(args.exits) / "calibration.json"
    write_json(
        out, {"target": args.target, "measure": args.measure, "threshold": best, "rows": rows}
    )
    if best is None:
        say(f"no threshold reached agreement {args.target}; wrote {out}")
    else:
        say(f"threshold {best} reaches agreement >= {args.target}; wrote {out}")


def cmd_bench_generate(args) -> None:
    from ..eval.bench_generate import run_bench

    ee, tokenizer = _load(args)
    run_bench(
        ee,
        tokenizer,
        batch_sizes=args.batch_sizes,
        prompts=_prompts(args),
        max_new_tokens=args.max_new_tokens,
        thresholds=args.thresholds,
        draft_thresholds=args.draft_thresholds,
        variant_thresholds=args.variant_thresholds,
        kv_variants=args.kv_variants,
        threads=args.threads,
        out=args.out,
        repeats=args.repeats,
        draft_ks=args.draft_ks,
        draft_widths=args.draft_widths,
        low_bit_drafts=args.low_bit_drafts,
        ggufs=args.gguf,
        report=say,
    )


def add_commands(sub) -> None:
    def common(p, exits_help=None):
        add_model_arguments(p, DEFAULT_MODEL)
        add_weights_argument(p)
        p.add_argument("--exits", required=exits_help is None,
                       help=exits_help or "directory with exits.json (eefast tune)")  # fmt: skip
        p.add_argument("--max-new-tokens", type=positive_int, default=128)
        p.add_argument(
            "--no-draft-vocab",
            action="store_true",
            help="exit heads over the whole vocabulary even if a draft vocabulary was saved",
        )

    g = sub.add_parser("generate", help="early-exit generation (speculative, threshold, full)")
    common(g, "directory with exits.json (eefast tune); not needed with --draft or --mode full")
    g.add_argument("--prompt", action="append", help="a user message (repeat for a batch)")
    g.add_argument("--mode", choices=MODES, default="speculative")
    g.add_argument(
        "--exit-layers",
        type=int_list,
        default=None,
        help="exits a token may stop at, e.g. 6,12,20 (default: all)",
    )
    g.add_argument(
        "--exit-layer", type=int, default=None, help="speculative: draft from this exit only"
    )
    g.add_argument(
        "--draft-k",
        type=positive_int,
        default=None,
        help=f"speculative: most drafts a round (default {DRAFT_K}, adaptive; with a draft "
        f"exit's tree {FEATURE_DRAFT_K}, fixed)",
    )
    g.add_argument(
        "--draft-width",
        type=positive_int,
        default=None,
        help="draft exit, greedy: candidates for the first draft verified in one pass "
        f"(default {FEATURE_DRAFT_WIDTH}; 1: a chain)",
    )
    g.add_argument("--fixed-k", action="store_true", help="no adaptive draft length")
    g.add_argument(
        "--draft",
        choices=DRAFT_WEIGHTS,
        default=None,
        help="speculative: the backbone's own low-bit copy drafts instead of the exits "
        "(llama-family float32 models on the CPU; SmolLM2's q4 copy is its shipped GGUF's)",
    )
    g.add_argument(
        "--threshold",
        type=finite,
        default=None,
        help=f"exit confidence to stop at (default: threshold 0.9, speculative {DRAFT_THRESHOLD}"
        "; speculative with 0 drafts --draft-k tokens every round). With a draft exit: the "
        f"confidence a draft needs (default {FEATURE_DRAFT_THRESHOLD})",
    )
    g.add_argument("--measure", choices=CONFIDENCE_MEASURES, default="max_prob")
    g.add_argument(
        "--kv",
        choices=KV_MODES,
        default="recompute",
        help="threshold mode: KV of skipped blocks recomputed later (exact) or copied up (CALM)",
    )
    g.add_argument("--min-exit", type=int, default=1)
    g.add_argument("--temperature", type=nonnegative, default=0.0)
    g.add_argument("--top-k", type=count, default=0)
    g.add_argument("--top-p", type=probability, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-chat", action="store_true", help="prompts are raw text, no template")
    g.add_argument("--stop", action="append", help="a stop string (repeat for several)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate", help="pick a threshold for a target agreement")
    common(c)
    c.add_argument("--target", type=probability, default=0.95)
    c.add_argument("--thresholds", type=float_list, default=CALIBRATION_THRESHOLDS)
    c.add_argument("--measure", choices=CONFIDENCE_MEASURES, default="max_prob")
    c.add_argument("--prompts", type=positive_int, default=None, help="how many (default 4)")
    c.add_argument("--prompts-file", help="your own prompts: one per line, or a .jsonl")
    c.set_defaults(func=cmd_calibrate)

    b = sub.add_parser("bench-generate", help="eefast generation against HF generate")
    common(b)
    b.add_argument("--batch-sizes", type=int_list, default=[1, 4])
    b.add_argument("--prompts", type=positive_int, default=None, help="how many (default 4)")
    b.add_argument("--prompts-file", help="your own prompts: one per line, or a .jsonl")
    b.add_argument("--thresholds", type=float_list, default=[0.5, 0.8, 0.9, 0.99])
    b.add_argument(
        "--draft-thresholds",
        type=float_list,
        default=None,
        help="speculative rows, one per draft threshold (default 0.5,0.6,0.7; "
        f"{FEATURE_DRAFT_THRESHOLD} for a draft exit)",
    )
    b.add_argument(
        "--variant-thresholds",
        type=float_list,
        default=[0.8, 0.9],
        help="thresholds for the kv=propagate and classifier variants (when present)",
    )
    b.add_argument(
        "--kv-variants",
        type=lambda t: [x for x in t.split(",") if x],
        default=["propagate"],
        help="extra threshold-mode KV modes to time ('' for none)",
    )
    b.add_argument(
        "--draft-ks",
        type=int_list,
        default=[None],
        help=f"draft exits: the draft lengths to time (default {FEATURE_DRAFT_K} with a tree)",
    )
    b.add_argument(
        "--draft-widths",
        type=int_list,
        default=[None],
        help=f"draft exits: the draft-tree widths to time (default {FEATURE_DRAFT_WIDTH})",
    )
    b.add_argument(
        "--low-bit-drafts",
        type=lambda t: [x for x in t.split(",") if x],
        default=["q4"],
        help="speculative rows drafted by the backbone's own low-bit copy: q4, int8 ('' for "
        "none; skipped where the backbone cannot have one)",
    )
    b.add_argument(
        "--repeats", type=positive_int, default=1, help="alternating repeats; medians reported"
    )
    b.add_argument("--threads", type=positive_int, default=2)
    b.add_argument(
        "--gguf",
        action="append",
        default=[],
        help="llama.cpp on this GGUF file as one more provider at batch 1 (repeat; needs "
        "llama-cpp-python; the default model ships as a Q4_1 GGUF, see docs/benchmarks.md)",
    )
    b.add_argument("--out", default="benchmarks/results")
    b.set_defaults(func=cmd_bench_generate)
