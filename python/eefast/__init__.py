"""eefast: fast early-exit and adapter tuning of pre-trained LLMs, with fused torch ops.

The whole public API is here. The ops and modules load with the package (torch only); the
parts built on Hugging Face models load on first use, so ``import eefast.ops`` never imports
transformers.

    import eefast
    model, tokenizer = eefast.load_model()              # SmolLM2-135M-Instruct by default
    ee = eefast.add_exits(model, [8, 15, 22], kind="mlp")
    eefast.ee_tune(ee, train_blocks, held_out_blocks, eefast.TuneConfig(steps=200))
    eefast.generate(ee, tokenizer, ["Hi!"], mode="speculative", chat=True)
"""

from __future__ import annotations

import importlib

from . import ops
from .nn import BottleneckAdapter, ExitHead, IA3Linear, LoRALinear
from .ops import (
    ExitStats,
    bottleneck_adapter,
    decode_block,
    decode_linear,
    decode_linear_q8,
    exit_stats,
    linear_cross_entropy,
    lora_linear,
    multi_exit_cross_entropy,
)

__version__ = "0.1.0"

# name -> the module that defines it, imported on first access (PEP 562).
_LAZY = {
    "load_model": "hf",
    "EarlyExitModel": "exits",
    "add_exits": "exits",
    "load_exits": "exits",
    "save_exits": "exits",
    "TuneConfig": "train",
    "ee_tune": "train",
    "FinetuneConfig": "train",
    "finetune": "train",
    "evaluate_exits": "eval",
    "generate": "generation",
    "GenerationResult": "generation",
    "low_bit_draft": "generation",
    "add_adapters": "adapters",
    "load_adapter": "adapters",
    "save_adapter": "adapters",
    "mark_only_adapters_trainable": "adapters",
    "LoraConfig": "adapters",
    "SeriesConfig": "adapters",
    "ParallelConfig": "adapters",
    "PrefixConfig": "adapters",
    "IA3Config": "adapters",
    "patch": "integrations",
    "unpatch": "integrations",
}

__all__ = [
    "BottleneckAdapter",
    "ExitHead",
    "ExitStats",
    "IA3Linear",
    "LoRALinear",
    "bottleneck_adapter",
    "decode_block",
    "decode_linear",
    "decode_linear_q8",
    "exit_stats",
    "linear_cross_entropy",
    "lora_linear",
    "multi_exit_cross_entropy",
    "ops",
    *_LAZY,
]


_SUBPACKAGES = {"adapters", "cli", "data", "eval", "exits", "generation", "hf", "integrations",
                "train"}  # fmt: skip


def __getattr__(name: str):
    if name in _SUBPACKAGES:  # eefast.data.token_blocks etc. without importing it first
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eefast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
