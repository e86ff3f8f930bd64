"""UpperPanels: a symmetric matrix as the panels of its upper block triangle, against dense math."""

import pytest
import torch

from compressor.math import symmetric
from compressor.math.factorize import whitened_decomposition
from compressor.math.symmetric import UpperPanels


@pytest.fixture(autouse=True)
def _narrow_blocks(monkeypatch):
    """Blocks as narrow as asked: the tests' matrices are far below MIN_WIDTH."""
    monkeypatch.setattr(symmetric, "MIN_WIDTH", 1)


def test_a_small_matrix_is_one_panel(monkeypatch):
    monkeypatch.setattr(symmetric, "MIN_WIDTH", 1024)
    assert len(UpperPanels(1000, 8, torch.float32).panels) == 1
    wide = UpperPanels(4096, 8, torch.float32)
    assert [p.shape for p in wide.panels] == [(1024, 4096), (1024, 3072), (1024, 2048), (1024, 1024)]


def _panels(dim: int, blocks: int, *batches: torch.Tensor) -> UpperPanels:
    p = UpperPanels(dim, blocks, torch.float64)
    for rows in batches:
        p.add_gram(rows)
    return p


@pytest.mark.parametrize("dim,blocks", [(1, 8), (7, 8), (13, 4), (64, 8), (65, 3), (5, 1)])
def test_full_and_products_equal_the_dense_gram(dim, blocks):
    torch.manual_seed(dim)
    a, b = torch.randn(11, dim, dtype=torch.float64), torch.randn(6, dim, dtype=torch.float64)
    p = _panels(dim, blocks, a, b)
    dense = a.T @ a + b.T @ b
    torch.testing.assert_close(p.full(), dense)
    x = torch.randn(5, dim, dtype=torch.float64)
    torch.testing.assert_close(p.right_multiply(x), x @ dense)
    # only the upper block triangle is stored
    assert p.nbytes <= dense.numel() * dense.element_size()
    if blocks == 8 and dim == 64:
        assert p.nbytes == 9 * dense.numel() * dense.element_size() // 16


def test_spread_makes_views_that_keep_summing():
    torch.manual_seed(0)
    a, b = torch.randn(9, 20, dtype=torch.float64), torch.randn(4, 20, dtype=torch.float64)
    p = _panels(20, 3, a)
    g = p.spread()
    torch.testing.assert_close(g, a.T @ a)
    assert all(panel._base is g for panel in p.panels)  # no second copy of the matrix
    p.add_gram(b)
    again = p.spread()
    assert again is g
    torch.testing.assert_close(again, a.T @ a + b.T @ b)
    torch.testing.assert_close(p.right_multiply(torch.eye(20, dtype=torch.float64)), a.T @ a + b.T @ b)


def test_bfloat16_products_summed_in_float32():
    torch.manual_seed(1)
    rows = torch.randn(300, 40).to(torch.bfloat16)
    p = UpperPanels(40, 8, torch.float32)
    for chunk in rows.split(50):
        p.add_gram(chunk)
    exact = rows.double().T @ rows.double()
    assert float((p.full().double() - exact).abs().max() / exact.abs().max()) < 2**-7


@pytest.mark.parametrize("shape", [(6, 24), (24, 24), (40, 12)])
def test_whitened_decomposition_from_panels_equals_the_dense_gram(shape):
    torch.manual_seed(shape[0])
    w = torch.randn(*shape, dtype=torch.float64)
    x = torch.randn(50, shape[1], dtype=torch.float64)
    scale = torch.rand(shape[0], dtype=torch.float64) + 0.5
    dense = whitened_decomposition(w, gram=x.T @ x, scale=scale)
    packed = whitened_decomposition(w, gram=_panels(shape[1], 4, x), scale=scale)
    torch.testing.assert_close(packed.sv, dense.sv)
    rank = min(shape) // 2
    b, a = packed.factors(w, rank, torch.float64)
    b_ref, a_ref = dense.factors(w, rank, torch.float64)
    torch.testing.assert_close(b @ a, b_ref @ a_ref)


def test_viewing_a_matrix():
    torch.manual_seed(2)
    x = torch.randn(8, 10, dtype=torch.float64)
    g = x.T @ x
    p = UpperPanels.viewing(g, 3)
    assert p.spread() is g
    torch.testing.assert_close(p.right_multiply(x), x @ g)


@pytest.mark.parametrize("shape", [(11, 17), (17, 11), (13, 13)])
def test_row_blocks_of_every_loop_match_dense_math(monkeypatch, shape):
    """The blocked loops (panel updates, the sandwich's upper blocks, M = D·W·S, B and A) with
    blocks of 2-4 rows over ragged sizes: the same factors as dense math, and the whitened error
    of the rank-r truncation equal to the discarded Σσ²."""
    from compressor.math import factorize as math_factorize

    monkeypatch.setattr(symmetric, "PRODUCT_ROWS", 2)
    monkeypatch.setattr(math_factorize, "SANDWICH_ROWS", 3)
    monkeypatch.setattr(math_factorize, "FACTOR_ROWS", 4)
    torch.manual_seed(sum(shape))
    w = torch.randn(*shape, dtype=torch.float64)
    x = torch.randn(40, shape[1], dtype=torch.float64)
    scale = torch.rand(shape[0], dtype=torch.float64) + 0.5
    panels = UpperPanels(shape[1], 3, torch.float64)
    for rows in x.split(7):
        panels.add_gram(rows)
    torch.testing.assert_close(panels.full(), x.T @ x)
    packed = whitened_decomposition(w, gram=panels, scale=scale)
    dense = whitened_decomposition(w, gram=x.T @ x, scale=scale)
    torch.testing.assert_close(packed.sv, dense.sv)
    rank = min(shape) // 2
    b, a = packed.factors(w, rank, torch.float64)
    delta = scale[:, None] * (w - b @ a)
    torch.testing.assert_close(float(torch.trace(delta @ (x.T @ x) @ delta.T)), packed.discarded(rank), rtol=1e-9, atol=1e-9)


def test_non_finite_panels_are_refused():
    from compressor.errors import NumericalError

    panels = _panels(6, 2, torch.randn(5, 6, dtype=torch.float64))
    panels.panels[1][0, 1] = float("nan")
    with pytest.raises(NumericalError, match="Gram"):
        whitened_decomposition(torch.randn(4, 6, dtype=torch.float64), gram=panels)
