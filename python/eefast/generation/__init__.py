"""Early-exit generation: ``eefast.generate(ee_model, tokenizer, prompts, mode=...)``.

api.py            generate(): argument checks, setup, one mode's loop
decode.py         the loops: full depth, self-speculative (lossless) and threshold (lossy)
runner.py         calls the model's blocks, norms and heads piecewise
blocks.py         a llama-family block without module dispatch, or as one decode_block call
cache.py          the slot-indexed KV cache and which slots are valid
sampling.py       temperature / top-k / top-p
stopping.py       EOS and stop strings
draft_vocab.py    exit heads cut to the data's most frequent tokens
feature_draft.py  speculative decoding drafted by a draft exit (EAGLE-style)
low_bit_draft.py  speculative decoding drafted by the backbone's own low-bit copy
"""

from .api import (
    DRAFT_K,
    DRAFT_THRESHOLD,
    FEATURE_DRAFT_K,
    FEATURE_DRAFT_THRESHOLD,
    FEATURE_DRAFT_WIDTH,
    LOW_BIT_DRAFT_THRESHOLD,
    MODES,
    GenerationResult,
    generate,
)
from .decode import CONFIDENCE_MEASURES, KV_MODES, DecodeStats
from .low_bit_draft import DRAFT_WEIGHTS, LowBitDraft, low_bit_draft
from .sampling import Sampling

__all__ = [
    "CONFIDENCE_MEASURES",
    "DRAFT_THRESHOLD",
    "DRAFT_WEIGHTS",
    "DRAFT_K",
    "FEATURE_DRAFT_K",
    "FEATURE_DRAFT_THRESHOLD",
    "FEATURE_DRAFT_WIDTH",
    "KV_MODES",
    "LOW_BIT_DRAFT_THRESHOLD",
    "LowBitDraft",
    "MODES",
    "DecodeStats",
    "GenerationResult",
    "Sampling",
    "generate",
    "low_bit_draft",
]
