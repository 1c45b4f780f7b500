"""How far a lossy decoder strays from the full model: token agreement with full-depth greedy,
and the calibration that picks threshold mode's threshold for a target agreement."""

from __future__ import annotations

import torch

from ..generation import generate

CALIBRATION_THRESHOLDS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]


def agreement(ee, ids: list[list[int]], outputs: list[list[int]]) -> float:
    """Share of generated tokens equal to the full model's greedy choice after the same prefix
    (one teacher-forced forward per sequence)."""
    same = total = 0
    with torch.no_grad():
        for prompt, toks in zip(ids, outputs, strict=True):
            if not toks:
                continue
            logits = ee.model(torch.tensor([prompt + toks], device=ee.model.device)).logits[0]
            want = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
            same += sum(a == b for a, b in zip(toks, want, strict=True))
            total += len(toks)
    return same / total if total else 1.0


def calibrate(ee, tokenizer, ids, thresholds, target, max_new, measure="max_prob", report=None):
    """Per threshold: agreement with the full model and speed; the lowest threshold whose
    agreement reaches the target (None when none does). ``report`` gets a line per threshold."""
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
        if report is not None:
            report(
                f"threshold {th}: agreement {rows[-1]['agreement']:.3f}, "
                f"{rows[-1]['tokens_per_s']:.1f} tok/s, mean layers {rows[-1]['mean_layers']:.1f}"
            )
    ok = [r for r in rows if r["agreement"] >= target]
    return rows, (min(ok, key=lambda r: r["threshold"])["threshold"] if ok else None)
