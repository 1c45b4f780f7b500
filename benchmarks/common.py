"""Timing, peak-memory and reporting helpers shared by every benchmark.

Each case is measured for every provider in the same process and the same run, and the report
gives ratios against eefast, because this machine class is noisy from run to run.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eefast import io

_LIBC = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def on_cuda() -> bool:
    """Whether the benchmarks run on the GPU (`--device cuda` sets torch's default device)."""
    return torch.get_default_device().type == "cuda"


def seeded_generator(seed: int = 0) -> torch.Generator:
    """A generator on the benchmark device, so inputs are made where they are used."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": torch.cuda.get_device_name() if on_cuda() else "cpu",
    }


def _rss_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def peak_extra_memory_mib(fn: Callable[[], object]) -> float | None:
    """Peak memory that one call adds on top of what is live before it, in MiB.

    CPU: the rise of the process's RSS high-water mark, reset through /proc/self/clear_refs
    after returning freed heap to the OS. CUDA: torch.cuda.max_memory_allocated.
    """
    gc.collect()
    if on_cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if _LIBC is None or not os.access("/proc/self/clear_refs", os.W_OK):
        return None
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib()["VmRSS"]
    fn()
    return max(0, _rss_kib()["VmHWM"] - base) / 1024


@dataclass
class Row:
    bench: str
    case: dict
    provider: str
    ms: float
    peak_mib: float | None
    extra: dict = field(default_factory=dict)


def print_table(rows: list[Row], baseline: str = "eefast") -> None:
    """One line per (case, provider), with time and memory ratios against the baseline."""
    by_case: dict[str, list[Row]] = {}
    for r in rows:
        by_case.setdefault(json.dumps(r.case, sort_keys=True), []).append(r)
    head = (
        f"{'case':<46} {'provider':<10} {'ms':>10} {'peak MiB':>9} "
        f"{'time/eefast':>12} {'mem/eefast':>11}"
    )
    print(head)
    print("-" * len(head))
    for case_rows in by_case.values():
        base = next((r for r in case_rows if r.provider == baseline), None)
        case = " ".join(f"{k}={v}" for k, v in case_rows[0].case.items())
        for r in case_rows:
            t_ratio = f"{r.ms / base.ms:.2f}x" if base and base.ms else "-"
            m_ratio = (
                f"{r.peak_mib / base.peak_mib:.2f}x"
                if base and base.peak_mib and r.peak_mib is not None
                else "-"
            )
            mem = f"{r.peak_mib:.1f}" if r.peak_mib is not None else "-"
            print(
                f"{case:<46.46} {r.provider:<10} {r.ms:>10.3f} {mem:>9} {t_ratio:>12} {m_ratio:>11}"
            )
            case = ""


def write_json(rows: list[Row], path: Path) -> None:
    io.write_json(path, {"machine": machine_info(), "rows": [asdict(r) for r in rows]})


def plot_speedups(rows: list[Row], path: Path, baseline: str = "eefast") -> None:
    """Bar chart: each peer's time divided by eefast's, per case (>1 means eefast is faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases: dict[str, dict[str, float]] = {}
    for r in rows:
        label = ",".join(str(v) for v in r.case.values())
        cases.setdefault(label, {})[r.provider] = r.ms
    peers = sorted({r.provider for r in rows} - {baseline})
    labels = [c for c, p in cases.items() if baseline in p]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(labels)), 4))
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        ys = [cases[c].get(peer, float("nan")) / cases[c][baseline] for c in labels]
        ax.bar([j + i * width for j in range(len(labels))], ys, width, label=peer)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=90, fontsize=6
    )
    ax.set_ylabel(f"time / {baseline} time")
    benches = ", ".join(sorted({r.bench for r in rows}))
    ax.set_title(f"{benches}: peers vs {baseline} ({torch.get_num_threads()} threads)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
