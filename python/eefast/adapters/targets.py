"""How adapter target names are matched (the per-architecture defaults are in hf/arch.py).

A target name matches a module whose dotted name equals it or ends with ``"." + name``, as in
PEFT, so PEFT ``target_modules`` lists mean the same here. Module names are relative to the
block (``"mlp.down_proj"``); the defaults follow PEFT's and LLM-Adapters' choices.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..hf.arch import ARCHS, AdapterTargets, arch_spec, model_type
from ..nn import IA3Linear, LoRALinear

# Linears already wrapped by a LoRA or (IA)³ adapter.
ADAPTED_LINEARS = (LoRALinear, IA3Linear)


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or a GPT-2 style Conv1D (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear | Conv1D)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


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
    spec = arch_spec(model)
    if spec is None:
        raise ValueError(
            f"eefast: no default {method} targets for architecture {model_type(model)!r} "
            f"(known: {sorted(ARCHS)}); pass target_modules. Its linear layers are "
            f"{linear_names(model)}"
        )
    return spec.targets
