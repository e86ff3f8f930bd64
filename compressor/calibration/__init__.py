"""Calibration data (``--calib SPEC``) and the activation statistics collected from it.

Installed as ``compressor.calibration``.
"""

from compressor.calibration.grams import Gram, GramCollector
from compressor.calibration.sources import CalibrationSet, load_calibration

__all__ = ["CalibrationSet", "Gram", "GramCollector", "load_calibration"]
