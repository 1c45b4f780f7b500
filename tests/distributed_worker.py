"""One rank of a scaled-out run on a saved tiny model, for tests/test_distributed.py:

    torchrun --standalone --nproc-per-node N tests/distributed_worker.py SPEC_JSON

SPEC: {"task": "tune" | "finetune", "model": dir, "out": dir, "stages": P, "config": {...},
"kind": exit kind, "layers": exit layers, "timeout": seconds}. Each rank writes its pid to
``out/pid.RANK`` first, so a test can kill or stop one.
"""

import json
import os
import sys
from pathlib import Path

import torch

from eefast.distributed import init_parallel, shutdown


def tune_blocks() -> torch.Tensor:
    return torch.randint(3, 96, (16, 12), generator=torch.Generator().manual_seed(0))


def finetune_examples():
    from eefast.data.rows import Example

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 9, (24, 2), generator=g).tolist()
    return [
        Example(torch.randint(3, 96, (p,), generator=g).tolist(),
                torch.randint(3, 96, (r,), generator=g).tolist())
        for p, r in lengths
    ]  # fmt: skip


def lora_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    from eefast.adapters import LoraConfig, add_adapters, mark_only_adapters_trainable

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    add_adapters(model, LoraConfig(4, 8.0, 0.0, ("q_proj", "v_proj")))
    mark_only_adapters_trainable(model)
    return model


def main(spec: dict) -> None:
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid.{os.environ['RANK']}").write_text(str(os.getpid()))
    parallel = init_parallel(spec.get("stages", 1), timeout_s=spec.get("timeout", 30))
    try:
        if spec["task"] == "finetune":
            from eefast.train import FinetuneConfig, finetune

            cfg = FinetuneConfig(**spec["config"])
            finetune(lora_model(spec["model"]), finetune_examples(), cfg, out, progress=False,
                     parallel=parallel)  # fmt: skip
            return
        from eefast.distributed.pipeline import build_stage
        from eefast.train import TuneConfig, ee_tune

        cfg = TuneConfig(**spec["config"])
        kind = spec.get("kind", "norm")
        stage = build_stage(spec["model"], spec.get("layers", [1, 2, 3]), parallel, kind,
                            to_top=cfg.kd_weight > 0)  # fmt: skip
        blocks = tune_blocks()
        ee_tune(stage.ee, blocks[:12], blocks[12:], cfg, out, progress=False, stage=stage)
    finally:
        shutdown(parallel)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
