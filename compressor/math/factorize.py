"""W ≈ B·A: plain truncated SVD and activation-whitened factorization.

Whitened: minimize ‖(W − B·A)·Xᵀ‖_F over rank-r products, for calibration inputs X with
Gram G = XᵀX = S·Sᵀ. If W·S = U·Σ·Vᵀ, the optimum is B·A = U_r·U_rᵀ·W (project W's outputs
onto the top-r left singular vectors of W·S), so B = U_r and A = U_rᵀ·W. No inverse of S is
ever formed, which keeps rank-deficient or ill-conditioned Grams harmless; the error equals
Σ_{k>r} σ_k² exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import NumericalError
from compressor.math.spectra import _check_finite, gram_root


@dataclass
class Decomposition:
    """The left singular vectors and values of W (plain) or of W·S (whitened), float64."""

    u: torch.Tensor  # (out, k)
    sv: torch.Tensor  # (k,), descending
    whitened: bool
    vh: torch.Tensor | None = None  # (k, in), plain SVD only

    @property
    def energies(self) -> torch.Tensor:
        return self.sv**2

    def truncated(self, keep: int, dtype: torch.dtype = torch.float64) -> "Decomposition":
        """Only what ranks up to ``keep`` need (the energies stay whole), to save memory.

        Singular vectors kept in float32 halve the memory; B·A then deviates from the float64
        optimum by ~1e-7 relative, far below any truncation error.
        """
        vh = None if self.vh is None else self.vh[:keep].to(dtype, copy=True)
        return Decomposition(self.u[:, :keep].to(dtype, copy=True), self.sv, self.whitened, vh)

    def factors(self, weight: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [out, r], A [r, in]) with B·A the best rank-r approximation of ``weight`` in this metric."""
        if not 0 <= rank <= self.u.shape[1]:
            raise ValueError(f"rank {rank} outside [0, {self.u.shape[1]}]")
        if self.whitened:
            b = self.u[:, :rank].to(torch.float64)
            a = b.T @ weight.detach().to("cpu", torch.float64)
        else:
            # The singular values split evenly between the two factors.
            root = self.sv[:rank].sqrt()
            b = self.u[:, :rank].to(torch.float64) * root
            a = root[:, None] * self.vh[:rank].to(torch.float64)
        b, a = b.to(dtype).contiguous(), a.to(dtype).contiguous()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise NumericalError("factorization produced NaN or Inf")
        return b, a

    def discarded(self, rank: int) -> float:
        return float(self.energies[rank:].sum())


def svd_decomposition(weight: torch.Tensor) -> Decomposition:
    w = _check_finite(weight.detach().to("cpu", torch.float64), "weight")
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    return Decomposition(u, sv, whitened=False, vh=vh)


def whitened_decomposition(weight: torch.Tensor, gram: torch.Tensor | None = None, root: torch.Tensor | None = None) -> Decomposition:
    """Decompose W·S; pass the Gram XᵀX or an already computed root S (shared by q/k/v)."""
    if root is None:
        if gram is None:
            raise ValueError("whitened_decomposition needs a gram or its root")
        root = gram_root(gram)
    w = _check_finite(weight.detach().to("cpu", torch.float64), "weight")
    u, sv, _ = torch.linalg.svd(w @ root, full_matrices=False)
    return Decomposition(u, sv, whitened=True)


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return svd_decomposition(weight).factors(weight, rank, weight.dtype)


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return whitened_decomposition(weight, gram).factors(weight, rank, weight.dtype)
