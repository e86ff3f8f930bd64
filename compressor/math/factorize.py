"""W ≈ B·A: plain truncated SVD and activation-whitened factorization.

Whitened: minimize ‖(W − B·A)·Xᵀ‖_F over rank-r products, for calibration inputs X with
Gram G = XᵀX = S·Sᵀ. If W·S = U·Σ·Vᵀ, the optimum is B·A = U_r·U_rᵀ·W (project W's outputs
onto the top-r left singular vectors of W·S), so B = U_r and A = U_rᵀ·W. No inverse of S is
ever formed, which keeps rank-deficient or ill-conditioned Grams harmless; the error equals
Σ_{k>r} σ_k² exactly.

Fisher-weighted (two-sided): minimize ‖D·(W − B·A)·Xᵀ‖_F with D = diag(d) a positive weight per
output unit (d_j² the mean squared loss gradient of output j, so the error reads as a predicted
loss increase). With D·W·S = U·Σ·Vᵀ the optimum is B·A = D⁻¹·U_r·U_rᵀ·D·W, so B = D⁻¹·U_r and
A = (D·U_r)ᵀ·W; again no inverse of S, and the error is Σ_{k>r} σ_k². D = I is the whitened case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import NumericalError
from compressor.math.spectra import _check_finite, all_finite, gram_root
from compressor.math.symmetric import UpperPanels


FACTOR_ROWS = 1024  # output rows of a weight turned into factors at a time


@dataclass
class Decomposition:
    """The left singular vectors and values of W (plain) or of W·S (whitened): values in float64,
    vectors in the dtype the decomposition ran in (float64 unless told otherwise)."""

    u: torch.Tensor  # (out, k)
    sv: torch.Tensor  # (k,), descending
    whitened: bool
    vh: torch.Tensor | None = None  # (k, in), plain SVD only
    scale: torch.Tensor | None = None  # (out,) output weights d of the Fisher-weighted metric

    @property
    def energies(self) -> torch.Tensor:
        return self.sv**2

    def truncated(self, keep: int, dtype: torch.dtype = torch.float64) -> "Decomposition":
        """Only what ranks up to ``keep`` need (the energies stay whole), to save memory.

        Singular vectors kept in float32 halve the memory; B·A then deviates from the float64
        optimum by ~1e-7 relative, far below any truncation error.
        """
        vh = None if self.vh is None else self.vh[:keep].to(dtype, copy=True)
        return Decomposition(self.u[:, :keep].to(dtype, copy=True), self.sv, self.whitened, vh, self.scale)

    def held_by(self, spill: "Spill") -> "Decomposition":  # noqa: F821
        """The same decomposition, its singular vectors moved to files of ``spill``
        (:class:`compressor.residency.Spill`)."""
        vh = None if self.vh is None else spill.hold(self.vh)
        return Decomposition(spill.hold(self.u), self.sv, self.whitened, vh, self.scale)

    def factors(self, weight: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [out, r], A [r, in]) with B·A the best rank-r approximation of ``weight`` in this metric."""
        if not 0 <= rank <= self.u.shape[1]:
            raise ValueError(f"rank {rank} outside [0, {self.u.shape[1]}]")
        if self.whitened:
            # B = D⁻¹·U_r and A = (D·U_r)ᵀ·W in float64, FACTOR_ROWS output rows at a time: no float64
            # copy of U_r or W whole (107 + 134 MB for an 8192 × 2048 gate_proj at rank 1638)
            out = self.u.shape[0]
            b = torch.empty(out, rank, dtype=dtype)
            a = torch.zeros(rank, weight.shape[1], dtype=torch.float64)
            for i in range(0, out, FACTOR_ROWS):
                rows = slice(i, i + FACTOR_ROWS)
                u = self.u[rows, :rank].to(torch.float64)
                scale = None if self.scale is None else self.scale[rows, None]
                b[rows] = u if scale is None else u / scale
                a += (u if scale is None else u * scale).T @ weight.detach()[rows].to("cpu", torch.float64)
        else:
            # The singular values split evenly between the two factors.
            root = self.sv[:rank].sqrt()
            b = self.u[:, :rank].to(torch.float64) * root
            a = root[:, None] * self.vh[:rank].to(torch.float64)
        b, a = b.to(dtype).contiguous(), a.to(dtype).contiguous()
        if not (all_finite(a) and all_finite(b)):
            raise NumericalError("factorization produced NaN or Inf")
        return b, a

    def discarded(self, rank: int) -> float:
        return float(self.energies[rank:].sum())


def svd_decomposition(weight: torch.Tensor) -> Decomposition:
    w = _check_finite(weight.detach().to("cpu", torch.float64), "weight")
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    return Decomposition(u, sv, whitened=False, vh=vh)


def whitened_decomposition(
    weight: torch.Tensor,
    gram: torch.Tensor | UpperPanels | None = None,
    root: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    values_only: bool = False,
    keep: int | None = None,
    dtype: torch.dtype = torch.float64,
    output_gram: torch.Tensor | None = None,
) -> Decomposition:
    """Decompose M = W·S, or D·W·S with ``scale`` = diag(D) > 0; pass the Gram G = XᵀX, an already
    computed root S (shared by q/k/v), or both; or, for out ≤ in, ``output_gram`` = W·G·Wᵀ (the Gram
    of the outputs X·Wᵀ), which is M·Mᵀ itself for D = I. ``values_only``: the spectrum without singular vectors;
    ``keep``: only the leading singular vectors up to that rank (the spectrum stays whole).

    Computed from the eigendecomposition of the smaller of M·Mᵀ and MᵀM, 3-6x faster than an SVD of
    M. For out ≤ in that is M·Mᵀ = D·W·G·Wᵀ·D, which needs no root at all; its eigenvectors are U
    and its eigenvalues σ², accurate to ~1e-16·σ₁², far below any truncation error. For out > in,
    MᵀM = V·Σ²·Vᵀ and U is the orthonormal factor of M·V (QR: robust where σ vanishes).

    ``dtype``: of the computation. float64 keeps the spectrum exact to the Gram's last digit;
    float32 takes half the time and is ample for Grams summed from bfloat16 products, whose
    entries carry 2⁻⁹ relative rounding (eigenvalues then err by ~1e-7·σ₁², the products by far
    more). The singular values come back in float64 either way.
    """
    if root is None and gram is None and output_gram is None:
        raise ValueError("whitened_decomposition needs a gram, its root or the output Gram")
    out, inp = weight.shape
    if scale is not None:
        scale = _check_finite(scale.to("cpu", torch.float64), "output scale")
        if scale.shape != (out,) or not bool((scale > 0).all()):
            raise ValueError(f"output scale must be {out} positive values")
    if output_gram is not None:
        if out > inp or output_gram.shape != (out, out):
            raise ValueError(f"an output Gram serves a matrix with out ≤ in, of shape ({out}, {out}); got {tuple(output_gram.shape)}")
        _check_finite(weight.detach(), "weight")
        left = _check_finite(output_gram.to("cpu", dtype), "output Gram")
        if scale is not None:
            d = scale.to(dtype)
            left = d[:, None] * left * d[None, :]
        return _from_left_gram(left, scale, values_only, keep)
    if out <= inp and gram is not None:
        if isinstance(gram, UpperPanels):
            if not all(all_finite(panel) for panel in gram.panels):
                raise NumericalError("Gram matrix contains NaN or Inf")
            g = gram
        else:
            g = _check_finite(gram.to("cpu", dtype), "Gram matrix")
        return _from_left_gram(_sandwich(weight, scale, g, dtype), scale, values_only, keep)
    if root is None:
        root = gram_root(gram.full() if isinstance(gram, UpperPanels) else gram, dtype)
    root = root.to("cpu", dtype)
    # M = D·W·S, a block of rows at a time: no whole copy of W in ``dtype`` beside it
    m = torch.empty(out, root.shape[1], dtype=dtype)
    for i in range(0, out, SANDWICH_ROWS):
        m[i : i + SANDWICH_ROWS] = _scaled_rows(weight, scale, i, dtype) @ root
    if out <= inp:
        return _from_left_gram(m @ m.T, scale, values_only, keep)
    right = _symmetric(m.T @ m)
    if values_only:
        return Decomposition(_empty(out, dtype), _descending_root(torch.linalg.eigvalsh(right)), True, scale=scale)
    eigvals, v = torch.linalg.eigh(right)
    del right
    leading = m @ v.flip(1)[:, :keep]
    del m, v
    # U: the orthonormal factor of M·V's leading columns (their QR is the full QR's leading part),
    # as geqrf then Q: the input let go before Q is made
    reflectors, tau = torch.geqrf(leading)
    del leading
    u = torch.linalg.householder_product(reflectors, tau)
    return Decomposition(u, _descending_root(eigvals), whitened=True, scale=scale)


def _scaled_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """D·W in ``dtype`` on the CPU, checked finite; never the caller's tensor modified."""
    w = _check_finite(weight.detach().to("cpu", dtype), "weight")
    if scale is None:
        return w
    if w.data_ptr() == weight.data_ptr():
        return scale[:, None].to(dtype) * w  # w is the caller's weight itself: a new tensor
    return w.mul_(scale[:, None].to(dtype))  # w is already a copy (cast or moved): scaled in place


def _scaled_rows(weight: torch.Tensor, scale: torch.Tensor | None, first: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``first`` to ``first`` + SANDWICH_ROWS of D·W, in ``dtype`` (:func:`_scaled_weight`)."""
    part = slice(first, first + SANDWICH_ROWS)
    return _scaled_weight(weight[part], None if scale is None else scale[part], dtype)


SANDWICH_ROWS = 512  # rows of W·G made at a time


def _sandwich(weight: torch.Tensor, scale: torch.Tensor | None, g: torch.Tensor | UpperPanels, dtype: torch.dtype) -> torch.Tensor:
    """D·W·G·Wᵀ·D in ``dtype``, by blocks of SANDWICH_ROWS rows of D·W, each cast and scaled when
    used: never D·W whole in ``dtype``, nor the whole (out, in) product D·W·G (67 MB each for a
    2048 × 8192 down_proj in float32), and only the upper blocks of the symmetric result
    multiplied. G: the full matrix or its panels (:class:`UpperPanels`), whose full matrix is then
    never made."""
    out = weight.shape[0]
    starts = range(0, out, SANDWICH_ROWS)
    left = torch.empty(out, out, dtype=dtype)
    for i in starts:
        mine = _scaled_rows(weight, scale, i, dtype)
        product = (g.right_multiply(mine, dtype) if isinstance(g, UpperPanels) else mine @ g).to(dtype)
        del mine
        for j in starts[starts.index(i) :]:
            block = product @ _scaled_rows(weight, scale, j, dtype).T
            left[i : i + SANDWICH_ROWS, j : j + SANDWICH_ROWS] = block
            left[j : j + SANDWICH_ROWS, i : i + SANDWICH_ROWS] = block.T
    return left


def _symmetric(k: torch.Tensor) -> torch.Tensor:
    return (k + k.T) / 2


def _empty(rows: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(rows, 0, dtype=dtype)


def _descending_root(eigvals: torch.Tensor) -> torch.Tensor:
    """Singular values from ascending eigenvalues of M·Mᵀ or MᵀM (rounding negatives to 0)."""
    return eigvals.flip(0).to(torch.float64).clamp_min(0).sqrt()


def _from_left_gram(left: torch.Tensor, scale: torch.Tensor | None, values_only: bool, keep: int | None) -> Decomposition:
    left = _symmetric(left)
    if values_only:
        return Decomposition(_empty(left.shape[0], left.dtype), _descending_root(torch.linalg.eigvalsh(left)), True, scale=scale)
    eigvals, u = torch.linalg.eigh(left)
    if keep is not None:
        u = u[:, u.shape[1] - keep :]  # the leading ones, ascending; flip copies just these
    return Decomposition(u.flip(1), _descending_root(eigvals), whitened=True, scale=scale)


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return svd_decomposition(weight).factors(weight, rank, weight.dtype)


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return whitened_decomposition(weight, gram).factors(weight, rank, weight.dtype)
