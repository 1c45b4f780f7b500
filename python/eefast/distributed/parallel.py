"""The process layout of a scaled-out run, and the few collectives training needs.

``torchrun --nproc-per-node N`` starts N ranks; ``P`` pipeline stages and ``D = N / P`` data-
parallel replicas. Rank ``r`` is stage ``r % P`` of replica ``r // P``, so one replica's stages
are neighbouring ranks. Communication is plain ``torch.distributed`` on the process group
(gloo on CPU, NCCL on GPUs): point-to-point sends between the stages of a replica, an
all-reduce of the trainable gradients over the ranks that hold the same stage, and small
all-reduces/gathers for the global gradient norm, the logged losses and checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long any rank waits for another before it fails (a dead or hung peer), in seconds.
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    stages: int  # P

    @property
    def replicas(self) -> int:  # D
        return self.world // self.stages

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return (self.replica if replica is None else replica) * self.stages + stage

    def check(self) -> None:
        if self.stages < 1:
            raise ValueError(f"--pipeline-stages must be >= 1, got {self.stages}")
        if self.stages > 1 and self.world == 1:
            raise ValueError(
                f"{self.stages} pipeline stages need {self.stages} or more processes: run "
                f"under torchrun --nproc-per-node N (a multiple of {self.stages})"
            )
        if self.stages > self.world:
            raise ValueError(
                f"{self.stages} pipeline stages need at least {self.stages} processes; "
                f"torchrun started {self.world}"
            )
        if self.world % self.stages:
            raise ValueError(
                f"{self.world} processes do not split into {self.stages} pipeline stages: "
                "the number of processes must be a multiple of the number of stages"
            )


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


class Parallel:
    """This rank's place in the layout, its process groups, and the collectives of a step.

    With one process (no torchrun) every method is a no-op, so the training code has one
    path whatever the layout.
    """

    def __init__(self, layout: Layout, timeout_s: float = DEFAULT_TIMEOUT_S):
        layout.check()
        self.layout, self.timeout_s = layout, timeout_s
        self.active = layout.world > 1
        self.waiting_s = 0.0  # wall time in sends, receives and collectives (and their waits)
        self.stage_group = self.replica_group = None
        if not self.active:
            return
        P, D = layout.stages, layout.replicas
        # Every rank creates every group, in the same order (torch.distributed's rule). A new
        # group's timeout is not the world's but torch's default (30 min): pass ours.
        timeout = timedelta(seconds=timeout_s)
        for r in range(D):
            group = dist.new_group([r * P + s for s in range(P)], timeout=timeout)
            if r == layout.replica:
                self.stage_group = group  # the stages of my replica
        for s in range(P):
            group = dist.new_group([r * P + s for r in range(D)], timeout=timeout)
            if s == layout.stage:
                self.replica_group = group  # the ranks that hold my stage

    @contextmanager
    def talking(self, what: str) -> Iterator[None]:
        """Turn a failed send, receive or collective into one error that says which rank,
        doing what, and why (a peer died or did not answer within the timeout)."""
        t0 = time.perf_counter()
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            layout = self.layout
            detail = " ".join(str(e).split())[:300]
            raise RuntimeError(
                f"rank {layout.rank} (stage {layout.stage}, replica {layout.replica}): {what} "
                f"failed: another rank died or did not answer within {self.timeout_s:g} s "
                f"(--dist-timeout). {detail}"
            ) from e
        finally:
            self.waiting_s += time.perf_counter() - t0

    @classmethod
    def single(cls) -> Parallel:
        return cls(Layout(1, 0, 1))

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes files and prints; the others stay quiet."""
        return self.layout.rank == 0

    # -- a step's collectives ------------------------------------------------------------

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over the replicas of this stage (one flat all-reduce). The loss
        of each replica's share is already scaled by its share of the global batch."""
        if self.layout.replicas == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        with self.talking("the gradient all-reduce"):
            dist.all_reduce(flat, group=self.replica_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """``torch.nn.utils.clip_grad_norm_`` over the parameters of all stages together."""
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        square = torch.zeros((), dtype=torch.float64, device=device)
        for g in grads:
            square += g.detach().double().pow(2).sum()
        if self.layout.stages > 1:
            with self.talking("the gradient-norm all-reduce"):
                dist.all_reduce(square, group=self.stage_group)
        total = float(square.sqrt())
        coef = min(1.0, max_norm / (total + 1e-6))
        for g in grads:
            g.mul_(coef)
        return total

    def _for_backend(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` where the process group can reduce it (NCCL: this rank's GPU)."""
        return (tensor.cuda() if dist.get_backend() == "nccl" else tensor).contiguous()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every rank (a new tensor on values' device)."""
        if not self.active:
            return values
        summed = self._for_backend(values.clone())
        with self.talking("the loss all-reduce"):
            dist.all_reduce(summed)
        return summed.to(values.device)

    def mean_over_replicas(self, values: torch.Tensor) -> torch.Tensor:
        """Values each stage fills in its own slots (zeros elsewhere), summed over the stages
        and averaged over the replicas: per-exit losses of the global batch."""
        return self.all_sum(values) / self.layout.replicas

    def broadcast_from_first_replica(self, params: list[torch.nn.Parameter]) -> None:
        """Make every replica start from replica 0's values of ``params``."""
        if self.layout.replicas == 1:
            return
        src = self.layout.rank_of(self.layout.stage, 0)
        with torch.no_grad(), self.talking("the parameter broadcast"):
            for p in params:
                dist.broadcast(p.data, src=src, group=self.replica_group)

    def gather_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every replica's equally shaped ``tensor`` (of this stage), concatenated along dim 0
        in replica order, on every replica."""
        if self.layout.replicas == 1:
            return tensor
        t = self._for_backend(tensor)
        parts = [torch.empty_like(t) for _ in range(self.layout.replicas)]
        with self.talking("gathering the hidden cache"):
            dist.all_gather(parts, t, group=self.replica_group)
        return torch.cat(parts).to(tensor.device)

    def gather_to_writer(self, obj):
        """The objects of replica 0's stages, in stage order, on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        mine = obj if self.layout.replica == 0 else None
        out = [None] * self.layout.world if self.is_writer else None
        with self.talking("gathering the checkpoint"):
            dist.gather_object(mine, out, dst=0)
        return out[: self.layout.stages] if self.is_writer else None

    def all_stages(self, obj) -> list:
        """Every stage's object (of this replica), in stage order, on every rank."""
        if self.layout.stages == 1:
            return [obj]
        out = [None] * self.layout.stages
        with self.talking("an exchange between stages"):
            dist.all_gather_object(out, obj, group=self.stage_group)
        return out

    def barrier(self) -> None:
        if self.active:
            with self.talking("a barrier"):
                dist.barrier()


def init_parallel(pipeline_stages: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S) -> Parallel:
    """Join the process group torchrun set up (gloo on CPU, NCCL when this rank has a GPU)
    and build the layout; without torchrun, a single process. Every collective fails after
    ``timeout_s`` instead of hanging when a peer is gone."""
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {timeout_s}")
    if not launched_by_torchrun():
        Layout(1, 0, pipeline_stages).check()
        return Parallel.single()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    layout = Layout(world, rank, pipeline_stages)
    layout.check()  # before joining: every rank fails alike, at once
    if world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    return Parallel(layout, timeout_s)


def shutdown(parallel: Parallel) -> None:
    if parallel.active and dist.is_initialized():
        dist.destroy_process_group()
