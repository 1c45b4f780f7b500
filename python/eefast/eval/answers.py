"""Answer accuracy on problems with a numeric answer: greedy replies, last number extracted."""

from __future__ import annotations

import torch
from torch import nn

from ..data.arith import last_number
from ..hf.tokens import format_prompt, hf_greedy, pad_id


@torch.no_grad()
def answer_accuracy(
    model: nn.Module,
    tokenizer,
    rows: list[dict],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    chat: bool = True,
    progress: bool = True,
) -> dict:
    """Greedy-decode a reply to each row's instruction and compare the reply's last number
    with ``row["answer"]`` (or, without one, the last number of ``row["output"]``)."""
    from tqdm.auto import tqdm

    if not rows:
        raise ValueError("answer_accuracy: no rows")
    for i, row in enumerate(rows):
        if "instruction" not in row or ("answer" not in row and "output" not in row):
            raise ValueError(
                f"answer_accuracy: row {i} has no 'instruction' and 'answer' (or 'output'); "
                "answer accuracy needs question rows, not plain text"
            )
    pad = pad_id(tokenizer)
    was_training = model.training
    model.eval()
    samples, correct = [], 0
    for start in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="eval"):
        chunk = rows[start : start + batch_size]
        prompts = [
            format_prompt(tokenizer, r["instruction"], r.get("input", ""), chat) for r in chunk
        ]
        new = hf_greedy(model, prompts, pad, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        for row, reply_ids in zip(chunk, new, strict=True):
            reply = tokenizer.decode(reply_ids, skip_special_tokens=True)
            gold = row.get("answer", last_number(row.get("output", "")))
            got = last_number(reply)
            ok = got is not None and gold is not None and abs(got - float(gold)) < 1e-6
            correct += ok
            samples.append(
                {
                    "instruction": row["instruction"],
                    "reply": reply,
                    "gold": gold,
                    "correct": bool(ok),
                }
            )
    model.train(was_training)
    return {
        "accuracy": correct / len(rows),
        "correct": correct,
        "total": len(rows),
        "samples": samples,
    }
