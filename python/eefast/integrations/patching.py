"""``eefast.patch(model)``: eefast's fused ops inside an unmodified Hugging Face causal LM, plain
or wrapped by PEFT, so that other trainers (HF Trainer, TRL) get them without code changes.

- The causal LM's forward: with ``labels`` in training, the loss goes through the fused
  ``linear_cross_entropy`` on the decoder stack's last hidden states, so ``[tokens, vocab]``
  logits are never built (HF's label shift and ``ignore_index``; ``num_items_in_batch`` as HF
  Trainer passes it for gradient accumulation; Gemma-2's final logit softcap). Without
  labels, or in eval, it is HF's.
- PEFT's LoRA ``Linear`` layers: one active plain-LoRA adapter on an ``nn.Linear`` runs as
  ``lora_linear`` with PEFT's own parameters (names, files, merge and loading unchanged);
  anything else (merged, disabled, several adapters, DoRA, another dtype for the adapter, a
  transposed Conv1D base) takes PEFT's own forward, call by call.

Both replace ``forward`` on the instances only; ``unpatch`` deletes them, restoring the class's
forward exactly.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..hf.arch import ARCHS, arch_spec, model_type
from ..hf.loss import fused_causal_lm_loss
from ..ops import lora_linear

_MARK = "_eefast_patch"
# Patched beyond eefast's architecture table: causal LMs whose loss the fused op computes as HF
# does, with a final logit softcap (Gemma-2).
_PATCH_ONLY = ("gemma2",)


@dataclass
class PatchReport:
    """What ``patch`` changed: the causal LM's loss, and which PEFT layers run fused."""

    model_type: str
    fused_loss: bool
    lora_layers: list[str] = field(default_factory=list)
    left_alone: dict[str, str] = field(default_factory=dict)  # module name -> why


def _causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a PEFT wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _fused_causal_lm_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    if labels is None or not self.training:
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
        )
    kwargs.pop("return_dict", None)
    kwargs.pop("logits_to_keep", None)
    loss = fused_causal_lm_loss(self, input_ids, attention_mask, labels, **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def _lora_fusable(layer: nn.Module) -> str | None:
    """Why a PEFT LoRA layer cannot run fused (None when it can)."""
    if not isinstance(layer.get_base_layer(), nn.Linear):
        return "its base layer is not an nn.Linear (a Conv1D runs transposed)"
    if any(layer.use_dora.get(a, False) for a in layer.lora_A):
        return "DoRA"
    if any(getattr(layer, "lora_bias", {}).get(a, False) for a in layer.lora_A):
        return "LoRA bias"
    return None


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs):
    active = [a for a in self.active_adapters if a in self.lora_A]
    base = self.get_base_layer()
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(active) != 1
        or active[0] in getattr(self, "lora_variant", {})
        or base.weight.requires_grad
    ):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    if not (x.dtype == base.weight.dtype == lora_a.dtype == lora_b.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return lora_linear(x, base.weight, base.bias, lora_a, lora_b, self.scaling[name], p,
                       self.training)  # fmt: skip


def _peft_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora.layer import Linear as PeftLoraLinear
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PeftLoraLinear)]


def patch(model: nn.Module) -> PatchReport:
    """Run ``model``'s training loss and its PEFT LoRA layers on eefast's fused ops (see the
    module docstring). Patching a patched model is a no-op with a warning."""
    lm = _causal_lm(model)
    if getattr(lm, _MARK, None) is not None:
        warnings.warn("eefast.patch: this model is already patched", stacklevel=2)
        return getattr(lm, _MARK)
    supported = arch_spec(lm) is not None or model_type(lm) in _PATCH_ONLY
    if not supported or not isinstance(lm.get_output_embeddings(), nn.Linear):
        raise ValueError(
            f"eefast.patch: {model_type(lm)!r} models are not supported; eefast patches "
            f"{sorted([*ARCHS, *_PATCH_ONLY])}"
        )
    report = PatchReport(model_type(lm), fused_loss=True)
    lm.forward = types.MethodType(_fused_causal_lm_forward, lm)
    for name, layer in _peft_lora_layers(model):
        why = _lora_fusable(layer)
        if why is None:
            layer.forward = types.MethodType(_fused_lora_forward, layer)
            report.lora_layers.append(name)
        else:
            report.left_alone[name] = why
    setattr(lm, _MARK, report)
    return report


def unpatch(model: nn.Module) -> None:
    """Undo ``patch``: every patched module's forward is its class's again."""
    lm = _causal_lm(model)
    report = getattr(lm, _MARK, None)
    if report is None:
        return
    for name in report.lora_layers:
        layer = model.get_submodule(name)
        if "forward" in layer.__dict__:
            del layer.forward
    if "forward" in lm.__dict__:
        del lm.forward
    delattr(lm, _MARK)
