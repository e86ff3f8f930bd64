"""Low-rank compute, installed as ``compressor.kernels``.

The PyTorch path runs everywhere; Triton kernels for CUDA come later behind the same calls.
"""

from compressor.kernels.lowrank import lowrank_linear

__all__ = ["lowrank_linear"]
