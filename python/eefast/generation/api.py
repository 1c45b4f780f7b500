"""``eefast.generate(ee_model, tokenizer, prompts, mode=...)``: checks its arguments, sets up
the runner and the decoding state, and runs one mode's loop (decode.py).

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

from ..exits.model import EarlyExitModel
from ..hf.tokens import left_pad, pad_id, prompt_ids
from .cache import DecodeState
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
from .feature_draft import decode_feature_draft, prefill_with_draft
from .low_bit_draft import DRAFT_WEIGHTS, LowBitDraft, decode_low_bit_draft, low_bit_draft
from .runner import Runner
from .sampling import Sampling
from .stopping import cut_at_stop, eos_ids, stop_checker

MODES = ("full", "speculative", "threshold")
# speculative: the exit confidence a draft needs (the best of 0.4-0.8 at batch 1, three runs)
DRAFT_THRESHOLD = 0.6
# speculative with a draft exit: the confidence a draft needs to be made and verified (0.3
# beat 0.5 and 0.7 at k = 1, 2 and 3 in one run, by 3-5 %, once verify rows got cheaper)
FEATURE_DRAFT_THRESHOLD = 0.3
# speculative with a draft exit, greedy: how many candidates for the next token one round
# verifies, and the draft probability each one after the first needs; and the most drafts
# in the chain (fixed). On SmolLM2 at batch 1, k = 1 with width 2 / 3 made 1.12 / 1.13x full
# depth in one 5-repeat run and 1.17 / 1.10x in a 3-repeat bench-generate; the adaptive
# chain without a tree 0.96-0.97x.
FEATURE_DRAFT_WIDTH = 2
FEATURE_DRAFT_CANDIDATE_MIN = 0.02
FEATURE_DRAFT_K = 1
# every other speculative mode: the first draft length (adaptive)
DRAFT_K = 4
# speculative with a low-bit draft: the confidence a draft after the first needs
LOW_BIT_DRAFT_THRESHOLD = 0.0


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

    def summary(self) -> str:
        """One line: tokens, speed, acceptance (speculative) and where tokens were decided."""
        s = self.stats
        hist = ", ".join(f"{k}:{v}" for k, v in sorted(s.exit_layers.items()))
        line = f"{s.tokens} tokens in {self.seconds:.2f} s = {self.tokens_per_second:.1f} tok/s"
        if s.drafted:
            line += f"; acceptance {s.acceptance:.2f}, {s.mean_accepted:.2f} tokens/round"
            if s.candidates_accepted:
                line += f" ({s.candidates_accepted} drafts from a tree's other candidates)"
        return line + f"; decided at layer {{{hist}}}"


# Inference mode rather than no_grad: eefast's decode_linear ops have Python autograd
# formulas, and under no_grad every call still goes through them (~8 us each, per linear of a
# decoding step on architectures that run their own modules).
@torch.inference_mode()
def generate(
    ee: EarlyExitModel,
    tokenizer,
    prompts,
    mode: str = "speculative",
    max_new_tokens: int = 128,
    *,
    exit_layer: int | None = None,
    draft_k: int | None = None,
    draft_width: int | None = None,
    adaptive: bool | None = None,
    threshold: float | None = None,
    measure: str = "max_prob",
    kv: str = "recompute",
    exits: list[int] | None = None,
    min_exit: int = 1,
    draft_vocab: bool | None = None,
    draft: str | LowBitDraft | None = None,
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
    tokens as drafts, at most ``draft_k`` a round (default ``DRAFT_K``, adaptive unless
    ``adaptive=False``), and the full model verifies them when a token finds no confident
    exit: greedy output is the full model's, token for token. ``exit_layer=E`` drafts from
    that exit only; with ``threshold=0`` it drafts ``draft_k`` tokens every round (classic
    self-speculation).

    A sequence ends at EOS (unless ``stop_at_eos=False``) or once its text holds one of the
    ``stop`` strings; its text is cut before the stop string (its tokens keep the one that
    completed it).

    With a ``draft`` exit, greedy rounds verify a small tree: the ``draft_width`` (default
    ``FEATURE_DRAFT_WIDTH``) likeliest next tokens whose draft probability reaches
    ``FEATURE_DRAFT_CANDIDATE_MIN``, the likeliest heading a chain of up to ``draft_k`` drafts
    (default ``FEATURE_DRAFT_K``, not adaptive). Sampled rounds draft a chain
    (``draft_width`` 1, ``draft_k`` default ``DRAFT_K``, adaptive).

    ``draft_vocab`` cuts the exit heads to the draft vocabulary saved beside the exits
    (``eefast draft-vocab``): None uses it when there is one, True requires it, False keeps
    the whole vocabulary. Speculative output stays exact either way.

    ``draft`` (speculative mode) drafts with the backbone's own low-bit copy instead of the
    exits: "q4" or "int8" quantises it now, or pass one made once by ``low_bit_draft``
    (llama-family float32 models on the CPU). The copy drafts up to ``draft_k`` tokens a
    round; drafts after the first need ``threshold`` (default ``LOW_BIT_DRAFT_THRESHOLD``).
    """
    if not isinstance(ee, EarlyExitModel) or not len(ee.exits):
        raise ValueError(
            "eefast.generate: no exits attached; add them with eefast.add_exits or "
            "load tuned ones with eefast.load_exits"
        )
    if mode not in MODES:
        raise ValueError(f"eefast.generate: unknown mode {mode!r}; choose from {MODES}")
    if max_new_tokens <= 0:
        raise ValueError(f"eefast.generate: max_new_tokens must be > 0, got {max_new_tokens}")
    if draft_k is not None and draft_k <= 0:
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
    feature_draft = ee.kind == "draft"
    if feature_draft and mode == "threshold":
        raise ValueError(
            "eefast.generate: a draft exit sits on top of the model, so it only drafts for "
            "speculative mode; threshold mode needs exits inside the model (norm, mlp, embed)"
        )
    if feature_draft and (exit_layer is not None or exits or measure != "max_prob"):
        raise ValueError(
            "eefast.generate: exit_layer, exits and measure choose among exits inside the "
            "model; a draft exit has one head and drafts by its max probability"
        )
    if draft is not None:
        if mode != "speculative":
            raise ValueError(f"eefast.generate: draft={draft!r} drafts for speculative mode only")
        if isinstance(draft, str) and draft not in DRAFT_WEIGHTS:
            raise ValueError(
                f"eefast.generate: draft must be one of {DRAFT_WEIGHTS} or a low_bit_draft(), "
                f"got {draft!r}"
            )
        if ee.kind == "layer":
            raise ValueError(
                "eefast.generate: a low-bit draft runs the backbone alone, and 'layer' exits "
                "would still run their blocks on every token; load the model without them"
            )
        if exit_layer is not None or exits or measure != "max_prob":
            raise ValueError(
                "eefast.generate: exit_layer, exits and measure choose among exits; a low-bit "
                "draft drafts from the whole backbone by its max probability"
            )
        feature_draft = False  # a draft exit, if any, is not used
    if threshold is None:
        if mode == "speculative" and draft is not None:
            threshold = LOW_BIT_DRAFT_THRESHOLD
        elif mode == "speculative":
            threshold = FEATURE_DRAFT_THRESHOLD if feature_draft else DRAFT_THRESHOLD
        else:
            threshold = 0.9
    if draft_vocab and ee.draft_vocab is None:
        raise ValueError(
            "eefast.generate: draft_vocab=True but these exits have no draft vocabulary "
            "(make one with eefast draft-vocab)"
        )
    sampling = Sampling(temperature, top_k, top_p)
    if draft_width is not None and draft_width > 1:
        if not (feature_draft and mode == "speculative"):
            raise ValueError("eefast.generate: draft_width > 1 needs a draft exit drafting")
        if not sampling.greedy:
            raise ValueError(
                "eefast.generate: draft trees are greedy; sample with draft_width=1 "
                "(--draft-width 1)"
            )
    if draft_width is not None and draft_width < 1:
        raise ValueError(f"eefast.generate: draft_width must be >= 1, got {draft_width}")
    if mode == "threshold" and not sampling.greedy:
        raise ValueError("eefast.generate: threshold mode is greedy; set temperature=0")
    if mode == "speculative" and not sampling.greedy and measure != "max_prob":
        raise ValueError(
            "eefast.generate: sampled drafts are confident by their distribution's top "
            "probability; use measure='max_prob'"
        )

    runner = Runner(ee, ee.draft_vocab if draft_vocab is not False else None)
    # A tree's candidates share a position, which ALiBi's positions (counted over the valid
    # key slots) cannot express.
    trees = runner.arch.explicit_positions
    if draft_width is not None and draft_width > 1 and not trees:
        raise ValueError(f"eefast.generate: draft trees do not run on {ee.parts.model_type}")
    if draft_width is None:
        draft_width = FEATURE_DRAFT_WIDTH if sampling.greedy and trees else 1
    tree = feature_draft and mode == "speculative" and draft_width > 1
    if draft_k is None:
        draft_k = FEATURE_DRAFT_K if tree else DRAFT_K
    if adaptive is None:
        adaptive = not tree
    if isinstance(draft, str):
        draft = low_bit_draft(ee, draft)
    if mode == "threshold" and kv == "propagate" and not runner.propagates_kv:
        raise ValueError(
            "eefast.generate: kv='propagate' runs on llama-family models without 'layer' "
            "exits; use kv='recompute'"
        )
    device = next(ee.model.parameters()).device
    ids = prompt_ids(tokenizer, prompts, chat)
    tokens, valid = left_pad(ids, pad_id(tokenizer), device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = Outputs(
        len(ids), max_new_tokens, eos_ids(tokenizer, stop_at_eos), stop_checker(tokenizer, stop)
    )
    state = DecodeState(runner.cache_layers, len(ids), device)

    t0 = time.perf_counter()
    with runner.decode_linears():
        if feature_draft and mode == "speculative":
            logits, feats = prefill_with_draft(runner, state, tokens, valid)
        else:
            logits = prefill(runner, state, tokens, valid)
        runner.block_calls, runner.head_calls = 0, 0.0
        if feature_draft and mode == "speculative":
            stats = decode_feature_draft(
                runner,
                state,
                logits,
                feats,
                out,
                sampling,
                gen,
                DraftLength(draft_k, adaptive),
                threshold,
                draft_width,
                FEATURE_DRAFT_CANDIDATE_MIN,
            )
        elif mode == "full":
            stats = decode_full(runner, state, logits, out, sampling, gen)
        elif draft is not None:
            length = DraftLength(draft_k, adaptive)
            stats = decode_low_bit_draft(
                runner, state, logits, out, sampling, gen, length, threshold, draft
            )
        elif mode == "speculative":
            length = DraftLength(draft_k, adaptive)
            stats = decode_speculative(
                runner, state, logits, out, sampling, gen, drafting, length, threshold, measure
            )
        else:
            stats = decode_threshold(runner, state, logits, out, active, threshold, measure, kv)
    seconds = time.perf_counter() - t0
    stats.block_calls, stats.head_calls = runner.block_calls, runner.head_calls
    texts = [
        cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stop) if tokenizer else ""
        for t in out.tokens
    ]
    return GenerationResult(texts, out.tokens, out.layers, stats, seconds)
