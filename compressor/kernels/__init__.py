"""Low-rank compute: a factored layer's product and a dense layer's low-rank correction.

A subpackage of ``compressor``, never a top-level ``kernels``: Hugging Face's kernel-hub package
has that name, and transformers imports it (tests/test_packaging.py). PyTorch matmuls run
everywhere; Triton kernels (:mod:`compressor.kernels.triton_lowrank`) run on CUDA when Triton is
installed, chosen per call by :func:`path_for` (``COMPRESS_KERNELS``: auto, triton, torch).
"""

from compressor.kernels.lowrank import BACKENDS, corrected_linear, lowrank_linear, path_for, use_kernels

__all__ = ["BACKENDS", "corrected_linear", "lowrank_linear", "path_for", "use_kernels"]
