"""Training loops: ee_tune (exits on a frozen backbone) and the exit evaluation."""

from .ee_eval import evaluate_exits
from .ee_tune import TuneConfig, ee_tune

__all__ = ["TuneConfig", "ee_tune", "evaluate_exits"]
