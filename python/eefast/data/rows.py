"""Instruction and text rows for adapter fine-tuning and answer evaluation: read them, turn
them into token examples (prompt and response), and collate batches with the prompt masked
out of the loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..hf.tokens import format_prompt
from .arith import load_split
from .corpus import IGNORE, json_row, read_text, string_fields

TASK = "arith"  # the shipped task


def load_rows(spec: str, split: str) -> list[dict]:
    """Rows of the shipped task (``arith``, the given split) or of a .jsonl / .txt file."""
    if spec == TASK:
        return load_split(split)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"eefast: data {spec!r}: no such file (or use {TASK!r})")
    text = read_text(path)
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(json_row(line, path, n))
                string_fields(rows[-1], ("instruction", "input", "output", "text"), f"{path}:{n}")
    else:
        rows = [{"text": t} for t in text.split("\n\n") if t.strip()]
    if not rows:
        raise ValueError(f"eefast: data {spec!r} is empty")
    return rows


@dataclass
class Example:
    prompt: list[int]  # tokens not in the loss (when masking)
    response: list[int]  # tokens the model learns to produce


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
