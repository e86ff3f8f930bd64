"""Calibration data (``--calib SPEC``) and the activation statistics collected from it.

A subpackage of ``compressor``, never a top-level ``calibration``: nothing of ours may shadow
another distribution's package (tests/test_packaging.py).
"""

from compressor.calibration.grams import Gram, GramCollector
from compressor.calibration.sources import CalibrationSet, load_calibration

__all__ = ["CalibrationSet", "Gram", "GramCollector", "load_calibration"]
