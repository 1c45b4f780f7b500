"""Modules built on the eefast ops."""

from .bottleneck import BottleneckAdapter
from .exit_head import EXIT_KINDS, ExitHead, ResidualMLP
from .ia3 import IA3Linear
from .lora import LoRALinear
from .quantized import QuantizedLinear

__all__ = [
    "BottleneckAdapter",
    "EXIT_KINDS",
    "ExitHead",
    "IA3Linear",
    "LoRALinear",
    "QuantizedLinear",
    "ResidualMLP",
]
