"""EE-Tuning step throughput on SmolLM2: eefast against the naive implementation.

naive: the full model forward with autograd enabled (frozen parameters,
output_hidden_states=True, HF's own full LM-head logits), then the same exit modules with
eager per-exit logits + cross-entropy, then backward. eefast: the backbone without grad,
stopped after the deepest exit, and the fused multi-exit loss. eefast-cached: the same step
fed from the hidden-state cache (epochs after the first). Every provider ends with the same
AdamW step on the exit parameters.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from eefast import add_exits, load_model
from eefast.data import load_documents, next_token_targets, token_blocks
from eefast.timing import time_median
from eefast.train.hidden_cache import HiddenCache

from .common import Row, peak_extra_memory_mib

PROVIDERS = ["eefast", "eefast-cached", "naive"]


def naive_loss(ee, ids, targets):
    out = ee.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    total = 0.0
    for layer in ee.exit_layers:
        h = ee.exit(layer)(out.hidden_states[layer])
        weight, bias = ee.head(layer)
        total = total + F.cross_entropy(F.linear(h, weight, bias).flatten(0, 1), targets)
    return total


def run(
    layers, kind, batch_size, seq_len, providers, budget_s: float = 10.0, dtype=torch.float32
) -> list[Row]:
    device = torch.get_default_device()
    model, tokenizer = load_model(dtype=dtype)
    model.to(device)
    blocks = token_blocks(tokenizer, load_documents(), seq_len)[: 4 * batch_size].to(device)
    ids = blocks[:batch_size]
    targets = next_token_targets(ids)
    ones = [1.0] * len(layers)
    case = {
        "model": "SmolLM2-135M",
        "exits": ",".join(map(str, layers)),
        "kind": kind,
        "tokens": batch_size * seq_len,
        "dtype": str(dtype).removeprefix("torch."),
    }
    rows = []
    for provider in providers:
        ee = add_exits(copy.deepcopy(model), layers, kind=kind, share_lm_head=True)
        opt = torch.optim.AdamW(ee.exit_parameters(), lr=1e-5)
        if provider == "naive":

            def loss(ee=ee):
                return naive_loss(ee, ids, targets)
        elif provider == "eefast":

            def loss(ee=ee):
                return ee.exit_losses(ee.backbone_states(ids), targets, ones)[0]
        else:
            cache = HiddenCache.build(ee, blocks, batch_size, progress=False)

            def loss(ee=ee, cache=cache):
                states = cache.states(torch.arange(batch_size), device)
                return ee.exit_losses(states, targets, ones)[0]

        def step(loss=loss, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()

        seconds, _ = time_median(step, min_reps=3, budget_s=budget_s)
        row = Row(
            "ee_tune_step",
            case,
            provider,
            seconds * 1e3,
            peak_extra_memory_mib(step),
            {"tokens_per_s": batch_size * seq_len / seconds},
        )
        rows.append(row)
        print(
            f"  {provider:<14} {row.ms:9.1f} ms/step  {row.extra['tokens_per_s']:7.1f} tok/s"
            f"  peak {row.peak_mib} MiB",
            flush=True,
        )
    return rows
