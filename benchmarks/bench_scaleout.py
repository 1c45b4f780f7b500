"""Scaled-out EE-Tuning on SmolLM2: global tokens/s for 1, 2 and 4 processes in several
pipeline x data-parallel layouts, and each stage's time in its blocks, in its exits and
waiting for other ranks (transfers plus the pipeline's bubble).

Each layout runs under torchrun as its own job (this file is also the worker); the processes
share this machine's cores, so on a 2-core CPU more processes cannot add compute: the numbers
show what the schedule costs, not what more devices would give.

    python -m benchmarks scaleout [--layouts 1x1,2x1,1x2,2x2] [--steps 12]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

from eefast.distributed import Layout
from eefast.distributed.pipeline import auto_microbatches

WARMUP_STEPS = 2  # left out of the medians (first-touch allocations, thread pools)


def worker(spec: dict) -> None:
    """One rank: tune SmolLM2's exits under the layout, then rank 0 writes the timing."""
    from transformers import AutoTokenizer

    from eefast.data import load_documents, token_blocks
    from eefast.distributed import init_parallel, shutdown
    from eefast.distributed.pipeline import build_stage
    from eefast.hf.loading import resolve_model_path
    from eefast.io import write_json
    from eefast.train import TuneConfig, ee_tune

    parallel = init_parallel(spec["stages"], timeout_s=600)
    path = resolve_model_path(None)
    blocks = token_blocks(AutoTokenizer.from_pretrained(path), load_documents(), spec["seq_len"])
    stage = build_stage(path, spec["exits"], parallel, spec["kind"], share_lm_head=True)
    cfg = TuneConfig(
        steps=spec["steps"],
        batch_size=spec["batch_size"],
        lr=1e-4,
        microbatches=spec["microbatches"],
        save_every=10**6,
    )
    t0 = time.perf_counter()
    log = ee_tune(
        stage.ee, blocks[: 8 * spec["batch_size"]], None, cfg, progress=False, stage=stage
    )
    seconds = time.perf_counter() - t0
    timing = {
        "blocks": stage.blocks_s,
        "waiting": stage.parallel.waiting_s,
        "total": seconds,
        "exits": list(stage.plan.exits),
        "blocks_range": [stage.plan.first + 1, stage.plan.last],
    }
    stages = parallel.gather_to_writer(timing)
    if stages is not None:
        steps = log[WARMUP_STEPS:]
        write_json(
            Path(spec["out"]),
            {
                "tokens_per_s": median(r["tokens_per_s"] for r in steps),
                "step_s": median(r["seconds"] for r in steps),
                "stages": stages,
            },
        )
    shutdown(parallel)


def run(
    layouts: list[str],
    steps: int,
    batch_size: int,
    seq_len: int,
    exits: list[int],
    kind: str,
    out_dir: Path,
) -> list[dict]:
    rows = []
    for layout in layouts:
        stages, replicas = (int(v) for v in layout.split("x"))
        nproc = stages * replicas
        out = out_dir / f"scaleout-{layout}.json"
        spec = {
            "stages": stages,
            "steps": steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "exits": exits,
            "kind": kind,
            "microbatches": auto_microbatches(batch_size, Layout(nproc, 0, stages)),
            "out": str(out),
        }
        threads = max(1, (os.cpu_count() or 2) // nproc)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "benchmarks.bench_scaleout",
            json.dumps(spec),
        ]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(
                f"layout {layout} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            )
        result = json.loads(out.read_text())
        row = {
            "layout": f"{stages} stages x {replicas} replicas",
            "processes": nproc,
            "threads_each": threads,
            "tokens_per_s": round(result["tokens_per_s"], 1),
            "step_s": round(result["step_s"], 3),
            "job_s": round(time.perf_counter() - t0, 1),
        }
        for i, st in enumerate(result["stages"]):
            exits_s = st["total"] - st["blocks"] - st["waiting"]
            row[f"stage{i}"] = (
                f"blocks {st['blocks_range'][0]}-{st['blocks_range'][1]} "
                f"exits {st['exits']}: blocks {st['blocks']:.1f} s, exits "
                f"{exits_s:.1f} s, waiting {st['waiting']:.1f} s"
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_first"] = round(row["tokens_per_s"] / base, 2)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    worker(json.loads(sys.argv[1]))
