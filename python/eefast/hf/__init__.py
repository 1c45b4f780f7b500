"""Hugging Face models as eefast sees them: the one per-architecture table (arch.py), model
loading with the embedded SmolLM2 default (loading.py), and tokens in and out (tokens.py)."""

from .arch import ARCHS, GENERATION_ARCHS, ArchSpec, arch_spec, decoder_parts, decoder_stack
from .loading import DEFAULT_MODEL, load_model
from .tokens import chat_prompt_ids, format_prompt, hf_greedy, left_pad, pad_id, prompt_ids

__all__ = [
    "ARCHS",
    "DEFAULT_MODEL",
    "GENERATION_ARCHS",
    "ArchSpec",
    "arch_spec",
    "chat_prompt_ids",
    "decoder_parts",
    "decoder_stack",
    "format_prompt",
    "hf_greedy",
    "left_pad",
    "load_model",
    "pad_id",
    "prompt_ids",
]
