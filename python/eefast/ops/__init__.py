"""The eefast ops: ``torch.ops.eefast.*`` with typed wrappers, fake kernels and autograd.

Importing this package loads ``eefast._C``, which registers every op's schema and its CPU (and,
when built, CUDA) kernels. One module per op family; the C++ side of each op lives in
``csrc/<op>/``:

  lora.py           lora_linear                                   csrc/lora_linear/
  bottleneck.py     bottleneck_adapter                            csrc/bottleneck_adapter/
  confidence.py     exit_stats                                    csrc/exit_stats/
  cross_entropy.py  linear_cross_entropy, multi_exit_cross_entropy  csrc/linear_cross_entropy/
  decode.py         decode_linear(_q8), decode_block              csrc/decode_linear/, decode_block/
  reference.py      a pure-torch reference of each op (the test oracles)

This package imports torch only (never transformers).
"""

import logging

log = logging.getLogger(__name__)

try:
    # Importing _C runs the op registrations of torch.ops.eefast.* (CPU, and CUDA if built).
    from .. import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    log.warning(
        "eefast._C failed to load (%s); torch.ops.eefast.* are unavailable. "
        "Build it with `pip install --no-build-isolation -e .`",
        e,
    )

from . import reference  # noqa: E402
from .bottleneck import ADAPTER_ACTIVATIONS, bottleneck_adapter  # noqa: E402
from .confidence import ExitStats, exit_stats  # noqa: E402
from .cross_entropy import linear_cross_entropy, multi_exit_cross_entropy  # noqa: E402
from .decode import decode_block, decode_linear, decode_linear_q8, quantize_rows  # noqa: E402
from .lora import lora_linear  # noqa: E402

__all__ = [
    "ADAPTER_ACTIVATIONS",
    "ExitStats",
    "bottleneck_adapter",
    "decode_block",
    "decode_linear",
    "decode_linear_q8",
    "exit_stats",
    "linear_cross_entropy",
    "lora_linear",
    "multi_exit_cross_entropy",
    "quantize_rows",
    "reference",
]
