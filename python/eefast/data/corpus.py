"""Corpora and token blocks for tuning and evaluation.

The default corpus is CPython's own ``pydoc_data.topics`` (~750 KB of English documentation),
so nothing is downloaded. Any local ``.txt`` file, or ``.jsonl`` with ``text`` or
``instruction``/``input``/``output`` fields, works too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DEFAULT_CORPUS = "pydoc_data"
# The shipped self-distilled chat data: SmolLM2-135M-Instruct's own greedy replies to 600
# generated chat prompts (`eefast distill-data --prompts 600 --max-new-tokens 160`), what
# draft exits for that model learn from.
CHAT_CORPUS = "chat"
_CHAT_FILE = Path(__file__).with_name("chat_distilled.jsonl")
IGNORE = -100  # the target of a position that has no next token (torch's ignore_index)


def load_documents(spec: str | None = None) -> list[str]:
    """The documents of a corpus: ``pydoc_data`` (default), ``chat`` (the shipped
    self-distilled chat data), a .txt file or a .jsonl file; ``a+b`` joins corpora in that
    order (held-out blocks come from the end, so from the last)."""
    spec = spec or DEFAULT_CORPUS
    if "+" in spec and not Path(spec).is_file():
        parts = spec.split("+")
        if not all(parts):
            raise ValueError(f"corpus {spec!r}: an empty name between '+'")
        return [doc for part in parts for doc in load_documents(part)]
    if spec == DEFAULT_CORPUS:
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
    else:
        path = _CHAT_FILE if spec == CHAT_CORPUS else Path(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus {spec!r}: no such file (or use {DEFAULT_CORPUS!r} or {CHAT_CORPUS!r})"
            )
        text = read_text(path)
        if path.suffix == ".jsonl":
            lines = enumerate(text.splitlines(), 1)
            docs = [_jsonl_text(line, path, i) for i, line in lines if line.strip()]
        else:
            docs = text.split("\n\n")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus {spec!r} is empty")
    return docs


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; an error naming the file and the byte otherwise."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def json_row(line: str, path: Path, lineno: int) -> dict:
    """One .jsonl line as a JSON object; an error naming the file and line otherwise."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object")
    return row


def string_fields(row: dict, keys, where: str) -> None:
    for key in keys:
        if key in row and not isinstance(row[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {row[key]!r}")


def _jsonl_text(line: str, path: Path, lineno: int) -> str:
    row = json_row(line, path, lineno)
    string_fields(row, ("text", "instruction", "input", "output"), f"{path}:{lineno}")
    if "text" in row:
        return row["text"]
    if "instruction" in row:
        return "\n".join(row.get(k, "") for k in ("instruction", "input", "output") if row.get(k))
    raise ValueError(f"{path}:{lineno}: expected a 'text' or 'instruction' field")


def token_blocks(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """All documents tokenized, joined by EOS and cut into ``[n_blocks, seq_len]``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        if eos is not None:
            ids.append(eos)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise ValueError(f"corpus has {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def split_blocks(blocks: torch.Tensor, eval_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out blocks are the last ``eval_blocks``."""
    if not 0 < eval_blocks < len(blocks):
        raise ValueError(
            f"need 0 < eval_blocks < {len(blocks)} blocks in the corpus, got {eval_blocks}"
        )
    return blocks[:-eval_blocks], blocks[-eval_blocks:]


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """Targets for every position of ``[n, seq]`` blocks, flattened: the next token, and
    IGNORE at each block's end."""
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    return targets.reshape(-1)
