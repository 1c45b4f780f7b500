"""Adapter fine-tuning: instruction data with the prompt masked out of the loss, gradient
accumulation, a progress bar, atomic checkpoints and exact resume.

Batches are drawn from a generator seeded by (seed, step), and torch's RNG is reseeded per step,
so an interrupted run that resumes from a checkpoint makes the same updates as one that never
stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..generation import chat_prompt_ids
from ..models.arch import ARCHS, decoder_stack
from ..ops import linear_cross_entropy
from .checkpoint import load_checkpoint, restore_optimizer, save_checkpoint

IGNORE = -100


def causal_lm_loss(model: nn.Module, input_ids, attention_mask, labels) -> torch.Tensor:
    """HF's causal-LM loss (mean next-token cross-entropy over labelled tokens), with the LM
    head fused into the loss: the decoder stack runs, then ``linear_cross_entropy`` on its
    last hidden states, so ``[tokens, vocab]`` logits (and their gradient) never exist. Other
    architectures than eefast's known ones fall back to ``model(..., labels=labels).loss``.
    """
    head = model.get_output_embeddings()
    if model.config.model_type not in ARCHS or not isinstance(head, nn.Linear):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    hidden = decoder_stack(model)(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    return linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], head.bias)


@dataclass
class Example:
    prompt: list[int]  # tokens not in the loss (when masking)
    response: list[int]  # tokens the model learns to produce


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
        if self.lr <= 0:
            raise ValueError(f"finetune: lr must be positive, got {self.lr}")


def format_prompt(
    tokenizer, instruction: str, input_text: str = "", chat: bool = True
) -> list[int]:
    """Prompt tokens of an instruction (+ input): through the chat template when the tokenizer
    has one and ``chat``, else an Alpaca-style template."""
    content = f"{instruction}\n\n{input_text}" if input_text else instruction
    if chat and getattr(tokenizer, "chat_template", None):
        return chat_prompt_ids(tokenizer, content)
    text = f"### Instruction:\n{content}\n\n### Response:\n"
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def tokenize_rows(tokenizer, rows: list[dict], chat: bool = True) -> list[Example]:
    """Examples from jsonl rows: ``instruction``/``input``/``output`` (prompt + response) or
    ``text`` (all of it is response, nothing masked)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for i, row in enumerate(rows):
        if "instruction" in row and "output" in row:
            prompt = format_prompt(tokenizer, row["instruction"], row.get("input", ""), chat)
            response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + eos
        elif "text" in row:
            prompt, response = [], tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        else:
            raise ValueError(
                f"row {i}: expected instruction/output or text fields, got {list(row)}"
            )
        examples.append(Example(prompt, response))
    return examples


def collate(
    examples: list[Example], max_len: int, pad_id: int, mask_prompt: bool
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels; labels are IGNORE on padding and, when
    masking, on the prompt. Sequences longer than max_len keep their first max_len tokens."""
    seqs = [(e.prompt + e.response)[:max_len] for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        start = min(len(e.prompt), len(s)) if mask_prompt else 0
        labels[i, start : len(s)] = ids[i, start : len(s)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batch_indices(n: int, batch: int, seed: int, step: int, micro: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)
    return torch.randint(0, n, (batch,), generator=g).tolist()


def _lr_factor(step: int, config: FinetuneConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("finetune: no trainable parameters; call mark_only_adapters_trainable")
    return params


def finetune(
    model: nn.Module,
    examples: list[Example],
    config: FinetuneConfig,
    out: str | Path | None = None,
    fingerprint: dict | None = None,
    resume: bool = True,
    progress: bool = True,
    pad_id: int = 0,
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
    params = _trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    ckpt_dir = Path(out) / "checkpoints" if out is not None else None
    run_id = {"finetune": asdict(config) | {"steps": None}, "fingerprint": fingerprint}
    start, log = 0, []
    found = load_checkpoint(ckpt_dir) if (ckpt_dir and resume) else None
    if found is not None:
        tensors, opt_tensors, opt_meta, state = found
        if state["run"] != json.loads(json.dumps(run_id)):
            raise ValueError(
                f"finetune: the checkpoint in {ckpt_dir} is from another run "
                f"({state['run']}); use a new --out or --no-resume"
            )
        if set(tensors) != set(params):
            raise ValueError(f"finetune: the checkpoint in {ckpt_dir} has other parameters")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        restore_optimizer(optimizer, opt_tensors, opt_meta)
        start, log = state["step"], state["log"]

    def checkpoint(step: int) -> None:
        if ckpt_dir is not None:
            state = {n: p.detach() for n, p in params.items()}
            save_checkpoint(ckpt_dir, step, state, optimizer, {"run": run_id, "log": log})

    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.steps, initial=start, disable=not progress, desc="finetune", unit="step"
    )
    was_training = model.training
    model.train()
    step = start
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            torch.manual_seed(config.seed * 7919 + step)  # dropout: the same on resume
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(step, config)
            total, tokens = 0.0, 0
            for micro in range(config.grad_accum):
                idx = _batch_indices(len(examples), config.batch_size, config.seed, step, micro)
                batch = collate(
                    [examples[i] for i in idx], config.max_len, pad_id, config.mask_prompt
                )
                loss = causal_lm_loss(model, **batch) / config.grad_accum
                loss.backward()
                total += loss.item()
                tokens += int((batch["labels"] != IGNORE).sum())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.append(
                {
                    "step": step + 1,
                    "loss": total,
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens": tokens,
                    "seconds": time.perf_counter() - t0,
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            if (step + 1) % config.save_every == 0 and step + 1 < config.steps:
                checkpoint(step + 1)
        step = config.steps
    except KeyboardInterrupt:
        checkpoint(len(log))
        bar.close()
        raise
    finally:
        model.train(was_training)
    bar.close()
    checkpoint(step)
    return log
