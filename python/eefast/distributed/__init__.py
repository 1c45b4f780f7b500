"""Scale-out on torch.distributed: the process layout and its collectives (parallel.py), and
the forward-only pipeline of EE-Tuning (pipeline.py). Launched by torchrun; gloo on CPU, NCCL
on GPUs."""

from .parallel import (
    DEFAULT_TIMEOUT_S,
    Layout,
    Parallel,
    init_parallel,
    launched_by_torchrun,
    shutdown,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Layout",
    "Parallel",
    "init_parallel",
    "launched_by_torchrun",
    "shutdown",
]
