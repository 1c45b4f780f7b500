"""The LLM-Adapters family on Hugging Face causal LMs: LoRA, series and parallel bottleneck
adapters, prefix-tuning and (IA)³, with PEFT-format files for LoRA and (IA)³."""

from .config import (
    IA3Config,
    LoraConfig,
    ParallelConfig,
    PrefixConfig,
    SeriesConfig,
    config_from_dict,
    config_to_dict,
)
from .files import load_adapter, save_adapter
from .model import (
    Adapter,
    adapters,
    add_adapters,
    get_adapter,
    mark_only_adapters_trainable,
    remove_adapter,
)

__all__ = [
    "Adapter",
    "IA3Config",
    "LoraConfig",
    "ParallelConfig",
    "PrefixConfig",
    "SeriesConfig",
    "adapters",
    "add_adapters",
    "config_from_dict",
    "config_to_dict",
    "get_adapter",
    "load_adapter",
    "mark_only_adapters_trainable",
    "remove_adapter",
    "save_adapter",
]
