"""The eefast ops: ``torch.ops.eefast.*`` with typed wrappers, fake kernels and autograd.

Importing this package loads ``eefast._C``, which registers every op's schema and its CPU (and,
when built, CUDA) kernels. One module per op family; the C++ side of each op lives in
``csrc/<op>/``:

  lora.py           lora_linear                                   csrc/lora_linear/
  bottleneck.py     bottleneck_adapter                            csrc/bottleneck_adapter/
  confidence.py     exit_stats                                    csrc/exit_stats/
  cross_entropy.py  linear_cross_entropy, multi_exit_cross_entropy  csrc/linear_cross_entropy/
  decode.py         decode_linear(_q8), decode_block              csrc/decode_linear/, decode_block/
  gguf.py           decode_linear_gguf, pack/dequantize_gguf      csrc/decode_linear/, cpu/gguf_*
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
from .gguf import (  # noqa: E402
    decode_linear_gguf,
    dequantize_gguf,
    gguf_type,
    pack_gguf,
    quantize_gguf,
)
from .lora import lora_linear  # noqa: E402

__all__ = [
    "ADAPTER_ACTIVATIONS",
    "ExitStats",
    "bottleneck_adapter",
    "decode_block",
    "decode_linear",
    "decode_linear_gguf",
    "decode_linear_q8",
    "dequantize_gguf",
    "exit_stats",
    "gguf_type",
    "linear_cross_entropy",
    "lora_linear",
    "multi_exit_cross_entropy",
    "pack_gguf",
    "quantize_gguf",
    "quantize_rows",
    "reference",
]
