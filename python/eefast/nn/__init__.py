"""Modules built on the eefast ops."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
