"""Modules built on the eefast ops."""

from .exit_head import EXIT_KINDS, ExitHead, ResidualMLP
from .lora import LoRALinear

__all__ = ["EXIT_KINDS", "ExitHead", "LoRALinear", "ResidualMLP"]
