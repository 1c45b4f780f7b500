"""Generation commands: `eefast generate`, `eefast calibrate` and `eefast bench-generate`."""

from __future__ import annotations

from pathlib import Path

import torch

from .cli_common import float_list, int_list, say
from .generation import (
    CONFIDENCE_MEASURES,
    DRAFT_THRESHOLD,
    KV_MODES,
    MODES,
    generate,
    prompt_ids,
)
from .io import write_json
from .models import load_exits, load_model
from .models.loading import DEFAULT_MODEL

# Chat prompts on mixed topics for calibration and benchmarks.
PROMPTS = [
    "Explain what a Python list comprehension is, with an example.",
    "Write a short poem about the sea at night.",
    "What are three tips for staying focused while studying?",
    "Summarise the causes of the French Revolution in a few sentences.",
    "How do I reverse a string in JavaScript?",
    "Describe how photosynthesis works to a ten-year-old.",
    "Give me a simple recipe for pancakes.",
    "What is the difference between a virus and a bacterium?",
]
THRESHOLDS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]


def _load(args):
    model, tokenizer = load_model(args.model)
    ee = load_exits(model, args.exits)
    say(f"exits at {ee.exit_layers} of {ee.num_layers} blocks ({ee.kind}) from {args.exits}")
    if ee.draft_vocab is not None:
        if args.no_draft_vocab:
            ee.draft_vocab = None
        else:
            say(f"exit heads cut to a draft vocabulary of {len(ee.draft_vocab):,} tokens")
    return ee, tokenizer


def agreement(ee, ids: list[list[int]], outputs: list[list[int]]) -> float:
    """Share of generated tokens equal to the full model's greedy choice after the same prefix
    (one teacher-forced forward per sequence)."""
    same = total = 0
    with torch.no_grad():
        for prompt, toks in zip(ids, outputs, strict=True):
            if not toks:
                continue
            logits = ee.model(torch.tensor([prompt + toks])).logits[0]
            want = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
            same += sum(a == b for a, b in zip(toks, want, strict=True))
            total += len(toks)
    return same / total if total else 1.0


def _stats_line(res) -> str:
    s = res.stats
    hist = ", ".join(f"{k}:{v}" for k, v in sorted(s.exit_layers.items()))
    line = f"{s.tokens} tokens in {res.seconds:.2f} s = {res.tokens_per_second:.1f} tok/s"
    if s.drafted:
        line += f"; acceptance {s.acceptance:.2f}, {s.mean_accepted:.2f} tokens/round"
    return line + f"; decided at layer {{{hist}}}"


def demo_generation(model_name: str, exits_dir) -> None:
    """The demo's last step: decode one chat prompt at full depth and speculatively with the
    tuned exits, and show that the lossless mode gives the same tokens."""
    model, tokenizer = load_model(model_name)
    ee = load_exits(model, exits_dir)
    prompt = PROMPTS[0]
    full = generate(ee, tokenizer, [prompt], "full", 48, chat=True)
    spec = generate(ee, tokenizer, [prompt], "speculative", 48, chat=True)
    print(f"\n>>> {prompt}\n{spec.texts[0]}", flush=True)
    say(f"full depth: {_stats_line(full)}")
    say(f"speculative (confident exits of {ee.exit_layers} draft): {_stats_line(spec)}")
    same = "identical to" if spec.tokens == full.tokens else "DIFFERENT from"
    say(f"speculative output is {same} full-depth greedy (lossless by construction)")
    if spec.tokens_per_second < full.tokens_per_second:
        why = (
            f"its drafts are accepted {spec.stats.acceptance:.0%} of the time"
            if spec.stats.drafted
            else "no exit was confident enough to draft"
        )
        say(
            f"speculation is slower here: {why}; it pays off with exits tuned longer on chat "
            "data (see the README's generation section)"
        )


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
        adaptive=not args.fixed_k,
        threshold=args.threshold,
        measure=args.measure,
        kv=args.kv,
        min_exit=args.min_exit,
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
    say(f"{args.mode}{lossy}: {_stats_line(res)}")


def calibrate(ee, tokenizer, ids, thresholds, target, max_new, measure="max_prob"):
    """Per threshold: agreement with the full model and speed; the lowest threshold whose
    agreement reaches the target (None when none does)."""
    rows = []
    for th in sorted(thresholds):
        res = generate(ee, tokenizer, ids, "threshold", max_new, threshold=th, measure=measure)
        layers = [la for row in res.layers for la in row]
        rows.append(
            {
                "threshold": th,
                "agreement": agreement(ee, ids, res.tokens),
                "tokens_per_s": res.tokens_per_second,
                "mean_layers": sum(layers) / max(1, len(layers)),
                "exit_layers": dict(sorted(res.stats.exit_layers.items())),
            }
        )
        say(
            f"threshold {th}: agreement {rows[-1]['agreement']:.3f}, "
            f"{rows[-1]['tokens_per_s']:.1f} tok/s, mean layers {rows[-1]['mean_layers']:.1f}"
        )
    ok = [r for r in rows if r["agreement"] >= target]
    return rows, (min(ok, key=lambda r: r["threshold"])["threshold"] if ok else None)


def cmd_calibrate(args) -> None:
    ee, tokenizer = _load(args)
    ids = prompt_ids(tokenizer, PROMPTS[: args.prompts], chat=True)
    rows, best = calibrate(
        ee, tokenizer, ids, args.thresholds, args.target, args.max_new_tokens, args.measure
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
    from .bench_generate import run_bench

    ee, tokenizer = _load(args)
    run_bench(ee, tokenizer, args)


def add_commands(sub) -> None:
    def common(p):
        p.add_argument("--model", default=DEFAULT_MODEL)
        p.add_argument("--exits", required=True, help="directory with exits.json (eefast tune)")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument(
            "--no-draft-vocab",
            action="store_true",
            help="exit heads over the whole vocabulary even if a draft vocabulary was saved",
        )

    g = sub.add_parser("generate", help="early-exit generation (speculative, threshold, full)")
    common(g)
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
    g.add_argument("--draft-k", type=int, default=4, help="speculative: most drafts a round")
    g.add_argument("--fixed-k", action="store_true", help="no adaptive draft length")
    g.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"exit confidence to stop at (default: threshold 0.9, speculative {DRAFT_THRESHOLD}"
        "; speculative with 0 drafts --draft-k tokens every round)",
    )
    g.add_argument("--measure", choices=CONFIDENCE_MEASURES, default="max_prob")
    g.add_argument(
        "--kv",
        choices=KV_MODES,
        default="recompute",
        help="threshold mode: KV of skipped blocks recomputed later (exact) or copied up (CALM)",
    )
    g.add_argument("--min-exit", type=int, default=1)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-chat", action="store_true", help="prompts are raw text, no template")
    g.add_argument("--stop", action="append", help="a stop string (repeat for several)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate", help="pick a threshold for a target agreement")
    common(c)
    c.add_argument("--target", type=float, default=0.95)
    c.add_argument("--thresholds", type=float_list, default=THRESHOLDS)
    c.add_argument("--measure", choices=CONFIDENCE_MEASURES, default="max_prob")
    c.add_argument("--prompts", type=int, default=4, help="how many built-in prompts")
    c.set_defaults(func=cmd_calibrate)

    b = sub.add_parser("bench-generate", help="eefast generation against HF generate")
    common(b)
    b.add_argument("--batch-sizes", type=int_list, default=[1, 4])
    b.add_argument("--prompts", type=int, default=4, help="how many built-in prompts")
    b.add_argument("--thresholds", type=float_list, default=[0.5, 0.8, 0.9, 0.99])
    b.add_argument(
        "--draft-thresholds",
        type=float_list,
        default=[0.5, DRAFT_THRESHOLD, 0.7],
        help="speculative rows drafting at the first confident exit, one per threshold",
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
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--out", default="benchmarks/results")
    b.set_defaults(func=cmd_bench_generate)
