"""eefast: fast early-exit and adapter tuning of pre-trained LLMs, with fused torch ops."""

import logging

log = logging.getLogger(__name__)

try:
    # Importing _C runs the op registrations of torch.ops.eefast.* (CPU, and CUDA if built).
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    log.warning(
        "eefast._C failed to load (%s); torch.ops.eefast.* are unavailable. "
        "Build it with `pip install --no-build-isolation -e .`",
        e,
    )

from . import ops  # noqa: E402
from .adapters import (  # noqa: E402
    add_adapters,
    load_adapter,
    mark_only_adapters_trainable,
    save_adapter,
)
from .nn import LoRALinear  # noqa: E402
from .ops import (  # noqa: E402
    ExitStats,
    bottleneck_adapter,
    exit_stats,
    linear_cross_entropy,
    lora_linear,
    multi_exit_cross_entropy,
)

__all__ = [
    "ExitStats",
    "LoRALinear",
    "add_adapters",
    "bottleneck_adapter",
    "exit_stats",
    "linear_cross_entropy",
    "load_adapter",
    "lora_linear",
    "mark_only_adapters_trainable",
    "multi_exit_cross_entropy",
    "ops",
    "save_adapter",
]
__version__ = "0.1.0"
