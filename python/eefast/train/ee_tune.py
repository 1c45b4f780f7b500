"""EE-Tuning: train early-exit heads on a frozen backbone.

Each step runs the backbone without grad and only up to the deepest exit (or, with the hidden
cache, not at all), then the exits with grad, and one fused multi-exit loss
(`linear_cross_entropy`): per-exit CE, optional z-loss and optional KD towards the final layer.
Runs are resumable: the batch order and learning rate are pure functions of the step, and
checkpoints hold the exits and the optimizer, so resuming gives the uninterrupted result.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.corpus import next_token_targets
from ..exits.files import check_fingerprint, exits_config, save_exits
from ..exits.model import BackboneStates, EarlyExitModel
from ..io import write_text
from .hidden_cache import HiddenCache, blocks_digest
from .loop import LoopSettings, TrainLoop, batch_index


@dataclass
class TuneConfig:
    steps: int = 100
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    lr_warmup_steps: int = 10  # then cosine decay to 10% of lr (train/loop.py)
    exit_weights: list[float] | None = None  # per-exit loss weights (default: all 1)
    exit_weight_warmup_steps: int = 0  # ramp each exit's loss weight in linearly
    kd_weight: float = 0.0  # KL(final layer || exit) term; needs the full-depth pass
    z_loss: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    seed: int = 0
    cache_hidden: bool = False  # run the backbone once over the data, keep exit-layer inputs
    cache_path: str | None = None  # reuse/write the hidden cache here
    log_every: int = 1

    def validate(self, n_exits: int) -> None:
        if self.steps < 0 or self.batch_size < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("ee_tune: need steps >= 0, batch_size >= 1 and a finite lr > 0")
        for name in ("eval_every", "eval_batches", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"ee_tune: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_decay", "kd_weight", "z_loss", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"ee_tune: {name} must be a finite number >= 0, got {value}")
        if self.exit_weights is not None and not all(
            math.isfinite(w) and w >= 0 for w in self.exit_weights
        ):
            raise ValueError(f"ee_tune: exit_weights must be finite and >= 0: {self.exit_weights}")
        if self.exit_weights is not None and len(self.exit_weights) != n_exits:
            raise ValueError(f"ee_tune: {n_exits} exits but {len(self.exit_weights)} exit_weights")


def exit_weights_at(cfg: TuneConfig, n_exits: int, step: int) -> list[float]:
    base = cfg.exit_weights or [1.0] * n_exits
    ramp = (
        min(1.0, (step + 1) / cfg.exit_weight_warmup_steps) if cfg.exit_weight_warmup_steps else 1
    )
    return [w * ramp for w in base]


class _Data:
    """Backbone states for a set of block indices: from the cache, or by running the backbone."""

    def __init__(self, ee, blocks, cache: HiddenCache | None, need_final: bool):
        self.ee, self.blocks, self.cache, self.need_final = ee, blocks, cache, need_final

    def states(self, index: torch.Tensor) -> tuple[BackboneStates, torch.Tensor]:
        device = self.ee.model.device
        ids = self.blocks[index]
        if self.cache is not None:
            states = self.cache.states(index, device)
            states.input_ids = ids.to(device)
        else:
            states = self.ee.backbone_states(ids.to(device), need_final=self.need_final)
        return states, next_token_targets(ids).to(device)


@torch.no_grad()
def eval_loss(ee: EarlyExitModel, data: _Data, batch_size: int, batches: int) -> list[float]:
    """Mean held-out CE of each exit over the first ``batches`` full batches."""
    n = min(batches, len(data.blocks) // batch_size)
    totals = torch.zeros(len(ee.exit_layers))
    for b in range(n):
        states, targets = data.states(torch.arange(b * batch_size, (b + 1) * batch_size))
        totals += ee.exit_losses(states, targets, [1.0] * len(totals))[1].cpu()
    return (totals / max(n, 1)).tolist()


def _write_metrics(out: Path, metrics: list[dict]) -> None:
    write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    keys = sorted({k for m in metrics for k in m}, key=lambda k: (k != "step", k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(metrics)
    write_text(out / "metrics.csv", buf.getvalue())


def _hidden_cache(ee, blocks, cfg, need_final, progress) -> HiddenCache:
    path = Path(cfg.cache_path) if cfg.cache_path else None
    cache = path and HiddenCache.load(path, ee, blocks, cfg.batch_size, need_final)
    if cache is None:
        cache = HiddenCache.build(ee, blocks, cfg.batch_size, need_final, progress=progress)
        if path:
            cache.save(path)
    return cache


def ee_tune(
    ee: EarlyExitModel,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor | None = None,
    config: TuneConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Tune the exits of ``ee`` on ``[n, seq]`` token blocks; returns the metrics log.

    With ``out_dir``, checkpoints (exits + optimizer) are written every ``save_every`` steps
    and on Ctrl-C, a run there resumes from its latest checkpoint, the metrics go to
    ``metrics.jsonl``/``metrics.csv`` and the final exits to ``exits.safetensors``/``.json``.
    """
    cfg = config or TuneConfig()
    layers = ee.exit_layers
    cfg.validate(len(layers))
    if train_blocks.dim() != 2 or len(train_blocks) == 0:
        raise ValueError("ee_tune: train_blocks must be a non-empty [n_blocks, seq_len] tensor")
    batch_index(len(train_blocks), cfg.batch_size, 0, cfg.seed, "ee_tune")  # fail early
    need_final = cfg.kd_weight > 0 or ee.needs_final
    out = Path(out_dir) if out_dir else None
    ckpt_root = out / "checkpoint" if out else None

    def check(saved: dict) -> None:
        check_fingerprint(saved["exits"]["fingerprint"], ee.model, f"checkpoint in {ckpt_root}")
        if saved["exits"]["layers"] != layers or saved["exits"]["kind"] != ee.kind:
            raise ValueError(
                f"ee_tune: checkpoint in {ckpt_root} has exits {saved['exits']['layers']} "
                f"({saved['exits']['kind']}), this model has {layers} ({ee.kind})"
            )

    settings = LoopSettings(
        cfg.steps, cfg.lr, cfg.weight_decay, cfg.lr_warmup_steps, cfg.grad_clip, cfg.save_every
    )
    params = {n: p for n, p in ee.exits.named_parameters() if p.requires_grad}
    # What a resumed run must share with the checkpoint: the hyper-parameters that change its
    # updates, and the training data itself (a checksum of the token blocks).
    cadence = ("steps", "eval_every", "eval_batches", "save_every", "log_every", "cache_hidden",
               "cache_path")  # fmt: skip
    run = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in cadence},
        "train_blocks": blocks_digest(train_blocks),
    }
    loop = TrainLoop(
        "ee-tune",
        params,
        settings,
        ckpt_root,
        run,
        check=check,
        info={"exits": exits_config(ee), "config": asdict(cfg)},
        resume=resume,
        progress=progress,
        on_checkpoint=(lambda log: _write_metrics(out, log)) if out else None,
        on_interrupt=(lambda: save_exits(ee, out)) if out else None,  # usable as they are
    )
    cache = _hidden_cache(ee, train_blocks, cfg, need_final, progress) if cfg.cache_hidden else None
    train = _Data(ee, train_blocks, cache, need_final)
    held_out = _Data(ee, eval_blocks, None, False) if eval_blocks is not None else None

    def evaluate() -> dict:
        ee.exits.eval()
        evals = eval_loss(ee, held_out, cfg.batch_size, cfg.eval_batches)
        ee.exits.train()
        return {f"eval_loss_exit{layer}": v for layer, v in zip(layers, evals, strict=True)}

    ee.exits.train()
    try:
        with loop:
            for step in loop.steps():
                states, targets = train.states(
                    batch_index(len(train_blocks), cfg.batch_size, step, cfg.seed)
                )
                total, losses = ee.exit_losses(
                    states,
                    targets,
                    exit_weights_at(cfg, len(layers), step),
                    cfg.kd_weight,
                    cfg.z_loss,
                )
                total.backward()
                done = step + 1
                evaluating = held_out is not None and (
                    done % cfg.eval_every == 0 or done == cfg.steps
                )
                record = {"loss": float(total.detach()), "tokens": targets.numel()}
                record |= {
                    f"loss_exit{layer}": float(v) for layer, v in zip(layers, losses, strict=True)
                }
                loop.update(
                    record,
                    keep=done % cfg.log_every == 0 or done % cfg.eval_every == 0,
                    then=evaluate if evaluating else None,
                )
    finally:
        ee.exits.eval()
    if out:
        save_exits(ee, out)
    return loop.log
