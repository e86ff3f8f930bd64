"""Low-rank compute.

A subpackage of ``compressor``, never a top-level ``kernels``: Hugging Face's kernel-hub package
has that name, and transformers imports it (tests/test_packaging.py). The PyTorch path runs everywhere; Triton kernels for CUDA come later behind the same calls.
"""

from compressor.kernels.lowrank import lowrank_linear

__all__ = ["lowrank_linear"]
