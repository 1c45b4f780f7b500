"""eefast inside other people's training code: ``patch``/``unpatch`` put the fused ops into an
unmodified Hugging Face (or PEFT) model, so HF Trainer and TRL use them unchanged."""

from .patching import PatchReport, patch, unpatch

__all__ = ["PatchReport", "patch", "unpatch"]
