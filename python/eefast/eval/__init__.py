"""How good and how fast the exits are: per-exit quality (exits.py), answer accuracy
(answers.py), agreement with the full model and threshold calibration (agreement.py), and the
generation benchmark against HF generate (bench_generate.py)."""

from .agreement import CALIBRATION_THRESHOLDS, agreement, calibrate
from .answers import answer_accuracy
from .exits import evaluate_exits, format_table, plot_exits

__all__ = [
    "CALIBRATION_THRESHOLDS",
    "agreement",
    "answer_accuracy",
    "calibrate",
    "evaluate_exits",
    "format_table",
    "plot_exits",
]
