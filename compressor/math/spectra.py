"""Singular-value spectra, plain and activation-whitened, and the ranks read off them."""

from __future__ import annotations

import math

import torch

from compressor.errors import NumericalError


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite. Its sum is finite exactly then, unless finite
    elements overflow it, which the elementwise test settles: in the common case one reduction,
    where ``isfinite(t).all()`` writes a boolean tensor of t's size and reduces that."""
    if t.numel() == 0:
        return True
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if not all_finite(t):
        raise NumericalError(f"{what} contains NaN or Inf")
    return t


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of an (out, in) weight, descending, float64."""
    w = _check_finite(weight.detach().to("cpu", torch.float64), "weight")
    return torch.linalg.svdvals(w)


def gram_root(gram: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """S with S·Sᵀ = XᵀX.

    The Cholesky factor when XᵀX is numerically positive definite (fast); otherwise, for
    rank-deficient or slightly indefinite Grams (eigenvalue ratios of 1e-8 occur in real
    models), Q·Λ^½ from an eigendecomposition with negative eigenvalues floored at 0, which
    always exists. Any S with S·Sᵀ = XᵀX gives the same whitened spectrum and subspaces.
    ``dtype``: of the computation and the result.
    """
    g = _check_finite(gram.to(dtype), "Gram matrix")
    g = (g + g.T) / 2
    factor, info = torch.linalg.cholesky_ex(g)
    if info.item() == 0 and all_finite(factor):
        return factor
    eigvals, eigvecs = torch.linalg.eigh(g)
    return eigvecs * eigvals.clamp_min(0).sqrt()


def energy_rank(sv: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k singular values hold ``fraction`` of Σσ²."""
    energy = sv.to(torch.float64) ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=torch.float64) - 1e-12).item()) + 1


def stable_rank(sv: torch.Tensor) -> float:
    """‖W‖_F² / ‖W‖_2²."""
    if sv.numel() == 0 or sv[0] <= 0:
        return 0.0
    return float((sv**2).sum() / sv[0] ** 2)


def welore_rank(sv: torch.Tensor, threshold: float) -> int:
    """WeLore's rank: how many singular values, normalized by the largest, reach ``threshold``."""
    if sv.numel() == 0 or sv[0] <= 0:
        return 0
    return int((sv / sv[0] >= threshold).sum().item())
