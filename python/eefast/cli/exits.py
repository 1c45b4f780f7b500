"""EE-Tuning commands: `eefast demo` (the main job), `tune`, `eval-exits`, `train-classifier`,
`draft-vocab` and `distill-data`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import median

import torch

from ..data import (
    CHAT_CORPUS,
    DEFAULT_CORPUS,
    PROMPTS,
    load_documents,
    split_blocks,
    token_blocks,
)
from ..distributed import DEFAULT_TIMEOUT_S, init_parallel
from ..eval import evaluate_exits, format_table, plot_exits
from ..exits import (
    DRAFT_VOCAB_FILE,
    add_exits,
    load_exits,
    save_classifier,
    save_draft_vocab,
)
from ..generation import generate, low_bit_draft
from ..hf import DEFAULT_MODEL, load_model
from ..io import write_json
from ..nn import EXIT_KINDS
from ..train import TARGETS, ee_tune
from .common import (
    add_model_arguments,
    add_timeout_argument,
    add_weights_argument,
    count,
    float_list,
    int_list,
    load,
    nonnegative,
    positive,
    positive_int,
    say,
)
from .tuning import exit_layers, tune_blocks, tune_config, tune_scaled_out


def _load(args):
    t0 = time.perf_counter()
    model, tokenizer = load(args)
    say(
        f"loaded {model.config._name_or_path} ({model.config.model_type}, "
        f"{model.config.num_hidden_layers} layers) in {time.perf_counter() - t0:.1f} s"
    )
    return (model, *tune_blocks(args, tokenizer))


def _report(ee, held_out, args, out: Path | None) -> list[dict]:
    rows = evaluate_exits(ee, held_out, args.batch_size)
    print(format_table(rows), flush=True)
    if out:
        write_json(out / "eval_exits.json", rows)
        plot_exits(rows, out / "eval_exits.png")
        say(f"wrote {out / 'eval_exits.json'} and {out / 'eval_exits.png'}")
    return rows


def cmd_tune(args) -> None:
    torch.manual_seed(args.seed)
    parallel = init_parallel(
        getattr(args, "pipeline_stages", 1), getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S)
    )
    if parallel.active:
        return tune_scaled_out(args, parallel)
    model, train, held_out = _load(args)
    layers = exit_layers(args, model.config.num_hidden_layers)
    ee = add_exits(model, layers, args.kind, args.init, args.share_lm_head)
    say(
        f"exits ({args.kind}) after blocks {ee.exit_layers} of {ee.num_layers}; "
        f"{sum(p.numel() for p in ee.exit_parameters()):,} trainable parameters"
    )
    out = Path(args.out)
    say(
        f"tuning {args.steps} steps x {args.batch_size} x {args.seq_len} tokens; "
        f"checkpoints and metrics in {out} (rerun resumes)"
    )
    t0 = time.perf_counter()
    metrics = ee_tune(ee, train, held_out, tune_config(args), out, resume=not args.no_resume)
    say(f"tuned in {time.perf_counter() - t0:.0f} s; exits in {out}")
    if metrics:
        last = metrics[-1]
        say(f"step {last['step']}: loss {last['loss']:.3f}, {last['tokens_per_s']:.0f} tokens/s")
    say("held-out quality per exit (tuned vs untuned baseline = final norm + LM head there):")
    _report(ee, held_out, args, out)


def cmd_eval_exits(args) -> None:
    model, _, held_out = _load(args)
    ee = load_exits(model, args.exits)
    _report(ee, held_out, args, Path(args.out or args.exits))


def demo_generation(model_name: str, exits_dir, prompts: int, max_new_tokens: int,
                    weights: str | None = None) -> None:  # fmt: skip
    """The demo's last step: decode chat prompts at full depth, speculatively with the tuned
    exits drafting, and (on a float backbone) speculatively with the backbone's own q4 copy
    drafting, twice each in turn; show each speed-up and that the output is the same."""
    model, tokenizer = load_model(model_name, weights=weights)
    ee = load_exits(model, exits_dir)
    chosen = PROMPTS[:prompts]
    cases = {"full": {"mode": "full"}, "exits": {"mode": "speculative"}}
    try:
        cases["q4"] = {"mode": "speculative", "draft": low_bit_draft(ee, "q4")}
    except ValueError as e:
        say(f"no q4-drafted run: {e}")
    runs = {name: [] for name in cases}
    for _ in range(2):  # alternating, so drift on a shared machine hits all alike
        for name, kw in cases.items():
            runs[name].append([generate(ee, tokenizer, [p], max_new_tokens=max_new_tokens,
                                        chat=True, **kw) for p in chosen])  # fmt: skip
    print(f"\n>>> {chosen[0]}\n{runs['exits'][0][0].texts[0]}", flush=True)

    def speed(results):
        return sum(r.stats.tokens for r in results) / sum(r.seconds for r in results)

    def ratio(name):
        return median([speed(s) / speed(f) for f, s in zip(runs["full"], runs[name],
                                                            strict=True)])  # fmt: skip

    def same(name):
        return all(s.tokens == f.tokens for f, s in zip(runs["full"][0], runs[name][0],
                                                        strict=True))  # fmt: skip

    say(f"{len(chosen)} chat prompts x {max_new_tokens} new tokens, batch 1, two runs each:")
    say(f"{'full depth':<46}{median([speed(r) for r in runs['full']]):6.1f} tok/s")
    exits = f"exit{'s' if len(ee.exit_layers) > 1 else ''} at {ee.exit_layers}"
    labels = {"exits": f"the {ee.kind} {exits}", "q4": "the backbone's q4 copy"}
    drafted_by = [name for name in cases if name != "full"]
    for name in drafted_by:
        spec = runs[name][0]
        tokens = sum(r.stats.tokens for r in spec)
        drafted = max(1, sum(r.stats.drafted for r in spec))
        say(
            f"{'speculative, drafted by ' + labels[name]:<46}"
            f"{median([speed(r) for r in runs[name]]):6.1f} "
            f"tok/s = {ratio(name):.2f}x full depth (acceptance "
            f"{sum(r.stats.accepted for r in spec) / drafted:.2f}, "
            f"{tokens / max(1, sum(r.stats.rounds for r in spec)):.2f} tokens per round), output "
            f"{'identical to' if same(name) else 'DIFFERENT from'} full-depth greedy"
        )
    if ratio("exits") < 1:
        say(
            "drafts from the tuned exits are accepted too rarely to pay here; a draft tuned on "
            "more self-distilled data drafts better (see docs/generation.md)"
        )
    best = max(drafted_by, key=ratio)
    say(
        f"lossless: speculative decoding drafted by {labels[best]} is {ratio(best):.2f}x eefast's "
        f"own full depth, with {'the same' if same(best) else 'DIFFERENT'} output token for token"
    )


DEMO_STEPS = 240
DEMO_BLOCKS = 256  # of the shipped chat data's 818 training blocks: its hidden cache takes ~80 s
DEMO_DRAFT_VOCAB = 8192  # the draft exit's head reads this many frequent tokens


def cmd_demo(args) -> None:
    """The main job: EE-tune a draft exit for SmolLM2 on the shipped self-distilled chat data
    for a few minutes, report, and decode with it (full depth against lossless speculative,
    drafted by the exit and by the backbone's q4 copy)."""
    say("EE-Tuning demo: frozen backbone, exits tuned with fused losses and the hidden cache")
    t_start = time.perf_counter()
    cmd_tune(args)
    _write_draft_vocab(args, args.out, args.draft_vocab_size)
    demo_generation(args.model, args.out, args.demo_prompts, args.demo_new_tokens, args.weights)
    say(f"demo done in {time.perf_counter() - t_start:.0f} s")


def cmd_train_classifier(args) -> None:
    from ..train.exit_classifier import fit_exit_classifier

    model, train, held_out = _load(args)
    ee = load_exits(model, args.exits)
    train = train[: args.blocks]
    say(f"fitting the exit classifier on {train.numel():,} tokens per exit")
    _, rows = fit_exit_classifier(ee, train, held_out, args.steps, batch_size=args.batch_size)
    print(format_table(rows), flush=True)
    save_classifier(ee, args.exits)
    write_json(Path(args.exits) / "classifier_eval.json", rows)
    say(f"wrote {Path(args.exits) / 'classifier.safetensors'}; use it with --measure classifier")


def cmd_draft_vocab(args) -> None:
    _write_draft_vocab(args, args.exits, args.size)


def _write_draft_vocab(args, exits_dir, size: int) -> None:
    from ..generation.draft_vocab import coverage, frequent_tokens

    model, tokenizer = load(args)
    ee = load_exits(model, exits_dir)  # checks the exits are this model's
    vocab = ee.parts.lm_head.weight.shape[0]
    if not 0 < size < vocab:  # before tokenizing the corpus
        raise SystemExit(f"eefast draft-vocab: --size must be in 1..{vocab - 1}, got {size}")
    blocks = token_blocks(tokenizer, load_documents(args.data), args.seq_len)
    train, held_out = split_blocks(blocks, args.eval_blocks)
    ids = frequent_tokens(train, size, tokenizer.all_special_ids)
    held = coverage(held_out, ids)
    save_draft_vocab(exits_dir, ids, held)
    say(
        f"draft vocabulary: {len(ids):,} of {vocab:,} tokens ({len(ids) / vocab:.0%} of the "
        f"head), covering {coverage(train, ids):.1%} of {args.data}'s training tokens and "
        f"{held:.1%} of its held-out ones; wrote {Path(exits_dir) / DRAFT_VOCAB_FILE}"
    )


def _greedy_replies(model):
    """A ``replies`` function for ``write_self_distilled``: eefast's greedy chat replies,
    decoded speculatively with the backbone's q4 copy drafting where it can have one (the
    same tokens as full depth; 1.15x full depth at batch 8 on SmolLM2, one run), else at full
    depth (2x HF generate here). The exit attached to reach the runner is never used."""
    ee = add_exits(model, [1], "norm", share_lm_head=True)
    try:
        draft = low_bit_draft(ee, "q4")  # once for every batch
    except ValueError:
        draft = None

    def replies(model, tokenizer, prompts, max_new_tokens) -> list[str]:
        mode = "full" if draft is None else "speculative"
        res = generate(ee, tokenizer, prompts, mode, max_new_tokens, chat=True, draft=draft)
        return [t.strip() for t in res.texts]

    return replies


def cmd_distill_data(args) -> None:
    from ..data.chat import write_self_distilled

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args)
    rows = write_self_distilled(
        model,
        tokenizer,
        Path(args.out),
        args.prompts,
        args.max_new_tokens,
        args.batch_size,
        replies=_greedy_replies(model),
    )
    say(f"{args.out}: {rows} chat rows; tune on them with --data {args.out}")


def _common(
    p: argparse.ArgumentParser,
    data: str,
    kind: str,
    steps: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    eval_blocks: int,
    train_blocks: int | None = None,
) -> None:
    add_model_arguments(p, DEFAULT_MODEL)
    p.add_argument(
        "--data",
        default=data,
        help=f"{DEFAULT_CORPUS}, {CHAT_CORPUS} (shipped self-distilled chat), a .txt or a "
        f".jsonl; a+b joins corpora (the held-out blocks come from the last)",
    )
    p.add_argument(
        "--exits",
        type=int_list,
        default=None,
        help="exit after these many blocks (default 8,15,22; the top block for --kind draft)",
    )
    p.add_argument("--kind", choices=EXIT_KINDS, default=kind)
    p.add_argument(
        "--share-lm-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the frozen LM head in every exit instead of copying it",
    )
    p.add_argument("--steps", type=positive_int, default=steps)
    p.add_argument("--lr", type=positive, default=lr)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--seq-len", type=positive_int, default=seq_len)
    p.add_argument("--eval-blocks", type=positive_int, default=eval_blocks)
    p.add_argument(
        "--train-blocks", type=positive_int, default=train_blocks, help="train on the first N"
    )
    p.add_argument("--eval-every", type=positive_int, default=50)
    p.add_argument("--save-every", type=positive_int, default=25)
    p.add_argument("--kd-weight", type=nonnegative, default=0.0)
    p.add_argument(
        "--targets",
        choices=TARGETS,
        default="data",
        help="what the exits learn to predict: the text's next token, or the model's own "
        "greedy next token at every position (any text then teaches what the model says)",
    )
    p.add_argument("--z-loss", type=nonnegative, default=0.0)
    p.add_argument("--exit-weights", type=float_list, default=None)
    p.add_argument("--exit-weight-warmup", type=count, default=0)
    p.add_argument(
        "--cache-hidden",
        action="store_true",
        help="run the backbone once and keep the exit layers' inputs",
    )
    p.add_argument("--cache-path", default=None, help="reuse/write the hidden cache here")
    p.add_argument("--seed", type=int, default=0)


def add_commands(sub) -> None:
    demo = sub.add_parser("demo", help="the main job: EE-tune SmolLM2's exits and report")
    _common(demo, CHAT_CORPUS, "draft", steps=DEMO_STEPS, lr=1e-2, batch_size=4, seq_len=128,
            eval_blocks=16, train_blocks=DEMO_BLOCKS)  # fmt: skip
    demo.add_argument("--out", default="eefast-demo")
    demo.add_argument("--demo-prompts", type=positive_int, default=4)
    demo.add_argument("--demo-new-tokens", type=positive_int, default=128)
    demo.add_argument("--draft-vocab-size", type=positive_int, default=DEMO_DRAFT_VOCAB)
    add_weights_argument(demo)
    demo.set_defaults(func=cmd_demo, init="copy", no_resume=False, cache_hidden=True)

    tune = sub.add_parser("tune", help="EE-tune exits on a frozen model")
    _common(
        tune, DEFAULT_CORPUS, "mlp", steps=200, lr=1e-2, batch_size=4, seq_len=128, eval_blocks=16
    )
    tune.add_argument("--init", choices=("copy", "random"), default="copy")
    tune.add_argument("--out", required=True, help="checkpoints, metrics and the final exits")
    tune.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    scale = tune.add_argument_group("scale-out (under torchrun --nproc-per-node N)")
    scale.add_argument(
        "--pipeline-stages",
        type=positive_int,
        default=1,
        help="P stages, each ending at one of its exits; D = N / P replicas",
    )
    scale.add_argument(
        "--microbatches",
        type=positive_int,
        default=None,
        help="per replica and step (default: the fewest >= P that split the batch evenly)",
    )
    add_timeout_argument(scale)
    tune.set_defaults(func=cmd_tune)

    dd = sub.add_parser(
        "distill-data", help="chat data from the model's own greedy replies (for tuning exits)"
    )
    add_model_arguments(dd, DEFAULT_MODEL)
    dd.add_argument("--out", required=True, help="the .jsonl to write (a rerun resumes it)")
    dd.add_argument("--prompts", type=positive_int, default=240)
    dd.add_argument("--max-new-tokens", type=positive_int, default=128)
    dd.add_argument("--batch-size", type=positive_int, default=8)
    dd.add_argument("--threads", type=count, default=0, help="torch threads (default: torch's)")
    dd.set_defaults(func=cmd_distill_data)

    dv = sub.add_parser(
        "draft-vocab", help="cut the exit heads to the tokens the data uses most (faster drafts)"
    )
    add_model_arguments(dv, DEFAULT_MODEL)
    dv.add_argument("--exits", required=True, help="directory with exits.json")
    dv.add_argument("--data", default=DEFAULT_CORPUS, help="text like the model's replies")
    dv.add_argument("--size", type=positive_int, default=16384, help="most frequent tokens to keep")
    dv.add_argument("--seq-len", type=positive_int, default=128)
    dv.add_argument("--eval-blocks", type=positive_int, default=16)
    dv.set_defaults(func=cmd_draft_vocab)

    tc = sub.add_parser(
        "train-classifier", help="fit the exit classifier (threshold mode's --measure classifier)"
    )
    add_model_arguments(tc, DEFAULT_MODEL)
    tc.add_argument("--exits", required=True, help="directory with exits.json")
    tc.add_argument("--data", default=DEFAULT_CORPUS)
    tc.add_argument("--seq-len", type=positive_int, default=128)
    tc.add_argument("--eval-blocks", type=positive_int, default=16)
    tc.add_argument(
        "--blocks", type=positive_int, default=128, help="training blocks (labels cost a pass)"
    )
    tc.add_argument("--steps", type=positive_int, default=300)
    tc.add_argument("--batch-size", type=positive_int, default=4)
    tc.set_defaults(func=cmd_train_classifier)

    ev = sub.add_parser("eval-exits", help="per-exit perplexity, agreement and confidence")
    add_model_arguments(ev, DEFAULT_MODEL)
    ev.add_argument("--exits", required=True, help="directory with exits.json")
    ev.add_argument("--data", default=DEFAULT_CORPUS)
    ev.add_argument("--seq-len", type=positive_int, default=128)
    ev.add_argument("--eval-blocks", type=positive_int, default=16)
    ev.add_argument("--batch-size", type=positive_int, default=4)
    ev.add_argument(
        "--out", default=None, help="where to write the JSON and PNG (default: --exits)"
    )
    ev.set_defaults(func=cmd_eval_exits)
