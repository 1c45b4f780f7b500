"""Early-exit generation: ``eefast.generate(ee_model, tokenizer, prompts, mode=...)``.

Modes:
  ``full``         full-depth decoding (the reference, and what the others are checked against)
  ``speculative``  lossless self-speculative decoding: confident exits draft, the full model
                   verifies
  ``threshold``    lossy: a token leaves at the first exit whose confidence passes a threshold
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..models.exits import EarlyExitModel
from .decode import (
    CONFIDENCE_MEASURES,
    KV_MODES,
    DecodeStats,
    DraftLength,
    Outputs,
    decode_full,
    decode_speculative,
    decode_threshold,
    prefill,
)
from .sampling import Sampling
from .state import DecodeState, LlamaRunner

MODES = ("full", "speculative", "threshold")
# speculative: the exit confidence a draft needs (the best of 0.4-0.8 at batch 1, three runs)
DRAFT_THRESHOLD = 0.6
__all__ = [
    "CONFIDENCE_MEASURES",
    "DRAFT_THRESHOLD",
    "KV_MODES",
    "MODES",
    "GenerationResult",
    "Sampling",
    "chat_prompt_ids",
    "generate",
    "hf_greedy",
    "left_pad",
    "prompt_ids",
]


@dataclass
class GenerationResult:
    texts: list[str]
    tokens: list[list[int]]  # new tokens per prompt
    layers: list[list[int]]  # per new token, the layer it was decided at (num_layers: full)
    stats: DecodeStats
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.stats.tokens / self.seconds if self.seconds > 0 else 0.0


def chat_prompt_ids(tokenizer, content: str) -> list[int]:
    """Token ids of one user message through the tokenizer's chat template, ready for the
    assistant's reply."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    return list(ids if isinstance(ids, list) else ids["input_ids"])


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
    tokens, valid = left_pad(ids, pad)
    out = model.generate(
        input_ids=tokens,
        attention_mask=valid.long(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        **kwargs,
    )
    return out[:, tokens.shape[1] :]


def _stop_checker(tokenizer, stop: list[str] | None):
    """tokens -> whether the decoded text of the last few tokens holds a stop string. A token
    decodes to at least part of one character, so the tail that can hold the longest stop
    string, plus a token it may straddle, is enough: checking costs O(1) per token."""
    if not stop:
        return None
    if tokenizer is None:
        raise ValueError("eefast.generate: stop strings need a tokenizer")
    if any(not s for s in stop):
        raise ValueError("eefast.generate: stop strings must not be empty")
    tail = 4 * max(len(s) for s in stop) + 2

    def stopped(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-tail:], skip_special_tokens=True)
        return any(s in text for s in stop)

    return stopped


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    cuts = [text.find(s) for s in stop or () if s in text]
    return text[: min(cuts)] if cuts else text


def _eos_ids(tokenizer, stop_at_eos: bool) -> set[int]:
    if not stop_at_eos or tokenizer is None:
        return set()
    eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


@torch.no_grad()
def generate(
    ee: EarlyExitModel,
    tokenizer,
    prompts,
    mode: str = "speculative",
    max_new_tokens: int = 128,
    *,
    exit_layer: int | None = None,
    draft_k: int = 4,
    adaptive: bool = True,
    threshold: float | None = None,
    measure: str = "max_prob",
    kv: str = "recompute",
    exits: list[int] | None = None,
    min_exit: int = 1,
    draft_vocab: bool | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    stop_at_eos: bool = True,
    stop: list[str] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` for each prompt (a string, or token ids).

    Both early-exit modes send each token up through the exits in ``exits`` (default all, at
    or above ``min_exit``) and stop it at the first one whose ``measure`` (max_prob, margin,
    entropy scaled to [0, 1], or the fitted exit classifier) reaches ``threshold`` for every
    sequence of the batch.

    ``threshold`` mode (lossy, greedy only, ``threshold`` default 0.9) emits that exit's token;
    ``kv`` says how the blocks it skipped get its KV (``recompute``, exact, or ``propagate``).

    ``speculative`` mode (lossless, ``threshold`` default ``DRAFT_THRESHOLD``) keeps such
    tokens as drafts, at most ``draft_k`` a round (adaptive unless ``adaptive=False``), and the
    full model verifies them when a token finds no confident exit: greedy output is the full
    model's, token for token. ``exit_layer=E`` drafts from that exit only; with
    ``threshold=0`` it drafts ``draft_k`` tokens every round (classic self-speculation).

    A sequence ends at EOS (unless ``stop_at_eos=False``) or once its text holds one of the
    ``stop`` strings; its text is cut before the stop string (its tokens keep the one that
    completed it).

    ``draft_vocab`` cuts the exit heads to the draft vocabulary saved beside the exits
    (``eefast draft-vocab``): None uses it when there is one, True requires it, False keeps
    the whole vocabulary. Speculative output stays exact either way.
    """
    if not isinstance(ee, EarlyExitModel) or not len(ee.exits):
        raise ValueError(
            "eefast.generate: no exits attached; add them with eefast.models.add_exits or "
            "load tuned ones with eefast.models.load_exits"
        )
    if mode not in MODES:
        raise ValueError(f"eefast.generate: unknown mode {mode!r}; choose from {MODES}")
    if max_new_tokens <= 0:
        raise ValueError(f"eefast.generate: max_new_tokens must be > 0, got {max_new_tokens}")
    if draft_k <= 0:
        raise ValueError(f"eefast.generate: draft_k must be > 0, got {draft_k}")
    if mode != "full" and measure == "classifier" and ee.classifier is None:
        raise ValueError(
            "eefast.generate: measure='classifier' needs a fitted exit classifier "
            "(eefast train-classifier, then load_exits picks it up)"
        )
    if kv not in KV_MODES:
        raise ValueError(f"eefast.generate: unknown kv mode {kv!r}; choose from {KV_MODES}")
    if measure not in CONFIDENCE_MEASURES:
        raise ValueError(f"eefast.generate: unknown measure {measure!r}; {CONFIDENCE_MEASURES}")
    available = ee.exit_layers
    named = [exit_layer] if exit_layer is not None else []
    for layer in [*named, *(exits or [])]:
        if layer not in available:
            raise ValueError(
                f"eefast.generate: no exit at layer {layer}; this model has exits at {available}"
            )
    active = sorted(e for e in (exits or available) if e >= min_exit)
    if mode != "full" and not active and not named:
        raise ValueError(f"eefast.generate: no exit at or above min_exit={min_exit}")
    drafting = named or active
    if threshold is None:
        threshold = DRAFT_THRESHOLD if mode == "speculative" else 0.9
    if draft_vocab and ee.draft_vocab is None:
        raise ValueError(
            "eefast.generate: draft_vocab=True but these exits have no draft vocabulary "
            "(make one with eefast draft-vocab)"
        )
    sampling = Sampling(temperature, top_k, top_p)
    if mode == "threshold" and not sampling.greedy:
        raise ValueError("eefast.generate: threshold mode is greedy; set temperature=0")
    if mode == "speculative" and not sampling.greedy and measure != "max_prob":
        raise ValueError(
            "eefast.generate: sampled drafts are confident by their distribution's top "
            "probability; use measure='max_prob'"
        )

    runner = LlamaRunner(ee, ee.draft_vocab if draft_vocab is not False else None)
    device = next(ee.model.parameters()).device
    ids = prompt_ids(tokenizer, prompts, chat)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    tokens, valid = left_pad(ids, pad, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = Outputs(
        len(ids), max_new_tokens, _eos_ids(tokenizer, stop_at_eos), _stop_checker(tokenizer, stop)
    )
    state = DecodeState(runner.num_layers, len(ids), device)

    t0 = time.perf_counter()
    with runner.decode_linears():
        logits = prefill(runner, state, tokens, valid)
        runner.block_calls, runner.head_calls = 0, 0.0
        if mode == "full":
            stats = decode_full(runner, state, logits, out, sampling, gen)
        elif mode == "speculative":
            draft = DraftLength(draft_k, adaptive)
            stats = decode_speculative(
                runner, state, logits, out, sampling, gen, drafting, draft, threshold, measure
            )
        else:
            stats = decode_threshold(runner, state, logits, out, active, threshold, measure, kv)
    seconds = time.perf_counter() - t0
    stats.block_calls, stats.head_calls = runner.block_calls, runner.head_calls
    texts = [
        _cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stop) if tokenizer else ""
        for t in out.tokens
    ]
    return GenerationResult(texts, out.tokens, out.layers, stats, seconds)
