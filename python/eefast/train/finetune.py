"""Adapter fine-tuning: instruction data with the prompt masked out of the loss, gradient
accumulation, and the shared loop's progress bar, atomic checkpoints and exact resume
(train/loop.py). torch's RNG is reseeded per step, so dropout replays on resume too.

Data-parallel under torchrun (``parallel``): each replica takes its share of every batch, its
loss is its labelled tokens' sum over the whole batch's count, and the loop sums the adapter
gradients over the replicas (the only thing communicated), so the updates are the single
process's within float rounding (with adapter dropout, each replica draws its own masks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.corpus import IGNORE
from ..data.rows import Example, collate
from ..distributed import Parallel
from ..hf.arch import ARCHS
from ..hf.loss import fused_causal_lm_loss
from .loop import LoopSettings, TrainLoop, batch_index


def causal_lm_loss(
    model: nn.Module, input_ids, attention_mask, labels, num_items_in_batch=None
) -> torch.Tensor:
    """HF's causal-LM loss with the LM head fused (``hf.loss.fused_causal_lm_loss``): the
    mean over labelled tokens, or their sum over ``num_items_in_batch``. Other architectures
    than eefast's known ones fall back to ``model(..., labels=labels).loss``."""
    head = model.get_output_embeddings()
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    if model.config.model_type not in ARCHS or not isinstance(head, nn.Linear):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     **kwargs).loss  # fmt: skip
    return fused_causal_lm_loss(model, input_ids, attention_mask, labels, **kwargs)


@dataclass
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_len: int = 256
    mask_prompt: bool = True
    seed: int = 0
    save_every: int = 50

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "max_len", "save_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"finetune: {name} must be positive, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"finetune: lr must be positive and finite, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(
                f"finetune: weight_decay must be finite and >= 0, got {self.weight_decay}"
            )


def finetune(
    model: nn.Module,
    examples: list[Example],
    config: FinetuneConfig,
    out: str | Path | None = None,
    fingerprint: dict | None = None,
    resume: bool = True,
    progress: bool = True,
    pad_id: int = 0,
    parallel: Parallel | None = None,
) -> list[dict]:
    """Train the model's trainable parameters on the examples; returns the loss log.

    With ``out``, checkpoints go to ``out/checkpoints`` every ``save_every`` steps, at the end
    and on Ctrl-C, and a later call resumes from the latest one. ``fingerprint`` (e.g. the
    adapter config) must match the checkpoint's, so a resume never mixes two different runs.
    """
    config.validate()
    if not examples:
        raise ValueError("finetune: no training examples")
    if all(not e.response for e in examples):
        raise ValueError("finetune: every example has an empty response; nothing to learn")
    first = (lambda e: max(1, len(e.prompt))) if config.mask_prompt else (lambda e: 1)
    if not any(min(len(e.prompt) + len(e.response), config.max_len) > first(e) for e in examples):
        raise ValueError(
            f"finetune: max_len={config.max_len} cuts every example before its first trained "
            "token; nothing to learn"
        )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("finetune: no trainable parameters; call mark_only_adapters_trainable")
    batch_index(len(examples), config.batch_size, 0, config.seed, "finetune")  # fail early
    ckpt_dir = Path(out) / "checkpoints" if out is not None else None
    # What a resumed run must share with the checkpoint: everything but the step count.
    run = {"finetune": asdict(config) | {"steps": None, "save_every": None},
           "fingerprint": fingerprint}  # fmt: skip
    settings = LoopSettings(
        config.steps, config.lr, config.weight_decay, config.warmup_steps, 0.0, config.save_every
    )
    parallel = parallel or Parallel.single()
    if parallel.layout.stages != 1:
        raise ValueError("finetune: data-parallel only; pipeline stages are for EE-Tuning")
    replicas, replica = parallel.layout.replicas, parallel.layout.replica
    if config.batch_size % replicas:
        raise ValueError(
            f"finetune: batch_size {config.batch_size} does not split evenly over {replicas} "
            "data-parallel replicas"
        )
    parallel.broadcast_from_first_replica(list(params.values()))
    loop = TrainLoop("finetune", params, settings, ckpt_dir, run, resume=resume,
                     progress=progress, parallel=parallel)  # fmt: skip
    was_training = model.training
    model.train()
    try:
        with loop:
            for step in loop.steps():
                torch.manual_seed(config.seed * 7919 + step)  # dropout: the same on resume
                total, tokens = 0.0, 0
                for micro in range(config.grad_accum):
                    idx = batch_index(
                        len(examples), config.batch_size, step * config.grad_accum + micro,
                        config.seed,
                    )  # fmt: skip
                    rows = [examples[i] for i in idx.tolist()]
                    whole = collate(rows, config.max_len, pad_id, config.mask_prompt)
                    # The tokens HF's shifted loss counts, over the whole batch: each replica
                    # divides its share's sum by it.
                    counted = int((whole["labels"][:, 1:] != IGNORE).sum())
                    batch = whole
                    if replicas > 1:
                        share = rows[len(rows) * replica // replicas :
                                     len(rows) * (replica + 1) // replicas]  # fmt: skip
                        batch = collate(share, config.max_len, pad_id, config.mask_prompt)
                    loss = causal_lm_loss(model, **batch, num_items_in_batch=max(counted, 1))
                    (loss / config.grad_accum).backward()
                    total += loss.item() / config.grad_accum
                    tokens += int((whole["labels"] != IGNORE).sum())
                total = float(parallel.all_sum(torch.tensor([total]))[0])
                loop.update({"loss": total, "tokens": tokens})
    finally:
        model.train(was_training)
    return loop.log
