"""EE-Tuning: train early-exit heads on a frozen backbone.

Each step runs the backbone without grad and only up to the deepest exit (or, with the hidden
cache, not at all), then the exits with grad, and one fused multi-exit loss
(`linear_cross_entropy`): per-exit CE, optional z-loss and optional KD towards the final layer.
Runs are resumable: the batch order and learning rate are pure functions of the step, and
checkpoints hold the exits and the optimizer, so resuming gives the uninterrupted result.

Scaled out (``stage``: this rank's `PipelineStage` under torchrun), each replica takes its
share of the global batch in ``microbatches``, each stage trains its own exits on what its
blocks computed, and the loop sums the gradients over the replicas: the same updates as one
process, within float rounding. Checkpoints and the exits files are the single-process ones.
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
from ..distributed import Parallel
from ..exits.files import check_fingerprint, exits_config, write_exits
from ..exits.model import BackboneStates, EarlyExitModel
from ..io import write_text
from .hidden_cache import HiddenCache, blocks_digest
from .loop import LoopSettings, TrainLoop, batch_index

TARGETS = ("data", "model")


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
    # "data": the next token of the text; "model": the backbone's own greedy next token at
    # every position (hard-label self-distillation: any text then teaches the exits what the
    # model says, at no cost per step once the labels of a block are known)
    targets: str = "data"
    z_loss: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    seed: int = 0
    cache_hidden: bool = False  # run the backbone once over the data, keep exit-layer inputs
    cache_path: str | None = None  # reuse/write the hidden cache here
    log_every: int = 1
    microbatches: int = 1  # per replica and step: what keeps a pipeline's stages busy

    def validate(self, n_exits: int) -> None:
        if self.steps < 0 or self.batch_size < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("ee_tune: need steps >= 0, batch_size >= 1 and a finite lr > 0")
        for name in ("eval_every", "eval_batches", "save_every", "log_every", "microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"ee_tune: {name} must be >= 1, got {getattr(self, name)}")
        if self.targets not in TARGETS:
            raise ValueError(f"ee_tune: targets must be one of {TARGETS}, got {self.targets!r}")
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
    """Backbone states for sets of block indices: from the cache, by running the backbone, or
    by this rank's stage of a pipeline pass."""

    def __init__(self, ee, blocks, cache: HiddenCache | None, need_final: bool, stage=None,
                 model_targets: bool = False):  # fmt: skip
        self.ee, self.blocks, self.cache, self.need_final = ee, blocks, cache, need_final
        self.stage = stage
        self.model_targets = model_targets
        self._labels: dict[int, torch.Tensor] = {}  # block index -> the model's next tokens

    def batches(self, indices: list[torch.Tensor]) -> list[tuple[BackboneStates, torch.Tensor]]:
        """(states, flat next-token targets) per index set. A pipeline stage runs its part of
        every pass before it waits for any final states, so the stages overlap."""
        device = self.ee.model.device
        out = []
        for index in indices:
            ids = self.blocks[index]
            if self.cache is not None:
                states = self.cache.states(index, device)
                states.input_ids = ids.to(device)
            elif self.stage is not None:
                states = self.stage.backbone_states(ids.to(device), self.need_final)
            else:
                states = self.ee.backbone_states(ids.to(device), need_final=self.need_final)
            targets = (self._model_next_tokens(index, states) if self.model_targets
                       else next_token_targets(ids).to(device))  # fmt: skip
            out.append((states, targets))
        if self.stage is not None:
            self.stage.wait()
        return out

    @torch.no_grad()
    def _model_next_tokens(self, index: torch.Tensor, states: BackboneStates) -> torch.Tensor:
        """Flat targets: the backbone's greedy next token at every position of these blocks
        (its LM head on the final states), computed once per block."""
        blocks = index.tolist()
        if any(b not in self._labels for b in blocks):
            weight, bias = self.ee.final_head()
            for b, final in zip(blocks, states.final, strict=True):
                if b not in self._labels:
                    self._labels[b] = torch.nn.functional.linear(final, weight, bias).argmax(-1)
        return torch.cat([self._labels[b] for b in blocks])


@torch.no_grad()
def eval_loss(ee: EarlyExitModel, data: _Data, batch_size: int, batches: int) -> list[float]:
    """Mean held-out CE of each exit over the first ``batches`` full batches."""
    n = min(batches, len(data.blocks) // batch_size)
    totals = torch.zeros(len(ee.exit_layers))
    for b in range(n):
        [(states, targets)] = data.batches([torch.arange(b * batch_size, (b + 1) * batch_size)])
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


def _hidden_cache(ee, blocks, cfg, need_final, rows, progress, stage) -> HiddenCache:
    """The hidden cache of ``ee``'s exits, built in batches of ``rows`` (a microbatch: the
    shape the cached block arguments are for). Under a pipeline each stage keeps its own exits'
    states in its own file, and the stages agree to build (together) unless all can load."""
    path = Path(cfg.cache_path) if cfg.cache_path else None
    backbone, parallel = None, None
    if stage is not None:
        parallel = stage.parallel
        if path and parallel.layout.stages > 1:
            path = path.with_name(f"{path.name}.exits{'-'.join(map(str, ee.exit_layers))}")

        def backbone(ids, need_final=False):
            return stage.backbone_states(ids, need_final, wait=True)

    usable = bool(path) and HiddenCache.usable(path, ee, blocks, need_final)
    if parallel is not None:
        usable = all(parallel.all_stages(usable))
    if usable:
        return HiddenCache.read(path, ee, blocks, rows, backbone)
    cache = _build(ee, blocks, rows, need_final, progress, backbone, parallel)
    if path and (parallel is None or parallel.layout.replica == 0):
        cache.save(path)
    return cache


def _build(ee, blocks, rows, need_final, progress, backbone, parallel) -> HiddenCache:
    """Build the cache; with replicas, together: each runs its pipeline over one contiguous
    shard of the blocks, then the shards are all-gathered over the ranks holding this stage
    (unless there are too few blocks for every replica to get a shard)."""
    replicas = parallel.layout.replicas if parallel is not None else 1
    chunk = -(-len(blocks) // replicas)
    if replicas == 1 or (replicas - 1) * chunk >= len(blocks):
        return HiddenCache.build(ee, blocks, rows, need_final, progress=progress,
                                 backbone=backbone)  # fmt: skip
    replica = parallel.layout.replica
    mine = blocks[replica * chunk : (replica + 1) * chunk]
    part = HiddenCache.build(ee, mine, rows, need_final, progress=progress, backbone=backbone)

    def gathered(t: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(chunk, *t.shape[1:], dtype=t.dtype)
        padded[: len(t)] = t
        return parallel.gather_replicas(padded)[: len(blocks)]

    hiddens = {layer: gathered(h) for layer, h in part.hiddens.items()}
    final = None if part.final is None else gathered(part.final)
    meta = {**part.meta, "blocks": blocks_digest(blocks)}
    return HiddenCache(hiddens, final, part.block_args, part.block_kwargs, meta)


def _shares(cfg: TuneConfig, parallel: Parallel) -> int:
    """Rows per microbatch: the global batch splits evenly over replicas and microbatches."""
    D, M = parallel.layout.replicas, cfg.microbatches
    if cfg.batch_size % (D * M):
        raise ValueError(
            f"ee_tune: batch_size {cfg.batch_size} does not split evenly into {D} replicas x "
            f"{M} microbatches; use a multiple of {D * M}"
        )
    return cfg.batch_size // (D * M)


def ee_tune(
    ee: EarlyExitModel,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor | None = None,
    config: TuneConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    stage=None,
) -> list[dict]:
    """Tune the exits of ``ee`` on ``[n, seq]`` token blocks; returns the metrics log.

    With ``out_dir``, checkpoints (exits + optimizer) are written every ``save_every`` steps
    and on Ctrl-C, a run there resumes from its latest checkpoint, the metrics go to
    ``metrics.jsonl``/``metrics.csv`` and the final exits to ``exits.safetensors``/``.json``.
    Under torchrun, ``stage`` is this rank's `PipelineStage` (``ee`` holds its exits only);
    every rank passes the same blocks and config, and rank 0 writes the files.
    """
    cfg = config or TuneConfig()
    parallel = stage.parallel if stage is not None else Parallel.single()
    local = ee.exit_layers
    layers = [e for plan in stage.plans for e in plan.exits] if stage is not None else local
    slots = [layers.index(e) for e in local]  # my exits' places among all of them
    cfg.validate(len(layers))
    if train_blocks.dim() != 2 or len(train_blocks) == 0:
        raise ValueError("ee_tune: train_blocks must be a non-empty [n_blocks, seq_len] tensor")
    batch_index(len(train_blocks), cfg.batch_size, 0, cfg.seed, "ee_tune")  # fail early
    rows = _shares(cfg, parallel)
    model_targets = cfg.targets == "model"
    if model_targets and stage is not None and stage.parallel.layout.stages > 1:
        raise ValueError("ee_tune: targets='model' needs the final states on every pipeline "
                         "stage; tune with one stage (replicas are fine)")  # fmt: skip
    need_final = cfg.kd_weight > 0 or ee.needs_final or model_targets
    out = Path(out_dir) if out_dir else None
    ckpt_root = out / "checkpoint" if out else None
    info_exits = exits_config(ee) | {"layers": layers}

    def check(saved: dict) -> None:
        check_fingerprint(saved["exits"]["fingerprint"], ee.model, f"checkpoint in {ckpt_root}")
        if saved["exits"]["layers"] != layers or saved["exits"]["kind"] != ee.kind:
            raise ValueError(
                f"ee_tune: checkpoint in {ckpt_root} has exits {saved['exits']['layers']} "
                f"({saved['exits']['kind']}), this model has {layers} ({ee.kind})"
            )

    def write_exits_files() -> None:
        stages = parallel.gather_to_writer(ee.exits.state_dict())
        if stages is not None:
            write_exits(out, {k: v for part in stages for k, v in part.items()}, info_exits)

    settings = LoopSettings(
        cfg.steps, cfg.lr, cfg.weight_decay, cfg.lr_warmup_steps, cfg.grad_clip, cfg.save_every
    )
    params = {n: p for n, p in ee.exits.named_parameters() if p.requires_grad}
    # What a resumed run must share with the checkpoint: the hyper-parameters that change its
    # updates, and the training data itself (a checksum of the token blocks). Not the layout:
    # a run resumes onto other numbers of stages, replicas and microbatches.
    cadence = ("steps", "eval_every", "eval_batches", "save_every", "log_every", "cache_hidden",
               "cache_path", "microbatches")  # fmt: skip
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
        info={"exits": info_exits, "config": asdict(cfg)},
        resume=resume,
        progress=progress,
        on_checkpoint=(lambda log: _write_metrics(out, log)) if out else None,
        on_interrupt=write_exits_files if out else None,  # usable as they are
        parallel=parallel,
    )
    show = progress and parallel.is_writer
    cache = (_hidden_cache(ee, train_blocks, cfg, need_final, rows, show, stage)
             if cfg.cache_hidden else None)  # fmt: skip
    train = _Data(ee, train_blocks, cache, need_final, stage, model_targets)
    held_out = (_Data(ee, eval_blocks, None, model_targets, stage, model_targets)
                if eval_blocks is not None else None)  # fmt: skip

    def everywhere(values: torch.Tensor) -> list[float]:
        """Per-exit values of my exits -> all exits' (summed over stages, mean over replicas)."""
        full = torch.zeros(len(layers) + 1, dtype=torch.float64)
        full[[s + 1 for s in slots]] = values[1:].double()
        full[0] = float(values[0])
        return parallel.mean_over_replicas(full).tolist()

    def evaluate() -> dict:
        ee.exits.eval()
        evals = eval_loss(ee, held_out, cfg.batch_size, cfg.eval_batches)
        ee.exits.train()
        evals = everywhere(torch.tensor([0.0, *evals]))[1:]
        return {f"eval_loss_exit{layer}": v for layer, v in zip(layers, evals, strict=True)}

    replica, replicas = parallel.layout.replica, parallel.layout.replicas
    ee.exits.train()
    try:
        with loop:
            for step in loop.steps():
                index = batch_index(len(train_blocks), cfg.batch_size, step, cfg.seed)
                mine = index.tensor_split(replicas)[replica].split(rows)
                weights = exit_weights_at(cfg, len(layers), step)
                weights = [weights[s] for s in slots]
                logged = torch.zeros(len(local) + 1, dtype=torch.float64)
                share = 1 / len(mine)  # of the replica's rows, per microbatch
                for states, targets in train.batches(list(mine)):
                    total, losses = ee.exit_losses(states, targets, weights, cfg.kd_weight,
                                                   cfg.z_loss)  # fmt: skip
                    # Means over the replica's rows; summing the replicas' gradients then
                    # gives the global batch's mean.
                    (total * (len(states.input_ids) / cfg.batch_size)).backward()
                    logged += torch.cat([total.detach().reshape(1), losses.cpu()]).double() * share
                done = step + 1
                evaluating = held_out is not None and (
                    done % cfg.eval_every == 0 or done == cfg.steps
                )
                values = everywhere(logged)
                record = {"loss": values[0], "tokens": cfg.batch_size * train_blocks.shape[1]}
                record |= {f"loss_exit{layer}": v for layer, v in zip(layers, values[1:],
                                                                      strict=True)}  # fmt: skip
                loop.update(
                    record,
                    keep=done % cfg.log_every == 0 or done % cfg.eval_every == 0,
                    then=evaluate if evaluating else None,
                )
    finally:
        ee.exits.eval()
    if out:
        write_exits_files()
    return loop.log
