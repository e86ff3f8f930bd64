"""Low-rank products and the choice of how to run them.

* :func:`lowrank_linear`: y = (x·Aᵀ)·Bᵀ + bias, a factored layer's forward (A: r × in, B: out × r).
* :func:`corrected_linear`: y = x·Wᵀ + (x·Aᵀ)·Bᵀ + bias, a dense layer with a low-rank correction.

Each runs as Triton kernels (:mod:`compressor.kernels.triton_lowrank`) or as PyTorch matmuls, in
the cheaper order (x·Aᵀ first: M·r·(in + out) multiplications, never the product B·A). The
choice: ``COMPRESS_KERNELS`` (or :func:`use_kernels`) = ``auto`` (Triton for CUDA tensors of at
most TRITON_MAX_TOKENS tokens when Triton is installed and no gradient is needed, else PyTorch),
``triton`` (always, an error where it cannot run) or ``torch``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from compressor.errors import UsageError

BACKENDS = ("auto", "triton", "torch")
ENV = "COMPRESS_KERNELS"
# Above this many tokens a call is bound by arithmetic, not by reading the weights, and cuBLAS's
# tensor-core GEMMs are the better path.
TRITON_MAX_TOKENS = 64

_override: list[str] = []


def backend() -> str:
    """The configured choice: :func:`use_kernels`'s innermost, else ``COMPRESS_KERNELS``, else auto."""
    choice = _override[-1] if _override else os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise UsageError(f"{ENV}={choice!r}: expected one of {', '.join(BACKENDS)}")
    return choice


@contextlib.contextmanager
def use_kernels(choice: str) -> Iterator[None]:
    """Run the low-rank products in the block with ``choice`` (auto, triton or torch)."""
    if choice not in BACKENDS:
        raise UsageError(f"kernels {choice!r}: expected one of {', '.join(BACKENDS)}")
    _override.append(choice)
    try:
        yield
    finally:
        _override.pop()


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports and can run here (a CUDA device, or its CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or _interpreting()


def _interpreting() -> bool:
    """Whether Triton runs its kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def path_for(x: torch.Tensor, *weights: torch.Tensor | None) -> str:
    """``triton`` or ``torch``: how a call with input ``x`` runs under the configured choice."""
    choice = backend()
    if choice == "torch":
        return "torch"
    runnable = triton_available() and (x.is_cuda or _interpreting())
    if choice == "triton":
        if not runnable:
            raise UsageError(f"{ENV}=triton, but Triton cannot run on {x.device.type} here (install triton; "
                             "on a CPU set TRITON_INTERPRET=1 before the first kernel is defined)")
        if _needs_grad(x, *weights):
            raise UsageError(f"{ENV}=triton: the Triton kernels compute no gradients")
        if not _same_dtype(x, *weights):
            raise UsageError(f"{ENV}=triton: the input and the weights must share a dtype (autocast is PyTorch's)")
        return "triton"
    tokens = x.numel() // max(x.shape[-1], 1)
    if x.is_cuda and runnable and tokens <= TRITON_MAX_TOKENS and not _needs_grad(x, *weights) and _same_dtype(x, *weights):
        return "triton"
    return "torch"


def _same_dtype(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    return not torch.is_autocast_enabled(x.device.type) and all(w is None or w.dtype == x.dtype for w in weights)


def lowrank_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x·Aᵀ)·Bᵀ + bias."""
    if path_for(x, a, b, bias) == "triton":
        from compressor.kernels import triton_lowrank

        return triton_lowrank.factored(x, a, b, bias)
    return F.linear(F.linear(x, a), b, bias)


def corrected_linear(
    x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x·Wᵀ + (x·Aᵀ)·Bᵀ + bias: W read once and the correction added in the same pass where
    the Triton path runs; two products and a sum otherwise."""
    if path_for(x, weight, a, b, bias) == "triton":
        from compressor.kernels import triton_lowrank

        return triton_lowrank.corrected(x, weight, a, b, bias)
    return F.linear(x, weight, bias).add_(F.linear(F.linear(x, a), b))
