"""Where a Hugging Face causal LM keeps its decoder blocks, final norm, LM head and MLPs.

eefast never copies a model's forward code: exits attach to these modules through hooks, so
any transformers version that keeps the module names works. Known architectures are listed in
ARCHS; others are probed with the same names and fail with a message naming what was found.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path from the CausalLM to the ModuleList of decoder blocks
    final_norm: str  # dotted path from the CausalLM to the final norm
    mlp_norm: str  # name, inside a block, of the norm in front of the MLP
    mlp: tuple[str, ...]  # names inside a block applied in order to form the MLP
    mlp_adds_residual: bool = False  # the MLP module takes (x, residual) and adds it (BLOOM)


_LLAMA = ArchSpec("model.layers", "model.norm", "post_attention_layernorm", ("mlp",))
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": ArchSpec("transformer.h", "transformer.ln_f", "ln_2", ("mlp",)),
    "opt": ArchSpec(
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        "final_layer_norm",
        ("fc1", "activation_fn", "fc2"),
    ),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers", "gpt_neox.final_layer_norm", "post_attention_layernorm", ("mlp",)
    ),
    "bloom": ArchSpec(
        "transformer.h", "transformer.ln_f", "post_attention_layernorm", ("mlp",), True
    ),
    "gptj": ArchSpec("transformer.h", "transformer.ln_f", "ln_1", ("mlp",)),
}


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for name in path.split("."):
        mod = getattr(mod, name, None)
        if mod is None:
            return None
    return mod


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that runs the decoder blocks and the final norm (``model.model`` for Llama,
    ``model.model.decoder`` for OPT, ``model.transformer`` for GPT-2): what every path into the
    model calls, and whose output is the last hidden state. ``model.base_model`` for an
    architecture eefast does not know."""
    spec = ARCHS.get(getattr(getattr(model, "config", None), "model_type", None))
    if spec is not None:
        stack = _get(model, spec.layers.rsplit(".", 1)[0])
        if stack is not None:
            return stack
    return getattr(model, "base_model", model)


@dataclass
class DecoderParts:
    model_type: str
    spec: ArchSpec
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Linear


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The blocks, final norm and LM head of a causal LM; a clear error if they are not found."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHS.get(model_type)
    if spec is None:
        found = sorted(n for n, m in model.named_modules() if isinstance(m, nn.ModuleList))
        raise ValueError(
            f"eefast: unsupported architecture {model_type!r}; known: {sorted(ARCHS)}. "
            f"ModuleLists in this model: {found}"
        )
    layers = _get(model, spec.layers)
    final_norm = _get(model, spec.final_norm)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(layers, nn.ModuleList) or final_norm is None:
        raise ValueError(
            f"eefast: {model_type} model lacks {spec.layers!r} or {spec.final_norm!r}; "
            "is it a causal LM (…ForCausalLM)?"
        )
    if not isinstance(lm_head, nn.Linear):
        raise ValueError(f"eefast: {model_type} model has no nn.Linear output embedding")
    if getattr(_get(model, spec.layers.rsplit(".", 1)[0]), "project_out", None) is not None:
        raise ValueError("eefast: OPT models with project_out (word_embed_proj_dim) unsupported")
    return DecoderParts(model_type, spec, layers, final_norm, lm_head)
