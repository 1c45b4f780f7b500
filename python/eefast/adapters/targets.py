"""Where each adapter method attaches, per architecture, and how target names are matched.

A target name matches a module whose dotted name equals it or ends with ``"." + name``, as in
PEFT, so PEFT ``target_modules`` lists mean the same here. Module names are relative to the
block (``"mlp.down_proj"``); the defaults follow PEFT's and LLM-Adapters' choices.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..nn import IA3Linear, LoRALinear

# Linears already wrapped by a LoRA or (IA)³ adapter.
ADAPTED_LINEARS = (LoRALinear, IA3Linear)


@dataclass(frozen=True)
class AdapterTargets:
    lora: tuple[str, ...]  # linears that get LoRA by default
    attn_out: str  # the attention's output projection (a series adapter goes after it)
    mlp_out: str  # the MLP's output projection
    mlp_in: str  # the module whose input is the MLP's input (a parallel adapter reads it)
    mlp: str  # the module whose output is the MLP's output (a parallel adapter adds to it)
    ia3: tuple[str, ...]  # keys, values and the MLP's down projection
    ia3_feedforward: tuple[str, ...]  # of those, the ones scaled on their input


_LLAMA = AdapterTargets(
    lora=("q_proj", "v_proj"),
    attn_out="self_attn.o_proj",
    mlp_out="mlp.down_proj",
    mlp_in="mlp",
    mlp="mlp",
    ia3=("k_proj", "v_proj", "down_proj"),
    ia3_feedforward=("down_proj",),
)
TARGETS: dict[str, AdapterTargets] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": AdapterTargets(
        lora=("c_attn",),
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        mlp_in="mlp",
        mlp="mlp",
        ia3=("c_attn", "mlp.c_proj"),
        ia3_feedforward=("mlp.c_proj",),
    ),
    "opt": AdapterTargets(
        lora=("q_proj", "v_proj"),
        attn_out="self_attn.out_proj",
        mlp_out="fc2",
        mlp_in="fc1",  # OPT's MLP is fc1 -> activation -> fc2 inside the block, no module
        mlp="fc2",
        ia3=("k_proj", "v_proj", "fc2"),
        ia3_feedforward=("fc2",),
    ),
    "bloom": AdapterTargets(
        lora=("query_key_value",),
        attn_out="self_attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        mlp_in="mlp",
        mlp="mlp",  # BloomMLP adds the residual itself: the adapter's term adds the same way
        ia3=("query_key_value", "mlp.dense_4h_to_h"),
        ia3_feedforward=("mlp.dense_4h_to_h",),
    ),
    "gptj": AdapterTargets(
        lora=("q_proj", "v_proj"),
        attn_out="attn.out_proj",
        mlp_out="mlp.fc_out",
        mlp_in="mlp",
        mlp="mlp",
        ia3=("k_proj", "v_proj", "fc_out"),
        ia3_feedforward=("fc_out",),
    ),
    "gpt_neox": AdapterTargets(
        lora=("query_key_value",),
        attn_out="attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        mlp_in="mlp",
        mlp="mlp",
        ia3=("query_key_value", "dense_4h_to_h"),
        ia3_feedforward=("dense_4h_to_h",),
    ),
}


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or a GPT-2 style Conv1D (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear | Conv1D)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def model_targets(model: nn.Module) -> AdapterTargets | None:
    return TARGETS.get(getattr(getattr(model, "config", None), "model_type", None))


def matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def linear_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the model's linear layers (what a user can target)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})


def find_targets(
    model: nn.Module, targets: tuple[str, ...], method: str, linear_only: bool = True
) -> list[str]:
    """Dotted names of the modules matching any target; a clear error for a target that
    matches nothing or, where a linear layer is needed, a module that is not one (or one that
    already carries a LoRA or (IA)³ wrapper)."""
    names = []
    for target in targets:
        found = [n for n, m in model.named_modules() if n and matches(n, target)]
        if not found:
            raise ValueError(
                f"eefast: {method} target {target!r} matches no module of this "
                f"{getattr(model.config, 'model_type', '?')} model; its linear layers are "
                f"{linear_names(model)}"
            )
        if linear_only:
            for n in found:
                module = model.get_submodule(n)
                if isinstance(module, ADAPTED_LINEARS):
                    raise ValueError(
                        f"eefast: {n!r} already carries a {type(module).__name__}; one LoRA or "
                        f"(IA)³ adapter per linear layer"
                    )
            bad = [n for n in found if not is_linear(model.get_submodule(n))]
            if bad:
                raise ValueError(
                    f"eefast: {method} target {target!r} matches {bad[0]!r}, which is a "
                    f"{type(model.get_submodule(bad[0])).__name__}, not a linear layer; linear "
                    f"layers are {linear_names(model)}"
                )
        names += [n for n in found if n not in names]
    return names


def default_targets(model: nn.Module, method: str) -> AdapterTargets:
    """The architecture's map, or a clear error listing the model's linear layers."""
    spec = model_targets(model)
    if spec is None:
        raise ValueError(
            f"eefast: no default {method} targets for architecture "
            f"{getattr(getattr(model, 'config', None), 'model_type', None)!r} (known: "
            f"{sorted(TARGETS)}); pass target_modules. Its linear layers are {linear_names(model)}"
        )
    return spec
