"""Per-exit quality on held-out text: perplexity, agreement with the final layer, confidence.

Every exit is compared with its untuned baseline (the model's own final norm and LM head
applied at that layer), and the final layer itself is the last row. All statistics come from
the fused ops, so no ``[tokens, vocab]`` logits are built.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..data.corpus import IGNORE, next_token_targets
from ..exits.model import CONFIDENCE_THRESHOLDS, EarlyExitModel
from ..ops import exit_stats, linear_cross_entropy


class _Tally:
    def __init__(self, thresholds):
        self.nll = self.tokens = self.agree = 0.0
        self.above = [0.0] * len(thresholds)

    def add(self, h, weight, bias, targets, final_argmax, thresholds):
        valid = targets != IGNORE
        nll = linear_cross_entropy(h, weight, targets, bias=bias, reduction="none")
        stats = exit_stats(h, weight, bias)
        self.nll += float(nll[valid].sum())
        self.tokens += int(valid.sum())
        self.agree += int((stats.argmax == final_argmax)[valid].sum())
        for i, t in enumerate(thresholds):
            self.above[i] += int((stats.max_prob >= t)[valid].sum())

    def row(self, layer, name, thresholds) -> dict:
        n = max(self.tokens, 1)
        row = {
            "layer": layer,
            "exit": name,
            "ppl": math.exp(self.nll / n),
            "agreement": self.agree / n,
        }
        row |= {f"conf>={t}": a / n for t, a in zip(thresholds, self.above, strict=True)}
        return row


@torch.no_grad()
def evaluate_exits(
    ee: EarlyExitModel,
    blocks: torch.Tensor,
    batch_size: int = 4,
    thresholds=CONFIDENCE_THRESHOLDS,
    baseline: bool = True,
    progress: bool = True,
) -> list[dict]:
    """One row per exit (and per untuned baseline), plus the final layer's row. A draft exit
    (which sees the previous position's top feature and this token) has no untuned
    baseline; its agreement is the share of first drafts the full model would accept."""
    layers = ee.exit_layers
    baseline = baseline and ee.kind != "draft"
    tuned = {layer: _Tally(thresholds) for layer in layers}
    base = {layer: _Tally(thresholds) for layer in layers} if baseline else {}
    final = _Tally(thresholds)
    final_w, final_b = ee.final_head()
    device = ee.model.device
    for start in tqdm(
        range(0, len(blocks), batch_size), desc="eval exits", unit="batch", disable=not progress
    ):
        ids = blocks[start : start + batch_size].to(device)
        targets = next_token_targets(ids)
        states = ee.backbone_states(ids, need_final=True)
        hf = states.final.flatten(0, -2)
        final_argmax = exit_stats(hf, final_w, final_b).argmax
        final.add(hf, final_w, final_b, targets, final_argmax, thresholds)
        for layer in layers:
            weight, bias = ee.head(layer)
            h = ee.exit_hidden(layer, states).flatten(0, -2)
            tuned[layer].add(h, weight, bias, targets, final_argmax, thresholds)
            if baseline:
                hb = ee.baseline_hidden(layer, states).flatten(0, -2)
                base[layer].add(hb, final_w, final_b, targets, final_argmax, thresholds)
    rows = []
    for layer in layers:
        rows.append(tuned[layer].row(layer, f"exit ({ee.kind})", thresholds))
        if baseline:
            rows.append(base[layer].row(layer, "untuned baseline", thresholds))
    rows.append(final.row(ee.num_layers, "final layer", thresholds))
    return rows


def format_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    cells = [[_fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if v >= 10 else f"{v:.3f}"
    return str(v)


def plot_exits(rows: list[dict], path) -> None:
    """PNG: perplexity and agreement/confidence against layer, tuned vs untuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_agree) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("exit", "o-"), ("untuned baseline", "s--")):
        sel = [r for r in rows if r["exit"].startswith(name)]
        if not sel:
            continue
        x = [r["layer"] for r in sel]
        ax_ppl.plot(x, [r["ppl"] for r in sel], style, label=name)
        ax_agree.plot(x, [r["agreement"] for r in sel], style, label=f"{name}: top-1 agreement")
        last = [k for k in sel[0] if k.startswith("conf>=")][-1]
        ax_agree.plot(x, [r[last] for r in sel], style, alpha=0.5, label=f"{name}: {last}")
    final = rows[-1]
    ax_ppl.axhline(final["ppl"], color="gray", linestyle=":", label="final layer")
    ax_ppl.set(xlabel="exit layer", ylabel="held-out perplexity", yscale="log")
    ax_agree.set(xlabel="exit layer", ylabel="share of tokens", ylim=(0, 1))
    ax_ppl.legend()
    ax_agree.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
