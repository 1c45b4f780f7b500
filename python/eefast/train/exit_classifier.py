"""Fit the exit classifier on a frozen model with tuned exits.

Labels come from the model itself: a token is positive at exit l when that exit's argmax
equals the final layer's. Features are each exit's pre-head hidden states. The fit is
full-batch logistic regression (Adam), and the report compares the classifier with max-prob
at the same thresholds on held-out tokens: precision (how often an exit it allows agrees with
the full model) and coverage (how many tokens it lets exit).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..exits.model import CONFIDENCE_THRESHOLDS, EarlyExitModel
from ..nn.exit_classifier import ExitClassifier
from ..ops import exit_stats


@torch.no_grad()
def exit_examples(ee: EarlyExitModel, blocks: torch.Tensor, batch_size: int = 4, progress=True):
    """Per exit layer: (features [N, d], exit max-prob [N], label [N] bool)."""
    final_w, final_b = ee.final_head()
    got: dict[int, list[tuple]] = {layer: [] for layer in ee.exit_layers}
    for start in tqdm(
        range(0, len(blocks), batch_size), desc="exit labels", unit="batch", disable=not progress
    ):
        states = ee.backbone_states(blocks[start : start + batch_size], need_final=True)
        final_argmax = exit_stats(states.final.flatten(0, -2), final_w, final_b).argmax
        for layer in ee.exit_layers:
            h = ee.exit_hidden(layer, states).flatten(0, -2)
            st = exit_stats(h, *ee.head(layer))
            got[layer].append((h.float(), st.max_prob, st.argmax == final_argmax))
    return {
        layer: tuple(torch.cat(col) for col in zip(*rows, strict=True))
        for layer, rows in got.items()
    }


def _precision_coverage(score, label, t):
    chosen = score >= t
    n = int(chosen.sum())
    return (float(label[chosen].float().mean()) if n else float("nan")), n / len(label)


def fit_exit_classifier(
    ee: EarlyExitModel,
    train_blocks: torch.Tensor,
    held_out: torch.Tensor,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[ExitClassifier, list[dict]]:
    """The fitted classifier (attached as ``ee.classifier``) and per-exit held-out rows."""
    d = ee.parts.final_norm.weight.shape[0]
    clf = ExitClassifier(ee.exit_layers, d).to(ee.model.device)
    train = exit_examples(ee, train_blocks, batch_size, progress)
    test = exit_examples(ee, held_out, batch_size, progress)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="fit classifier", disable=not progress):
        opt.zero_grad()
        loss = sum(
            torch.nn.functional.binary_cross_entropy_with_logits(clf.logit(layer, x), y.float())
            for layer, (x, _, y) in train.items()
        )
        loss.backward()
        opt.step()
    clf.requires_grad_(False)
    rows = []
    with torch.no_grad():
        for layer, (x, max_prob, y) in test.items():
            row = {"layer": layer, "agreement": float(y.float().mean())}
            p = clf(layer, x)
            for t in CONFIDENCE_THRESHOLDS:
                for name, score in (("clf", p), ("max_prob", max_prob)):
                    prec, cov = _precision_coverage(score, y, t)
                    row[f"{name}>={t} precision"] = prec
                    row[f"{name}>={t} coverage"] = cov
            rows.append(row)
    ee.classifier = clf
    return clf, rows
