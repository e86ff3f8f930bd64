"""A symmetric matrix kept as the row panels of its upper block triangle.

A Gram XᵀX of an n-wide input is symmetric: with k column blocks, the panels (block row i from
its diagonal block to the right) hold (k + 1) / 2k of it: 9/16 for k = 8, 151 MB rather than
268 MB for the float32 Gram of an 8192-wide down_proj input. Sums of products go straight into
the panels (the lower blocks are never computed), W·G·Wᵀ and X·G are made from them, and the full
matrix is built only when asked for.
"""

from __future__ import annotations

import math

import torch

PRODUCT_ROWS = 512  # rows of a panel's update made at a time: bounds the product's temporary
MIN_WIDTH = 1024  # columns of a block at least: narrower panels make many small, slow products


def _width(dim: int, blocks: int) -> int:
    return max(1, math.ceil(dim / blocks), min(dim, MIN_WIDTH))


class UpperPanels:
    """G (n × n, symmetric) as panels P_i = G[rows of block i, first column of block i:]; ``blocks``
    column blocks, none narrower than MIN_WIDTH (a Gram of 1024 columns or fewer is one panel,
    the whole matrix: its memory does not matter, the speed of its products does)."""

    def __init__(self, dim: int, blocks: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.dim = dim
        self.width = _width(dim, blocks)
        self.starts = list(range(0, dim, self.width))
        with torch.inference_mode(False):  # normal tensors, updated in place from inference passes
            self.panels = [torch.zeros(min(self.width, dim - a), dim - a, dtype=dtype, device=device) for a in self.starts]

    @classmethod
    def viewing(cls, matrix: torch.Tensor, blocks: int) -> "UpperPanels":
        """Panels that are views of the (symmetric) ``matrix``: :meth:`spread` returns it (unless
        ``matrix`` is itself a view, whose panels' base is then the tensor it views)."""
        panels = cls.__new__(cls)
        panels.dim = matrix.shape[0]
        panels.width = _width(panels.dim, blocks)
        panels.starts = list(range(0, panels.dim, panels.width))
        panels.panels = [matrix[a : a + panels.width, a:] for a in panels.starts]
        return panels

    @property
    def dtype(self) -> torch.dtype:
        return self.panels[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.panels)

    def add_gram(self, rows: torch.Tensor) -> None:
        """G += rowsᵀ·rows (rows: tokens × n), the products in the rows' dtype, summed in G's."""
        left = rows.T  # transposed in the product itself: a contiguous copy was measured slower
        for a, panel in zip(self.starts, self.panels):
            right = rows[:, a:]
            for r in range(0, panel.shape[0], PRODUCT_ROWS):
                panel[r : r + PRODUCT_ROWS] += left[a + r : a + min(r + PRODUCT_ROWS, panel.shape[0])] @ right

    def full(self) -> torch.Tensor:
        """The whole symmetric matrix, a new tensor."""
        g = torch.empty(self.dim, self.dim, dtype=self.dtype, device=self.panels[0].device)
        for a, panel in zip(self.starts, self.panels):
            g[a : a + panel.shape[0], a:] = panel
            g[a + panel.shape[0] :, a : a + panel.shape[0]] = panel[:, panel.shape[0] :].T
        return g

    def spread(self) -> torch.Tensor:
        """The whole symmetric matrix, which the panels become views of: built once, a panel at a
        time (each compact panel freed as it is copied), and brought up to date in place when
        asked again after more sums. Never modify it."""
        base = self.panels[0]._base
        g = base if base is not None and base.shape == (self.dim, self.dim) else None
        if g is None:
            with torch.inference_mode(False):
                g = torch.empty(self.dim, self.dim, dtype=self.dtype, device=self.panels[0].device)
        for i, (a, panel) in enumerate(zip(self.starts, self.panels)):
            w = panel.shape[0]
            if panel._base is not g:
                g[a : a + w, a:] = panel
                self.panels[i] = g[a : a + w, a:]
            g[a + w :, a : a + w] = self.panels[i][:, w:].T
        return g

    def right_multiply(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x·G for x of shape (r, n), in ``dtype`` (default G's), without the full matrix (a panel
        at a time in ``dtype`` where it differs from G's)."""
        dtype = dtype or self.dtype
        x = x.to(dtype)
        out = torch.zeros(x.shape[0], self.dim, dtype=dtype, device=x.device)
        for a, panel in zip(self.starts, self.panels):
            panel = panel.to(dtype)
            w = panel.shape[0]
            out[:, a:] += x[:, a : a + w] @ panel  # the upper blocks of block row i
            if a + w < self.dim:  # the lower blocks of block column i: G[later rows, block i] = P_iᵀ
                out[:, a : a + w] += x[:, a + w :] @ panel[:, w:].T
        return out
