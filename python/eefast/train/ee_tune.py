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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import write_text
from ..models.exits import (
    BackboneStates,
    EarlyExitModel,
    check_fingerprint,
    exits_config,
    save_exits,
)
from ..ops import multi_exit_cross_entropy
from .checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from .hidden_cache import HiddenCache

IGNORE = -100


@dataclass
class TuneConfig:
    steps: int = 100
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    lr_warmup_steps: int = 10  # then cosine decay to 10% of lr
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
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("ee_tune: need steps >= 0, batch_size >= 1 and lr > 0")
        if self.exit_weights is not None and len(self.exit_weights) != n_exits:
            raise ValueError(f"ee_tune: {n_exits} exits but {len(self.exit_weights)} exit_weights")


def lr_at(cfg: TuneConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.lr_warmup_steps))
    decay_steps = max(1, cfg.steps - cfg.lr_warmup_steps)
    progress = min(1.0, max(0, step - cfg.lr_warmup_steps) / decay_steps)
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def exit_weights_at(cfg: TuneConfig, n_exits: int, step: int) -> list[float]:
    base = cfg.exit_weights or [1.0] * n_exits
    ramp = (
        min(1.0, (step + 1) / cfg.exit_weight_warmup_steps) if cfg.exit_weight_warmup_steps else 1
    )
    return [w * ramp for w in base]


def batch_index(n_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The blocks of a step: a seeded permutation per epoch, so resume replays the same data."""
    if n_blocks < batch_size:
        raise ValueError(f"ee_tune: {n_blocks} training blocks, fewer than batch_size {batch_size}")
    per_epoch = n_blocks // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(
        n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    )
    return perm[i * batch_size : (i + 1) * batch_size]


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """Targets for every position: the next token, and IGNORE at each block's end."""
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    return targets.reshape(-1)


def exit_losses(
    ee: EarlyExitModel,
    states: BackboneStates,
    targets: torch.Tensor,
    exit_weights: list[float],
    kd_weight: float = 0.0,
    z_loss: float = 0.0,
):
    """(weighted total, per-exit losses) through the fused LM-head + CE ops."""
    layers = ee.exit_layers
    hiddens = [ee.exit_hidden(layer, states).flatten(0, -2) for layer in layers]
    teacher = None
    if kd_weight > 0:
        teacher = (states.final.flatten(0, -2), ee.final_head()[0])
    if ee.shares_lm_head:
        weight, bias = ee.final_head()
    else:
        weight, bias = (list(h) for h in zip(*(ee.head(layer) for layer in layers), strict=True))
    return multi_exit_cross_entropy(
        hiddens,
        weight,
        targets,
        exit_weights,
        bias=bias,
        z_loss=z_loss,
        teacher=teacher,
        kd_weight=kd_weight,
    )


class _Data:
    """Backbone states for a set of block indices: from the cache, or by running the backbone."""

    def __init__(self, ee, blocks, cache: HiddenCache | None, need_final: bool):
        self.ee, self.blocks, self.cache, self.need_final = ee, blocks, cache, need_final

    def states(self, index: torch.Tensor) -> tuple[BackboneStates, torch.Tensor]:
        device = self.ee.model.device
        ids = self.blocks[index]
        if self.cache is not None:
            states = self.cache.states(index, device)
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
        totals += exit_losses(ee, states, targets, [1.0] * len(totals))[1].cpu()
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
    need_final = cfg.kd_weight > 0
    params = list(ee.exit_parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(out_dir) if out_dir else None
    ckpt_root = out / "checkpoint" if out else None

    start, metrics = 0, []
    loaded = load_checkpoint(ckpt_root) if (out and resume) else None
    if loaded:
        module_state, opt_tensors, opt_meta, state = loaded
        check_fingerprint(state["exits"]["fingerprint"], ee.model, f"checkpoint in {ckpt_root}")
        if state["exits"]["layers"] != layers or state["exits"]["kind"] != ee.kind:
            raise ValueError(
                f"ee_tune: checkpoint in {ckpt_root} has exits {state['exits']['layers']} "
                f"({state['exits']['kind']}), this model has {layers} ({ee.kind})"
            )
        ee.exits.load_state_dict(module_state)
        restore_optimizer(optimizer, opt_tensors, opt_meta)
        start, metrics = state["step"], state["metrics"]

    def checkpoint(step: int) -> None:
        if out:
            info = {"exits": exits_config(ee), "config": asdict(cfg), "metrics": metrics}
            save_checkpoint(ckpt_root, step, ee.exits.state_dict(), optimizer, info)
            _write_metrics(out, metrics)

    cache = _hidden_cache(ee, train_blocks, cfg, need_final, progress) if cfg.cache_hidden else None
    train = _Data(ee, train_blocks, cache, need_final)
    held_out = _Data(ee, eval_blocks, None, False) if eval_blocks is not None else None
    ee.exits.train()
    step = start
    bar = tqdm(total=cfg.steps, initial=start, desc="ee-tune", disable=not progress, unit="step")
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            states, targets = train.states(
                batch_index(len(train_blocks), cfg.batch_size, step, cfg.seed)
            )
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total, losses = exit_losses(
                ee,
                states,
                targets,
                exit_weights_at(cfg, len(layers), step),
                cfg.kd_weight,
                cfg.z_loss,
            )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            tokens = targets.numel()
            record = {
                "step": step,
                "loss": float(total.detach()),
                "lr": lr,
                "tokens_per_s": tokens / (time.perf_counter() - t0),
            }
            record |= {
                f"loss_exit{layer}": float(v) for layer, v in zip(layers, losses, strict=True)
            }
            if step % cfg.log_every == 0 or step % cfg.eval_every == 0:
                metrics.append(record)  # before eval: an interrupted eval loses no record
            if held_out is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                ee.exits.eval()
                evals = eval_loss(ee, held_out, cfg.batch_size, cfg.eval_batches)
                ee.exits.train()
                record |= {
                    f"eval_loss_exit{layer}": v for layer, v in zip(layers, evals, strict=True)
                }
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if step % cfg.save_every == 0 and step < cfg.steps:
                checkpoint(step)
    except KeyboardInterrupt:
        checkpoint(step)  # no lost work: resume picks up here
        if out:
            save_exits(ee, out)  # and the exits so far are usable as they are
        raise
    finally:
        bar.close()
        ee.exits.eval()
    if out:
        checkpoint(step)
        save_exits(ee, out)
    return metrics
