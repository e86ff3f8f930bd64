"""The factorization math against dense references."""

import pytest
import torch

from compressor.errors import NumericalError
from compressor.math.factorize import svd_decomposition, truncated_svd, whitened_decomposition, whitened_svd


def _random_problem(out_features=24, in_features=32, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    # Correlated inputs with a wide range of scales, as real activations have.
    mix = torch.randn(in_features, in_features, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -3, in_features, dtype=torch.float64)
    x = torch.randn(tokens, in_features, generator=g, dtype=torch.float64) @ (mix * scales)
    return w, x


@pytest.mark.parametrize("rank", [1, 5, 12, 24])
def test_whitened_error_equals_discarded_whitened_energy(rank):
    w, x = _random_problem()
    d = whitened_decomposition(w, gram=x.T @ x)
    b, a = d.factors(w, rank, torch.float64)
    measured = torch.linalg.matrix_norm((w - b @ a) @ x.T) ** 2
    assert measured.item() == pytest.approx(d.discarded(rank), rel=1e-9, abs=1e-9)
    assert b.shape == (24, rank) and a.shape == (rank, 32)


def test_whitened_beats_plain_on_the_calibration_metric():
    w, x = _random_problem()
    gram = x.T @ x
    for rank in (2, 6, 10):
        bw, aw = whitened_svd(w, gram, rank)
        bp, ap = truncated_svd(w, rank)
        err_w = torch.linalg.matrix_norm((w - bw @ aw) @ x.T)
        err_p = torch.linalg.matrix_norm((w - bp @ ap) @ x.T)
        assert err_w < err_p


def test_whitened_is_optimal_against_random_rank_r_candidates():
    w, x = _random_problem(seed=3)
    rank = 4
    b, a = whitened_svd(w, x.T @ x, rank)
    best = torch.linalg.matrix_norm((w - b @ a) @ x.T)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        # Perturbing the optimum in any direction can only make the weighted error worse.
        db = 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64)
        da = 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64)
        assert torch.linalg.matrix_norm((w - (b + db) @ (a + da)) @ x.T) >= best


def test_plain_svd_error_is_eckart_young():
    w, _ = _random_problem()
    d = svd_decomposition(w)
    for rank in (0, 3, 10):
        b, a = d.factors(w, rank, torch.float64)
        err = torch.linalg.matrix_norm(w - b @ a) ** 2
        assert err.item() == pytest.approx(float((d.sv[rank:] ** 2).sum()), rel=1e-9, abs=1e-9)


def test_rank_deficient_and_indefinite_gram_never_nan():
    w, x = _random_problem(tokens=5)  # 5 tokens: Gram of rank 5 out of 32
    gram = x.T @ x
    gram[0, 0] -= 1e-9  # slightly indefinite, as float round-off makes real Grams
    d = whitened_decomposition(w, gram=gram)
    b, a = d.factors(w, 10, torch.float64)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # Only 5 directions carry input energy: rank 5 reproduces the calibration outputs.
    b5, a5 = d.factors(w, 5, torch.float64)
    assert torch.linalg.matrix_norm((w - b5 @ a5) @ x.T).item() < 1e-8 * torch.linalg.matrix_norm(w @ x.T).item()


def test_ill_conditioned_gram_error_still_matches_theory():
    w, _ = _random_problem()
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    eig = torch.logspace(0, -8, 32, dtype=torch.float64)  # eigenvalue ratio 1e-8, as seen on SmolLM2
    gram = (q * eig) @ q.T
    d = whitened_decomposition(w, gram=gram)
    b, a = d.factors(w, 8, torch.float64)
    delta = w - b @ a
    measured = torch.trace(delta @ gram @ delta.T)
    assert measured.item() == pytest.approx(d.discarded(8), rel=1e-6)


def test_non_finite_weight_raises_numerical_error():
    w, x = _random_problem()
    w[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        whitened_decomposition(w, gram=x.T @ x)
    with pytest.raises(NumericalError):
        svd_decomposition(w)


def test_truncated_decomposition_keeps_factors_and_energies():
    w, x = _random_problem()
    d = whitened_decomposition(w, gram=x.T @ x)
    small = d.truncated(8)
    assert small.u.shape[1] == 8 and torch.equal(small.sv, d.sv)
    b1, a1 = d.factors(w, 6, torch.float64)
    b2, a2 = small.factors(w, 6, torch.float64)
    assert torch.allclose(b1 @ a1, b2 @ a2)
    with pytest.raises(ValueError):
        small.factors(w, 9)


def _output_scale(out_features=24, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.logspace(1, -2, out_features, dtype=torch.float64)[torch.randperm(out_features, generator=g)]


@pytest.mark.parametrize("rank", [1, 5, 12, 24])
def test_fisher_weighted_error_equals_discarded_energy(rank):
    w, x = _random_problem()
    scale = _output_scale()
    d = whitened_decomposition(w, gram=x.T @ x, scale=scale)
    b, a = d.factors(w, rank, torch.float64)
    measured = torch.linalg.matrix_norm(scale[:, None] * (w - b @ a) @ x.T) ** 2
    assert measured.item() == pytest.approx(d.discarded(rank), rel=1e-9, abs=1e-9)


def test_fisher_weighted_is_optimal_in_its_metric_and_beats_unweighted_there():
    w, x = _random_problem(seed=4)
    scale = _output_scale(seed=6)
    rank = 5

    def err(b, a):
        return torch.linalg.matrix_norm(scale[:, None] * (w - b @ a) @ x.T)

    b, a = whitened_decomposition(w, gram=x.T @ x, scale=scale).factors(w, rank, torch.float64)
    best = err(b, a)
    assert best < err(*whitened_svd(w, x.T @ x, rank))
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        db = 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64)
        da = 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64)
        assert err(b + db, a + da) >= best


def test_unit_scale_is_the_whitened_factorization_and_values_only_its_spectrum():
    w, x = _random_problem(seed=7)
    plain = whitened_decomposition(w, gram=x.T @ x)
    ones = whitened_decomposition(w, gram=x.T @ x, scale=torch.ones(24, dtype=torch.float64))
    torch.testing.assert_close(ones.sv, plain.sv)
    b1, a1 = ones.factors(w, 6, torch.float64)
    b0, a0 = plain.factors(w, 6, torch.float64)
    torch.testing.assert_close(b1 @ a1, b0 @ a0)
    values = whitened_decomposition(w, gram=x.T @ x, scale=_output_scale(), values_only=True)
    full = whitened_decomposition(w, gram=x.T @ x, scale=_output_scale())
    torch.testing.assert_close(values.sv, full.sv)


@pytest.mark.parametrize("bad", [torch.zeros(24), torch.ones(23), torch.full((24,), float("nan"))])
def test_bad_output_scale_is_refused(bad):
    w, x = _random_problem()
    with pytest.raises((ValueError, NumericalError)):
        whitened_decomposition(w, gram=x.T @ x, scale=bad.double())


@pytest.mark.parametrize("out_features", [24, 32, 40])  # fewer, as many, more outputs than inputs
@pytest.mark.parametrize("given", ["gram", "root", "both"])
@pytest.mark.parametrize("tokens", [200, 12])  # 12 tokens: a rank-deficient Gram
def test_eigen_route_matches_the_svd_of_the_whitened_weight(out_features, given, tokens):
    from compressor.math.spectra import gram_root

    w, x = _random_problem(out_features=out_features, tokens=tokens)
    scale = torch.linspace(0.5, 2.0, out_features, dtype=torch.float64)
    gram = x.T @ x
    root = gram_root(gram)
    kwargs = {"gram": gram if given != "root" else None, "root": root if given != "gram" else None, "scale": scale}
    u_ref, sv_ref, _ = torch.linalg.svd(scale[:, None] * w @ root, full_matrices=False)
    d = whitened_decomposition(w, **kwargs)
    values = whitened_decomposition(w, values_only=True, **kwargs)
    top = float(sv_ref[0])
    torch.testing.assert_close(d.sv, sv_ref, rtol=0, atol=1e-6 * top)
    torch.testing.assert_close(values.sv, sv_ref, rtol=0, atol=1e-6 * top)
    assert d.u.shape == u_ref.shape
    torch.testing.assert_close(d.u.T @ d.u, torch.eye(d.u.shape[1], dtype=torch.float64), rtol=0, atol=1e-9)
    for rank in (1, 5, min(10, tokens - 2)):
        projector = d.u[:, :rank] @ d.u[:, :rank].T
        torch.testing.assert_close(projector, u_ref[:, :rank] @ u_ref[:, :rank].T, rtol=0, atol=1e-6)
        b, a = d.factors(w, rank, torch.float64)
        measured = torch.linalg.matrix_norm(scale[:, None] * (w - b @ a) @ x.T) ** 2
        assert measured.item() == pytest.approx(float((sv_ref[rank:] ** 2).sum()), rel=1e-6, abs=1e-9 * top**2)


@pytest.mark.parametrize("out_features", [24, 48])  # eigen route of W·G·Wᵀ, and of MᵀM + QR
def test_keep_gives_the_leading_singular_vectors_and_the_whole_spectrum(out_features):
    w, x = _random_problem(out_features=out_features)
    gram = x.T @ x
    full = whitened_decomposition(w, gram=gram)
    kept = whitened_decomposition(w, gram=gram, keep=7)
    assert kept.u.shape == (out_features, 7)
    assert torch.equal(kept.sv, full.sv)
    projector = kept.u @ kept.u.T
    torch.testing.assert_close(projector, full.u[:, :7] @ full.u[:, :7].T, rtol=0, atol=1e-9)
    b, a = kept.factors(w, 7, torch.float64)
    b_full, a_full = full.factors(w, 7, torch.float64)
    torch.testing.assert_close(b @ a, b_full @ a_full, rtol=0, atol=1e-9)
    with pytest.raises(ValueError):
        kept.factors(w, 8)


@pytest.mark.parametrize("out_features", [24, 48])  # both eigen routes
def test_float32_decomposition_is_near_the_float64_optimum(out_features):
    from compressor.precision import decomposition_dtype

    assert decomposition_dtype(torch.bfloat16) == torch.float32
    assert decomposition_dtype(None) == decomposition_dtype(torch.float32) == torch.float64
    w, x = _random_problem(out_features=out_features)
    gram = x.T @ x
    scale = torch.linspace(0.5, 2.0, out_features, dtype=torch.float64)
    exact = whitened_decomposition(w, gram=gram, scale=scale)
    fast = whitened_decomposition(w, gram=gram, scale=scale, dtype=torch.float32)
    assert fast.sv.dtype == torch.float64 and fast.u.dtype == torch.float32
    top = float(exact.sv[0])
    # eigenvalues σ² err by float32 rounding of the largest (so a tiny σ may err by far more, relatively)
    torch.testing.assert_close(fast.energies, exact.energies, rtol=0, atol=1e-5 * top**2)
    for rank in (2, 8, 16):
        b, a = fast.factors(w, rank, torch.float64)
        measured = torch.linalg.matrix_norm(scale[:, None] * (w - b @ a) @ x.T) ** 2
        optimum = exact.discarded(rank)
        # never below the float64 optimum, and above it by float32 rounding only
        assert optimum * (1 - 1e-9) <= measured.item() <= optimum * (1 + 1e-4) + 1e-9 * top**2


@pytest.mark.parametrize("weighted", [False, True])
def test_output_gram_gives_the_decomposition_of_the_input_gram(weighted):
    """Y = X·Wᵀ: from YᵀY alone (no XᵀX, no W·S), the same spectrum and the same optimal factors,
    whose calibration error is the discarded energy, with or without the Fisher output weights."""
    torch.manual_seed(3)
    w = torch.randn(6, 16, dtype=torch.float64)
    x = torch.randn(40, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    scale = torch.rand(6, dtype=torch.float64) + 0.5 if weighted else None
    y = x @ w.T
    from_inputs = whitened_decomposition(w, gram=x.T @ x, scale=scale)
    from_outputs = whitened_decomposition(w, output_gram=y.T @ y, scale=scale)
    torch.testing.assert_close(from_outputs.sv, from_inputs.sv, rtol=1e-9, atol=1e-9)
    d = torch.ones(6, dtype=torch.float64) if scale is None else scale
    for rank in (1, 3, 5):
        b, a = from_outputs.factors(w, rank, torch.float64)
        b_ref, a_ref = from_inputs.factors(w, rank, torch.float64)
        torch.testing.assert_close(b @ a, b_ref @ a_ref, rtol=1e-8, atol=1e-8)
        error = float((d[:, None] * (w - b @ a) @ x.T).square().sum())
        assert error == pytest.approx(from_outputs.discarded(rank), rel=1e-8)


def test_an_output_gram_of_the_wrong_size_or_for_a_tall_matrix_is_refused():
    with pytest.raises(ValueError, match="output Gram"):
        whitened_decomposition(torch.randn(4, 8), output_gram=torch.eye(5))
    with pytest.raises(ValueError, match="output Gram"):
        whitened_decomposition(torch.randn(8, 4), output_gram=torch.eye(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_output_scale_never_changes_the_callers_weight(dtype):
    w, x = _random_problem()
    w = w.to(dtype)
    before = w.clone()
    whitened_decomposition(w, gram=(x.T @ x).to(dtype), scale=torch.rand(w.shape[0], dtype=torch.float64) + 0.5, dtype=dtype)
    whitened_decomposition(w.t().contiguous().t(), gram=(x.T @ x).to(dtype), scale=torch.rand(w.shape[0], dtype=torch.float64) + 0.5, dtype=dtype)
    assert torch.equal(w, before)
