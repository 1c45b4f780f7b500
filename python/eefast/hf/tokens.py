"""Tokens in and out of a Hugging Face model: chat prompts, the pad id, left padding, and
HF ``generate`` greedy (the reference that eefast's decoders are checked against)."""

from __future__ import annotations

import torch


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0. Padded positions
    are always masked out, so the choice never changes a result."""
    for name in ("pad_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, list):
            token = token[0] if token else None
        if token is not None:
            return int(token)
    return 0


def chat_prompt_ids(tokenizer, content: str) -> list[int]:
    """Token ids of one user message through the tokenizer's chat template, ready for the
    assistant's reply."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    return list(ids if isinstance(ids, list) else ids["input_ids"])


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


def prompt_ids(tokenizer, prompts, chat: bool) -> list[list[int]]:
    """Token ids per prompt: strings are tokenized (through the chat template when ``chat``),
    id lists pass through; a clear error for no prompts or an empty one."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("eefast.generate: no prompts")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"eefast.generate: prompt {i} is empty")
            if chat:
                p_ids = chat_prompt_ids(tokenizer, p)
            else:
                p_ids = tokenizer(p)["input_ids"]
        else:
            p_ids = list(p)
        if not p_ids:
            raise ValueError(f"eefast.generate: prompt {i} is empty")
        ids.append([int(t) for t in p_ids])
    return ids


def left_pad(ids: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, width]`` tokens, left-padded with ``pad``, and the bool mask of real tokens: every
    sequence ends in the same column, where generation continues."""
    width = max(len(x) for x in ids)
    tokens = torch.full((len(ids), width), pad, dtype=torch.long, device=device)
    valid = torch.zeros(len(ids), width, dtype=torch.bool, device=device)
    for row, x in enumerate(ids):
        tokens[row, width - len(x) :] = torch.tensor(x, device=device)
        valid[row, width - len(x) :] = True
    return tokens, valid


@torch.no_grad()
def hf_greedy(model, ids: list[list[int]], pad: int, max_new_tokens: int, **kwargs):
    """HF ``generate`` greedy on token-id lists, left-padded with ``pad``: the new tokens
    ``[B, new]`` (rows that ended early are padded). ``kwargs`` go to ``generate``."""
    tokens, valid = left_pad(ids, pad, model.device)
    out = model.generate(
        input_ids=tokens,
        attention_mask=valid.long(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        **kwargs,
    )
    return out[:, tokens.shape[1] :]
