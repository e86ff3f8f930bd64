"""Calibration precision: the dtype of the matrix products in calibration passes (``--calib-dtype``).

Its own module, free of the rest of the package, because both the layer loop (pipeline) and the
calibration sources (self-generation) use it, and sources are imported by the loop's own imports.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from compressor.options import check_calib_dtype


def _fast_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # private probes of torch.cpu; absent ones count as no
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_calib_dtype(name: str, model: nn.Module) -> torch.dtype | None:
    """The matmul dtype of calibration forward passes; None: the model's own dtype.

    ``auto`` is bfloat16 autocast for a float32 model on hardware with native bfloat16 matmul
    (4-5x the float32 rate on AVX512-BF16 CPUs), else the model's dtype. Weights and Grams
    stay in float32/float64 either way; only the activations carry bfloat16
    rounding (relative 2⁻⁹), far below the truncation errors being measured; decompositions of
    their Grams then run in float32 (:func:`decomposition_dtype`).
    """
    check_calib_dtype(name)
    from compressor.device import model_device

    param = next(model.parameters())
    if name == "float32" or param.dtype != torch.float32:
        return None
    if name == "bfloat16" or _fast_bfloat16(model_device(model)):
        return torch.bfloat16
    return None


def decomposition_dtype(compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype to decompose Grams in: float32 where the passes (and so the Grams' products) ran in
    a 16-bit dtype, whose rounding float64 could not undo; float64 otherwise."""
    return torch.float32 if compute_dtype in (torch.bfloat16, torch.float16) else torch.float64


def autocast_to(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast context for forward passes of ``model`` in ``dtype`` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    from compressor.device import model_device

    return torch.autocast(model_device(model).type, dtype=dtype)
