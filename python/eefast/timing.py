"""The one timing helper: the median time of a call, synchronising a GPU when the default
device is one. Used by ``eefast demo-ops`` and every benchmark."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_median(
    fn: Callable[[], object], min_reps: int = 5, budget_s: float = 2.0, max_reps: int = 50
) -> tuple[float, float]:
    """(median seconds per call, seconds of the warm-up call).

    One warm-up call, then repeats until min_reps and the time budget are both met. A call
    slower than the whole budget is repeated once only: its median is then of one sample.
    """
    on_cuda = torch.get_default_device().type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    def timed() -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    warmup = timed()
    if warmup > budget_s:
        min_reps = 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (
        len(times) < min_reps or time.perf_counter() - start < budget_s
    ):
        times.append(timed())
    return statistics.median(times), warmup
