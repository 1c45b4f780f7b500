"""Training: EE-Tuning of exits on a frozen backbone (ee_tune.py), adapter fine-tuning
(finetune.py), the exit classifier (exit_classifier.py), and the loop, checkpoints and hidden
cache they share (loop.py, checkpoint.py, hidden_cache.py)."""

from .ee_tune import TARGETS, TuneConfig, ee_tune
from .finetune import FinetuneConfig, causal_lm_loss, finetune
from .loop import LoopSettings, TrainLoop

__all__ = [
    "FinetuneConfig",
    "LoopSettings",
    "TARGETS",
    "TrainLoop",
    "TuneConfig",
    "causal_lm_loss",
    "ee_tune",
    "finetune",
]
