"""Decoding on architectures beyond the llama family: eefast's full depth and speculative
modes against HF ``generate``, on random models of shapes users know (no hub here), and what a
fused block would buy there.

Models (random weights, SmolLM2's vocabulary of 49152):
* gpt_neox shaped like Pythia-160m: d 768, 12 blocks, 12 heads, MLP 3072, rotary_pct 0.25,
  parallel attention + MLP;
* gpt2 shaped like GPT-2 small: d 768, 12 blocks, 12 heads;
* llama of the same size (d 768, 12 blocks, 12 heads, MLP 3072), run twice: its blocks as
  one ``decode_block`` call each, and as lean Python blocks (HF's operations without module
  dispatch, linears on ``decode_linear``). Their ratio says what a fused block is worth at
  this size, for the architectures that have none (they run HF's modules).

Exits are untuned ``norm`` exits after blocks 4 and 8, so speculative acceptance reflects a
random model, not a tuned one; the full-depth rows are the point.
"""

from __future__ import annotations

import statistics
import time

import torch
import transformers as T

from eefast import add_exits
from eefast.generation import generate
from eefast.generation import runner as runner_module
from eefast.hf.tokens import hf_greedy

VOCAB = 49152
SHAPES = {
    "gpt_neox (Pythia-160m shape)": T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, rotary_pct=0.25, use_parallel_residual=True,
    ),
    "gpt2 (GPT-2 small shape)": T.GPT2Config(
        vocab_size=VOCAB, n_embd=768, n_layer=12, n_head=12, bos_token_id=0, eos_token_id=0,
    ),
    "llama (same size)": T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=12, intermediate_size=3072,
    ),
}  # fmt: skip


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(new_tokens: int = 64, prompt_len: int = 32, repeats: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, VOCAB, (1, prompt_len), generator=g).tolist()
    rows = []
    for name, config in SHAPES.items():
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(config).eval()
        ee = add_exits(model, [4, 8], kind="norm", share_lm_head=True)
        hf_s, hf_out = _timed(lambda m=model: hf_greedy(m, prompt, 0, new_tokens,
                                                        eos_token_id=None), repeats)  # fmt: skip
        cases = [("eefast full", dict(mode="full"))]
        cases += [("eefast speculative E=8", dict(mode="speculative", exit_layer=8,
                                                  threshold=0.0))]  # fmt: skip
        real_fused = runner_module.fused_block
        variants = [("", None)]
        if "llama" in name:
            variants.append((" (lean blocks, no decode_block)", lambda *a: None))
        for suffix, fused in variants:
            if fused is not None:
                runner_module.fused_block = fused
            try:
                for case, kw in cases:

                    def run_case(kw=kw, ee=ee):
                        return generate(ee, None, prompt, max_new_tokens=new_tokens,
                                        stop_at_eos=False, **kw)  # fmt: skip

                    secs, res = _timed(run_case, repeats)
                    same = res.tokens[0] == hf_out[0].tolist()[:new_tokens]
                    rows.append({"model": name, "case": case + suffix,
                                 "tokens_per_s": round(new_tokens / secs, 1),
                                 "vs_hf": round(hf_s / secs, 2), "same_as_hf": same,
                                 "acceptance": round(res.stats.acceptance, 2)})  # fmt: skip
            finally:
                runner_module.fused_block = real_fused
        rows.append({"model": name, "case": "hf greedy", "tokens_per_s":
                     round(new_tokens / hf_s, 1), "vs_hf": 1.0, "same_as_hf": True})  # fmt: skip
        for row in rows[-len(cases) * len(variants) - 1 :]:
            print(row, flush=True)
    return rows
