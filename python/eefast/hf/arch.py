"""Everything eefast knows about each Hugging Face architecture, in one table.

Per architecture (``config.model_type``): where the causal LM keeps its decoder blocks, final
norm and MLP (what exits attach to), where each adapter method goes by default, and how
early-exit generation calls it (decode_calls.py; with which fused decode block, if any).
eefast never copies a model's forward code: exits and adapters attach to these modules
through hooks or wrappers, so any transformers version that keeps the module names works.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .decode_calls import (
    BLOOM_CALLS,
    GPT2_CALLS,
    GPT_NEOX_CALLS,
    GPTJ_CALLS,
    LLAMA_CALLS,
    OPT_CALLS,
    DecodeCalls,
)


@dataclass(frozen=True)
class AdapterTargets:
    """Module names, relative to a block, where each adapter method attaches by default (PEFT's
    and LLM-Adapters' choices)."""

    lora: tuple[str, ...]  # linears that get LoRA by default
    attn_out: str  # the attention's output projection (a series adapter goes after it)
    mlp_out: str  # the MLP's output projection
    mlp_in: str  # the module whose input is the MLP's input (a parallel adapter reads it)
    mlp: str  # the module whose output is the MLP's output (a parallel adapter adds to it)
    ia3: tuple[str, ...]  # keys, values and the MLP's down projection
    ia3_feedforward: tuple[str, ...]  # of those, the ones scaled on their input


@dataclass(frozen=True)
class DecodeBlock:
    """HF class names of a block whose forward ``decode_block`` computes: its RMSNorms (the
    weight times the float32-normalised row) and its SiLU-gated MLP."""

    norm: str
    mlp: str
    act: tuple[str, ...] = ("SiLUActivation", "SiLU")


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path from the CausalLM to the ModuleList of decoder blocks
    final_norm: str  # dotted path from the CausalLM to the final norm
    mlp_norm: str  # name, inside a block, of the norm in front of the MLP
    mlp: tuple[str, ...]  # names inside a block applied in order to form the MLP
    targets: AdapterTargets
    mlp_adds_residual: bool = False  # the MLP module takes (x, residual) and adds it (BLOOM)
    decode: DecodeCalls | None = None  # how eefast.generate calls it (None: it does not)
    decode_block: DecodeBlock | None = None  # decode steps may run as one decode_block call

    @property
    def generation(self) -> bool:
        return self.decode is not None


_LLAMA_TARGETS = AdapterTargets(
    lora=("q_proj", "v_proj"),
    attn_out="self_attn.o_proj",
    mlp_out="mlp.down_proj",
    mlp_in="mlp",
    mlp="mlp",
    ia3=("k_proj", "v_proj", "down_proj"),
    ia3_feedforward=("down_proj",),
)


def _llama_family(prefix: str) -> ArchSpec:
    return ArchSpec(
        "model.layers",
        "model.norm",
        "post_attention_layernorm",
        ("mlp",),
        _LLAMA_TARGETS,
        decode=LLAMA_CALLS,
        decode_block=DecodeBlock(norm=f"{prefix}RMSNorm", mlp=f"{prefix}MLP"),
    )


ARCHS: dict[str, ArchSpec] = {
    "llama": _llama_family("Llama"),
    "mistral": _llama_family("Mistral"),
    "qwen2": _llama_family("Qwen2"),
    "gpt2": ArchSpec(
        "transformer.h",
        "transformer.ln_f",
        "ln_2",
        ("mlp",),
        AdapterTargets(
            lora=("c_attn",),
            attn_out="attn.c_proj",
            mlp_out="mlp.c_proj",
            mlp_in="mlp",
            mlp="mlp",
            ia3=("c_attn", "mlp.c_proj"),
            ia3_feedforward=("mlp.c_proj",),
        ),
        decode=GPT2_CALLS,
    ),
    "opt": ArchSpec(
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        "final_layer_norm",
        ("fc1", "activation_fn", "fc2"),
        AdapterTargets(
            lora=("q_proj", "v_proj"),
            attn_out="self_attn.out_proj",
            mlp_out="fc2",
            mlp_in="fc1",  # OPT's MLP is fc1 -> activation -> fc2 inside the block, no module
            mlp="fc2",
            ia3=("k_proj", "v_proj", "fc2"),
            ia3_feedforward=("fc2",),
        ),
        decode=OPT_CALLS,
    ),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
        "post_attention_layernorm",
        ("mlp",),
        AdapterTargets(
            lora=("query_key_value",),
            attn_out="attention.dense",
            mlp_out="mlp.dense_4h_to_h",
            mlp_in="mlp",
            mlp="mlp",
            ia3=("query_key_value", "dense_4h_to_h"),
            ia3_feedforward=("dense_4h_to_h",),
        ),
        decode=GPT_NEOX_CALLS,
    ),
    "bloom": ArchSpec(
        "transformer.h",
        "transformer.ln_f",
        "post_attention_layernorm",
        ("mlp",),
        AdapterTargets(
            lora=("query_key_value",),
            attn_out="self_attention.dense",
            mlp_out="mlp.dense_4h_to_h",
            mlp_in="mlp",
            mlp="mlp",  # BloomMLP adds the residual itself: the adapter's term adds the same way
            ia3=("query_key_value", "mlp.dense_4h_to_h"),
            ia3_feedforward=("mlp.dense_4h_to_h",),
        ),
        mlp_adds_residual=True,
        decode=BLOOM_CALLS,
    ),
    "gptj": ArchSpec(
        "transformer.h",
        "transformer.ln_f",
        "ln_1",
        ("mlp",),
        AdapterTargets(
            lora=("q_proj", "v_proj"),
            attn_out="attn.out_proj",
            mlp_out="mlp.fc_out",
            mlp_in="mlp",
            mlp="mlp",
            ia3=("k_proj", "v_proj", "fc_out"),
            ia3_feedforward=("fc_out",),
        ),
        decode=GPTJ_CALLS,
    ),
}
GENERATION_ARCHS = tuple(name for name, spec in ARCHS.items() if spec.generation)


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def arch_spec(model: nn.Module) -> ArchSpec | None:
    """The table's row for this model, or None for an architecture eefast does not know."""
    return ARCHS.get(model_type(model))


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
    spec = arch_spec(model)
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
    mtype = model_type(model)
    spec = ARCHS.get(mtype)
    if spec is None:
        found = sorted(n for n, m in model.named_modules() if isinstance(m, nn.ModuleList))
        raise ValueError(
            f"eefast: unsupported architecture {mtype!r}; known: {sorted(ARCHS)}. "
            f"ModuleLists in this model: {found}"
        )
    layers = _get(model, spec.layers)
    final_norm = _get(model, spec.final_norm)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(layers, nn.ModuleList) or final_norm is None:
        raise ValueError(
            f"eefast: {mtype} model lacks {spec.layers!r} or {spec.final_norm!r}; "
            "is it a causal LM (…ForCausalLM)?"
        )
    if not isinstance(lm_head, nn.Linear):
        raise ValueError(f"eefast: {mtype} model has no nn.Linear output embedding")
    if getattr(_get(model, spec.layers.rsplit(".", 1)[0]), "project_out", None) is not None:
        raise ValueError("eefast: OPT models with project_out (word_embed_proj_dim) unsupported")
    return DecoderParts(mtype, spec, layers, final_norm, lm_head)
