"""What a speculative verify step costs against its number of rows, and what one draft step
costs (a draft exit's, and the low-bit copies' of the backbone), on SmolLM2
(``python -m benchmarks verify``).

A verify step runs every block and the LM head over the round's rows after a prompt of
``context`` tokens, exactly as decoding does (``decode_block``, ``decode_linear``); it is timed
for each row count in turn, ``repeats`` times, and undone after each call. The ratios to one
row decide which drafts can pay: a draft is worth its row only if it is right more often than
the row costs."""

from __future__ import annotations

import statistics
import time

import torch

from eefast.exits import add_exits
from eefast.generation.cache import DecodeState
from eefast.generation.feature_draft import prefill_with_draft
from eefast.generation.low_bit_draft import DRAFT_WEIGHTS, _draft_token, low_bit_draft
from eefast.generation.runner import Runner
from eefast.generation.sampling import Sampling
from eefast.hf import load_model

DRAFT_VOCAB = 5480  # the size `eefast draft-vocab` picks on the shipped chat data


def run(rows: list[int], context: int, repeats: int) -> list[dict]:
    model, _ = load_model()
    ee = add_exits(model, [model.config.num_hidden_layers], "draft", share_lm_head=True)
    runner = Runner(ee, torch.arange(DRAFT_VOCAB))
    L, d = runner.num_layers, model.config.hidden_size
    gen = torch.Generator().manual_seed(0)

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(100, 5000, (1, n), generator=gen)

    copies = {weights: low_bit_draft(ee, weights) for weights in DRAFT_WEIGHTS}
    times: dict[str, list[float]] = {}
    with torch.no_grad(), runner.decode_linears():
        state = DecodeState(runner.cache_layers, 1, "cpu")
        prefill_with_draft(runner, state, tokens(context), torch.ones(1, context, dtype=bool))
        slots = state.slots

        def verify(q: int) -> None:
            state.add_slots(torch.ones(1, q, dtype=torch.bool))
            runner.final_logits(runner.run(runner.embed(tokens(q), state), 0, L, state))

        def draft() -> None:
            state.add_slots(torch.ones(1, 1, dtype=torch.bool))
            f = runner.draft_features(torch.randn(1, 1, 2 * d, generator=gen), state)
            runner.exit_head_stats(L, f[:, -1])

        def low_bit_step(copy) -> None:
            state.add_slots(torch.ones(1, 1, dtype=torch.bool))
            h = runner.run(runner.embed(tokens(1), state), 0, L, state, blocks=copy.blocks)
            _draft_token(runner, h[:, -1], copy, Sampling(), None)

        cases = [(f"verify {q} rows", lambda q=q: verify(q)) for q in rows]
        cases.append((f"draft step ({DRAFT_VOCAB}-token head)", draft))
        for weights, copy in copies.items():
            cases.append((f"{weights} draft step", lambda c=copy: low_bit_step(c)))
        for _ in range(repeats + 1):  # the first round warms up
            for name, fn in cases:
                t0 = time.perf_counter()
                fn()
                times.setdefault(name, []).append(time.perf_counter() - t0)
                state.truncate(slots)
    base = statistics.median(times[f"verify {rows[0]} rows"][1:])
    out = []
    for name, ts in times.items():
        median = statistics.median(ts[1:])
        out.append({"case": name, "ms": 1e3 * median, "vs_first": median / base})
        print(f"{name:<34} {1e3 * median:8.2f} ms  {median / base:5.2f}x", flush=True)
    return out
