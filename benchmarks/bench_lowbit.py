"""Decoding SmolLM2 on a low-bit backbone: eefast float32 against eefast int8 (weight-only,
``load_model(weights="int8")``) and q4 (the shipped GGUF's own Q4_1 blocks and Q8_0 head,
``load_model(weights="q4")``), eefast float32 decoding speculatively with its q4 copy drafting
(lossless), and llama.cpp on the shipped Q4_1 file and any other GGUF files where
``llama-cpp-python`` is installed (an optional benchmark dependency), side by side in one run.

Chat prompts, batch 1, greedy, ``--new-tokens`` each, the cases alternating ``--repeats``
times; rows give median tokens/s and the median of per-repeat ratios to eefast float32. The
quality rows: held-out perplexity of each eefast backbone (a low-bit one with its low-bit LM
head), the share of generated tokens equal to float32's before the first difference, and
their agreement with float32 (the share of generated tokens equal to float32's greedy choice
after the same prefix, as threshold mode's agreement is measured).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from eefast import load_model
from eefast.data import PROMPTS, load_documents, split_blocks, token_blocks
from eefast.eval.agreement import agreement
from eefast.eval.llama_cpp import LlamaCpp
from eefast.generation import generate, low_bit_draft
from eefast.hf.loading import _smollm2_gguf
from eefast.hf.tokens import chat_prompt_ids
from eefast.nn.quantized import quantized_linear


def _eefast_case(weights: str):
    model, tokenizer = load_model(weights=weights)
    from eefast import add_exits

    ee = add_exits(model, [8], kind="norm", share_lm_head=True)  # full depth ignores it
    return _decode(ee, tokenizer, "full"), ee, tokenizer


def _decode(ee, tokenizer, mode, **kw):
    def run(prompts, new_tokens):
        toks, seconds = [], 0.0
        for p in prompts:
            res = generate(ee, tokenizer, [p], mode, new_tokens, chat=True, stop_at_eos=False,
                           **kw)  # fmt: skip
            toks.append(res.tokens[0])
            seconds += res.seconds
        return toks, seconds

    return run


def _llama_cpp_case(gguf: Path, tokenizer, threads: int):
    llm = LlamaCpp(gguf, threads)

    def run(prompts, new_tokens):
        toks, seconds = [], 0.0
        for p in prompts:
            out, s = llm.greedy(chat_prompt_ids(tokenizer, p), new_tokens)
            toks.append(out)
            seconds += s
        return toks, seconds

    return run


@torch.no_grad()
def _perplexity(model, tokenizer, blocks: int = 16, chunk: int = 32) -> float:
    """Held-out perplexity, each sequence fed ``chunk`` tokens at a time with its KV cache,
    so every linear sees as few rows as decoding does (a q4 backbone then rounds its
    activations to int8 as in decoding; more than 64 rows would dequantise instead)."""
    held = split_blocks(token_blocks(tokenizer, load_documents(), 128), blocks)[1]
    head, total, count = model.get_output_embeddings(), 0.0, 0
    for ids in held:
        past, hidden = None, []
        for i in range(0, ids.shape[0] - 1, chunk):
            out = model.base_model(ids[None, i : min(i + chunk, ids.shape[0] - 1)],
                                   past_key_values=past, use_cache=True)  # fmt: skip
            past = out.past_key_values
            h = out.last_hidden_state[0]
            if hasattr(head, "qweight"):
                hidden.append(quantized_linear(h, head.qweight, head.scales, head.bias))
            else:
                hidden.append(head(h))
        loss = torch.nn.functional.cross_entropy(torch.cat(hidden).float(), ids[1:],
                                                 reduction="sum")  # fmt: skip
        total, count = total + float(loss), count + ids.shape[0] - 1
    return math.exp(total / count)


def _same_prefix(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of b's tokens that equal a's before the first difference, per sequence."""
    kept = 0
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        kept += n
    return kept / max(1, sum(len(y) for y in b))


def run(prompts: int, new_tokens: int, repeats: int, ggufs: list[Path], threads: int):
    torch.set_num_threads(threads)
    chosen = PROMPTS[:prompts]
    cases, quality = {}, {}
    for weights in ("fp32", "int8", "q4"):
        case, ee, tokenizer = _eefast_case(weights)
        cases[f"eefast {weights}"] = case
        quality[f"eefast {weights}"] = _perplexity(ee.model, tokenizer)
        if weights == "fp32":
            fp32 = ee
            draft = low_bit_draft(ee, "q4")
            cases["eefast fp32, q4 copy drafts (lossless)"] = _decode(
                ee, tokenizer, "speculative", draft=draft
            )
    for gguf in [_smollm2_gguf(), *ggufs]:
        try:
            cases[f"llama.cpp {gguf.name}"] = _llama_cpp_case(gguf, tokenizer, threads)
        except ImportError:
            print("llama-cpp-python is not installed: pip install llama-cpp-python")
            break
    speeds = {name: [] for name in cases}
    outputs = {}
    for _ in range(repeats):
        for name, case in cases.items():
            toks, seconds = case(chosen, new_tokens)
            speeds[name].append(sum(len(t) for t in toks) / seconds)
            outputs.setdefault(name, toks)
    base = speeds["eefast fp32"]
    ids = [chat_prompt_ids(tokenizer, p) for p in chosen]
    rows = []
    for name in cases:
        ratios = [a / b for a, b in zip(speeds[name], base, strict=True)]
        row = {
            "case": name,
            "tokens_per_s": round(statistics.median(speeds[name]), 1),
            "runs": [round(s, 1) for s in speeds[name]],
            "vs_eefast_fp32": round(statistics.median(ratios), 2),
            "same_prefix_as_fp32": round(_same_prefix(outputs["eefast fp32"], outputs[name]), 3),
            "agreement_with_fp32": round(agreement(fp32, ids, outputs[name]), 3),
        }
        if name in quality:
            row["held_out_ppl"] = round(quality[name], 3)
        rows.append(row)
        print(row, flush=True)
    return rows
