"""The training loop that ee_tune and finetune share: AdamW, transformers' warm-up + cosine
schedule, seeded batches, a progress bar, atomic checkpoints, exact resume and Ctrl-C.

Everything a step depends on (its batch, its learning rate, its dropout seed) is a pure
function of the step number, and a checkpoint holds the parameters and the optimizer state, so
a run that resumes makes the same updates, bit for bit, as one that never stopped.

    loop = TrainLoop("finetune", params, settings, ckpt_dir, info, check)
    with loop:                      # Ctrl-C: checkpoint the finished steps, then re-raise
        for step in loop.steps():   # sets the step's lr and zeroes the gradients
            ...forward, backward...
            loop.update({"loss": ...})  # clip, optimizer step, log, periodic checkpoint
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..distributed import Parallel
from ..io import reading
from .checkpoint import (
    load_checkpoint,
    optimizer_meta,
    optimizer_state,
    restore_optimizer,
    save_checkpoint,
)

MIN_LR_RATE = 0.1  # the cosine decays to this share of the peak learning rate


@dataclass
class LoopSettings:
    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global grad norm; 0: no clipping
    save_every: int = 50


def lr_schedule(lr: float, warmup_steps: int, steps: int) -> Callable[[int], float]:
    """step -> learning rate: transformers' ``get_cosine_with_min_lr_schedule_with_warmup``
    (linear warm-up from 0, then cosine decay to ``MIN_LR_RATE`` of ``lr``), read as a pure
    function of the step so that a resumed run recomputes it instead of restoring it."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = get_cosine_with_min_lr_schedule_with_warmup(
        probe, warmup_steps, steps, min_lr_rate=MIN_LR_RATE
    ).lr_lambdas[0]
    return lambda step: lr * factor(step)


def batch_index(n: int, batch_size: int, step: int, seed: int, what: str = "train") -> torch.Tensor:
    """The examples of a step: a seeded permutation per epoch (the last partial batch of an
    epoch is dropped), so a resumed run replays the same data."""
    if n < batch_size:
        raise ValueError(f"{what}: {n} training examples, fewer than batch_size {batch_size}")
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch_size : (i + 1) * batch_size]


class TrainLoop:
    """Optimises ``params`` (name -> parameter) for ``settings.steps`` steps, resuming from the
    latest checkpoint in ``ckpt_dir`` when there is one (and ``resume``).

    Under a scaled-out ``parallel`` layout each rank passes its own parameters (a pipeline
    stage's exits, or a replica's copy): the gradients are summed over the replicas, clipped
    by the norm over all stages, and checkpoints gather every stage's parameters and
    optimizer state into the single-process files, keyed by name, which any layout resumes
    from. Only rank 0 writes and shows progress.

    ``run`` says what makes two runs the same one (hyper-parameters, data, model): a
    checkpoint saved under another ``run`` is refused, naming what differs, before anything is
    loaded; so is one that ``check(saved_info)`` rejects. ``info`` is saved with every
    checkpoint. ``on_checkpoint(log)`` runs after each checkpoint (to write logs beside it)
    and ``on_interrupt()`` after the Ctrl-C checkpoint.
    """

    def __init__(
        self,
        name: str,
        params: dict[str, nn.Parameter],
        settings: LoopSettings,
        ckpt_dir: Path | None = None,
        run: dict | None = None,
        check: Callable[[dict], None] | None = None,
        info: dict | None = None,
        resume: bool = True,
        progress: bool = True,
        on_checkpoint: Callable[[list[dict]], None] | None = None,
        on_interrupt: Callable[[], None] | None = None,
        parallel: Parallel | None = None,
    ):
        if not params:
            raise ValueError(f"{name}: no trainable parameters")
        self.name, self.params, self.settings = name, params, settings
        self.ckpt_dir, self.info = ckpt_dir, info or {}
        self.run = json.loads(json.dumps(run or {}))  # as it reads back from the checkpoint
        self.on_checkpoint, self.on_interrupt = on_checkpoint, on_interrupt
        self.parallel = parallel or Parallel.single()
        self.optimizer = torch.optim.AdamW(
            params.values(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        self.lr_at = lr_schedule(settings.lr, settings.warmup_steps, settings.steps)
        self.step, self.log = 0, []
        found = load_checkpoint(ckpt_dir) if (ckpt_dir is not None and resume) else None
        if found is not None:
            tensors, opt_tensors, opt_meta, state = found
            if check is not None:
                check(state["info"])
            _refuse_another_run(name, ckpt_dir, state["run"], self.run)
            every = {n for names in self.parallel.all_stages(list(params)) for n in names}
            if set(tensors) != every:
                raise ValueError(f"{name}: the checkpoint in {ckpt_dir} has other parameters")
            with reading(ckpt_dir), torch.no_grad():
                for key, p in params.items():
                    p.copy_(tensors[key])
                restore_optimizer(self.optimizer, params, opt_tensors, opt_meta)
            self.step, self.log = state["step"], state["log"]
        self._bar = tqdm(
            total=settings.steps,
            initial=self.step,
            desc=name,
            unit="step",
            disable=not (progress and self.parallel.is_writer),
        )
        self._t0 = 0.0

    def steps(self) -> Iterator[int]:
        """The steps still to run; each starts with its learning rate set and no gradients."""
        while self.step < self.settings.steps:
            self._t0 = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            yield self.step

    def update(
        self, record: dict, keep: bool = True, then: Callable[[], dict] | None = None
    ) -> dict:
        """Finish the step: clip, take the optimizer step, log ``record`` (with the step, lr
        and seconds added; ``keep=False`` leaves it out of the log), add what ``then()``
        returns (work after the update, such as a held-out evaluation) and checkpoint every
        ``save_every`` steps."""
        params = list(self.params.values())
        self.parallel.reduce_gradients(params)
        if self.settings.grad_clip > 0 and self.parallel.active:
            self.parallel.clip_grad_norm_(params, self.settings.grad_clip)
        elif self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        self.optimizer.step()
        self.step += 1
        record = {"step": self.step, **record, "lr": self.optimizer.param_groups[0]["lr"]}
        record["seconds"] = time.perf_counter() - self._t0
        if "tokens" in record:
            record["tokens_per_s"] = record["tokens"] / record["seconds"]
        if keep:
            self.log.append(record)  # before any later work: an interruption loses no record
        if then is not None:
            record |= then()
        self._bar.update(1)
        if "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}")
        if self.step % self.settings.save_every == 0 and self.step < self.settings.steps:
            self.checkpoint()
        return record

    def checkpoint(self) -> None:
        if self.ckpt_dir is None:
            return
        mine = {n: p.detach().cpu() for n, p in self.params.items()}
        opt_tensors, scalars = optimizer_state(self.optimizer, self.params)
        stages = self.parallel.gather_to_writer((mine, opt_tensors, scalars))
        if stages is None:  # not rank 0: rank 0 writes what every stage sent
            return
        state, opt_tensors, scalars = ({k: v for part in stages for k, v in part[i].items()}
                                       for i in range(3))  # fmt: skip
        save_checkpoint(
            self.ckpt_dir,
            self.step,
            state,
            opt_tensors,
            optimizer_meta(self.optimizer, scalars),
            {"run": self.run, "info": self.info, "log": self.log},
        )
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.log)

    def __enter__(self) -> TrainLoop:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bar.close()
        if exc_type is KeyboardInterrupt and not self.parallel.active:
            # No lost work: a rerun resumes here. (Ranks of a scaled-out run stop at different
            # points, so they cannot meet for one more checkpoint; a rerun resumes from the
            # last periodic one.)
            self.checkpoint()
            if self.on_interrupt is not None:
                self.on_interrupt()
        elif exc_type is None:
            self.checkpoint()


def _refuse_another_run(name: str, ckpt_dir, saved: dict, run: dict) -> None:
    if saved == run:
        return
    differ = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
    changes = "; ".join(f"{k}: {saved.get(k)!r} there, {run.get(k)!r} now" for k in differ[:4])
    raise ValueError(
        f"{name}: the checkpoint in {ckpt_dir} is from another run ({changes}); use a new "
        "output directory, or --no-resume to start over"
    )
