"""eefast's generation modes against HF ``generate``, side by side in one run (the library side
of ``eefast bench-generate``)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..generation import DRAFT_THRESHOLD, FEATURE_DRAFT_THRESHOLD, generate, low_bit_draft
from ..generation.runner import Runner
from ..hf.tokens import hf_greedy, pad_id, prompt_ids
from ..io import write_json
from .agreement import agreement
from .llama_cpp import LlamaCpp


def _hf_generate(model, tokenizer, batch_ids, max_new, **kw) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    new = hf_greedy(model, batch_ids, pad_id(tokenizer), max_new, **kw)
    seconds = time.perf_counter() - t0
    eos = tokenizer.eos_token_id
    toks = []
    for row in new.tolist():
        toks.append(row[: row.index(eos) + 1] if eos in row else row)
    return toks, seconds


WARMUP_TOKENS = 8  # each case decodes this many tokens of the first batch before timing


def _batches(ids, size):
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _cases(ee, bs, thresholds, draft_thresholds, variant_thresholds, kv_variants, draft_ks,
           llama_cpp=(), low_bit=None, draft_widths=(None,)):  # fmt: skip
    """(name, mode, generate kwargs) per case at batch size ``bs``; mode None: HF; mode
    "llama.cpp": one of ``llama_cpp`` (batch 1, one sequence at a time); ``low_bit``: name ->
    a low_bit_draft of the backbone, one speculative row each."""
    cases = [("hf greedy", None, {})]
    if bs == 1:
        cases += [(p.name, "llama.cpp", {"provider": p}) for p in llama_cpp]
    cases += [("eefast full", "full", {})]
    cases += [(f"eefast speculative {w} draft", "speculative", {"draft": d})
              for w, d in (low_bit or {}).items()]  # fmt: skip
    if ee.kind == "draft":  # one head on top of the model: speculative only
        cases += [
            (f"eefast speculative draft{_named('k', k)}{_named('w', w)} conf {t}",
             "speculative", {"threshold": t, "draft_k": k, "draft_width": w})
            for w in draft_widths
            for k in draft_ks
            for t in draft_thresholds
        ]  # fmt: skip
        return cases
    # HF's assisted generation is batch-1 only, and its early-exit assistant runs on the
    # llama family only (on gpt_neox, for one, it fails in its own KV cache).
    if bs == 1 and ee.parts.model_type in ("llama", "mistral", "qwen2"):
        cases += [
            (f"hf assistant_early_exit={e}", None, {"assistant_early_exit": e})
            for e in ee.exit_layers
        ]
    # Classic self-speculation (one exit drafts k tokens a round), then drafts from the
    # first confident exit of all of them, at each draft threshold.
    cases += [
        (f"eefast speculative E={e}", "speculative", {"exit_layer": e, "threshold": 0.0})
        for e in ee.exit_layers
    ]
    cases += [
        (f"eefast speculative conf {t}", "speculative", {"threshold": t}) for t in draft_thresholds
    ]
    if ee.draft_vocab is not None:  # what the draft vocabulary buys, in the same run
        t = DRAFT_THRESHOLD
        cases += [(f"eefast speculative conf {t} full-vocab drafts", "speculative",
                   {"threshold": t, "draft_vocab": False})]  # fmt: skip
    cases += [(f"eefast threshold {t} (lossy)", "threshold", {"threshold": t}) for t in thresholds]
    # Variants of threshold mode at the same thresholds: CALM's KV copy-up (where it runs),
    # the classifier.
    if not Runner(ee).propagates_kv:
        kv_variants = [kv for kv in kv_variants if kv != "propagate"]
    cases += [
        (f"eefast threshold {t} kv={kv} (lossy)", "threshold", {"threshold": t, "kv": kv})
        for kv in kv_variants
        for t in variant_thresholds
    ]
    if ee.classifier is not None:
        cases += [
            (f"eefast threshold {t} classifier (lossy)", "threshold",
             {"threshold": t, "measure": "classifier"})
            for t in variant_thresholds
        ]  # fmt: skip
    return cases


def _named(name: str, value) -> str:
    """' k=2' for a value given, '' for a default."""
    return "" if value is None else f" {name}={value}"


def _run_case(ee, tokenizer, batches, mode, kw, max_new):
    toks, seconds, stats = [], 0.0, None
    for batch in batches:
        if mode == "llama.cpp":
            runs = [kw["provider"].greedy(ids, max_new, tokenizer.eos_token_id) for ids in batch]
            t, s = [r[0] for r in runs], sum(r[1] for r in runs)
        elif mode is None:
            t, s = _hf_generate(ee.model, tokenizer, batch, max_new, **kw)
        else:
            res = generate(ee, tokenizer, batch, mode, max_new, **kw)
            t, s = res.tokens, res.seconds
            stats = _merge(stats, res)
        toks += t
        seconds += s
    return toks, seconds, stats


def run_bench(
    ee,
    tokenizer,
    *,
    batch_sizes: list[int],
    prompts: list[str],
    max_new_tokens: int,
    thresholds: list[float],
    draft_thresholds: list[float] | None,
    variant_thresholds: list[float],
    kv_variants: list[str],
    threads: int,
    out: str | Path,
    repeats: int = 1,
    draft_ks: list[int | None] = (None,),
    draft_widths: list[int | None] = (None,),
    low_bit_drafts: list[str] = ("q4",),
    ggufs: list[str | Path] = (),
    report=print,
) -> list[dict]:
    """Every case at every batch size over the chat ``prompts``, ``repeats`` times with the
    cases alternating (so drift hits them alike), after one short untimed run of each; one
    row each with the median tokens/s, its ratios to HF greedy and to eefast's own full depth
    (medians of the per-repeat ratios), whether the output equals HF greedy's, acceptance,
    agreement, blocks and heads per token.
    Each of ``ggufs`` adds llama.cpp on that file at batch 1 (``eval/llama_cpp.py``), and each
    of ``low_bit_drafts`` a speculative row drafted by that low-bit copy of the backbone (where
    it can have one). Rows are reported line by line and written to ``out`` as JSON and PNG."""
    torch.set_num_threads(threads)
    llama_cpp = [LlamaCpp(g, threads) for g in ggufs]
    low_bit = {}
    for weights in low_bit_drafts if ee.kind != "layer" else ():  # generate refuses the mix
        try:
            low_bit[weights] = low_bit_draft(ee, weights)
        except ValueError as e:
            report(f"no {weights} draft rows: {e}")
    if draft_thresholds is None:
        draft_thresholds = (
            [FEATURE_DRAFT_THRESHOLD] if ee.kind == "draft" else [0.5, DRAFT_THRESHOLD, 0.7]
        )
    ids = prompt_ids(tokenizer, prompts, chat=True)
    rows = []
    for bs in batch_sizes:
        batches = _batches(ids, bs)
        cases = _cases(ee, bs, thresholds, draft_thresholds, variant_thresholds, kv_variants,
                       list(draft_ks), llama_cpp, low_bit, list(draft_widths))  # fmt: skip
        speeds = {name: [] for name, _, _ in cases}
        first = {}
        for _, mode, kw in cases:  # warm-up, untimed: first calls pay allocations and setup
            _run_case(ee, tokenizer, batches[:1], mode, kw, WARMUP_TOKENS)
        for _ in range(repeats):
            for name, mode, kw in cases:
                toks, seconds, stats = _run_case(ee, tokenizer, batches, mode, kw, max_new_tokens)
                speeds[name].append(sum(len(t) for t in toks) / seconds)
                first.setdefault(name, (toks, stats, mode))
        reference = first["hf greedy"][0]
        for name, _, _ in cases:
            toks, stats, mode = first[name]
            n = sum(len(t) for t in toks)
            row = {
                "batch": bs,
                "provider": name,
                "tokens": n,
                "tokens_per_s": statistics.median(speeds[name]),
                "tokens_per_s_runs": speeds[name],
                "vs_hf": _median_ratio(speeds[name], speeds["hf greedy"]),
                "vs_full": _median_ratio(speeds[name], speeds["eefast full"]),
                "same_as_hf_greedy": toks == reference,
                "same_as_full": toks == first["eefast full"][0],
            }
            if stats is not None:
                layers = [la for seq in stats["layers"] for la in seq]
                row["mean_layers"] = sum(layers) / max(1, len(layers))
                row["blocks_per_token"] = stats["block_calls"] / max(1, n)
                row["heads_per_token"] = stats["head_calls"] / max(1, n)
                row["exit_layers"] = {str(k): v for k, v in sorted(stats["hist"].items())}
                if mode == "speculative":
                    row["acceptance"] = stats["accepted"] / max(1, stats["drafted"])
                    row["tokens_per_round"] = n / max(1, stats["rounds"])
                    row["verify_rows_per_token"] = stats["verify_rows"] / max(1, n)
                if mode == "threshold":
                    row["agreement"] = agreement(ee, ids[: len(toks)], toks)
            rows.append(row)
            report(_format(row))
    out = Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(out / f"generate-{stamp}.json", rows)
    _plot(rows, out / f"generate-{stamp}.png")
    report(f"wrote {out / f'generate-{stamp}.json'} and the PNG beside it")
    return rows


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _merge(acc, res):
    acc = acc or {
        "layers": [],
        "hist": {},
        "accepted": 0,
        "drafted": 0,
        "rounds": 0,
        "block_calls": 0,
        "head_calls": 0,
        "verify_rows": 0,
    }
    acc["layers"] += res.layers
    for k, v in res.stats.exit_layers.items():
        acc["hist"][k] = acc["hist"].get(k, 0) + v
    acc["accepted"] += res.stats.accepted
    acc["drafted"] += res.stats.drafted
    acc["rounds"] += res.stats.rounds
    acc["block_calls"] += res.stats.block_calls
    acc["head_calls"] += res.stats.head_calls
    acc["verify_rows"] += res.stats.verify_rows
    return acc


def _format(row) -> str:
    text = (
        f"batch {row['batch']} {row['provider']:<40} {row['tokens_per_s']:6.1f} tok/s "
        f"({row['vs_hf']:.2f}x HF greedy, {row['vs_full']:.2f}x eefast full)"
    )
    keys = ("acceptance", "tokens_per_round", "agreement", "mean_layers", "blocks_per_token")
    for key in keys + ("heads_per_token", "verify_rows_per_token"):
        if key in row:
            text += f" {key} {row[key]:.2f}"
    if "exit_layers" in row and len(row["exit_layers"]) > 1:
        text += f" exits {row['exit_layers']}"
    if "acceptance" in row and not row["same_as_full"]:
        text += " [OUTPUT DIFFERS FROM FULL DEPTH]"
    return text + ("" if row["same_as_hf_greedy"] else " [output differs from HF greedy]")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for bs in sorted({r["batch"] for r in rows}):
        base = next(r for r in rows if r["batch"] == bs and r["provider"] == "hf greedy")
        pts = [
            (r["agreement"], r["tokens_per_s"] / base["tokens_per_s"])
            for r in rows
            if r["batch"] == bs and "agreement" in r
        ]
        spec = [
            r["tokens_per_s"] / base["tokens_per_s"]
            for r in rows
            if r["batch"] == bs and "acceptance" in r
        ]
        if pts:
            ax.plot(*zip(*sorted(pts), strict=True), "o-", label=f"threshold, batch {bs}")
        if spec:
            ax.plot([1.0], [max(spec)], "*", ms=12, label=f"best speculative, batch {bs}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("token agreement with the full model")
    ax.set_ylabel("speed vs HF greedy")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
