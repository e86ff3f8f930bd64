"""The low-rank kernels against float64 references, and the choice of path.

Without a GPU the Triton kernels run in Triton's CPU interpreter: conftest.py sets
TRITON_INTERPRET=1 before anything imports triton (Triton reads it when a function is defined)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from compressor.errors import UsageError
from compressor.kernels import corrected_linear, lowrank_linear, path_for, use_kernels

HAS_TRITON = (
    importlib.util.find_spec("triton") is not None
    and importlib.util.find_spec("numpy") is not None
    and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# (out, in, rank): odd sizes, ranks from 1 to min(out, in), blocks that do not divide them
SHAPES = [(37, 53, 5), (64, 48, 17), (130, 70, 64), (20, 30, 20), (9, 200, 1), (90, 150, 90)]
TOKENS = [1, 3, 16, 17, 40, 70]  # 70: programs over two blocks of tokens
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _tensors(out: int, inp: int, rank: int, tokens: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inp, generator=g)
    a = torch.randn(rank, inp, generator=g) / inp**0.5
    b = torch.randn(out, rank, generator=g) / rank**0.5
    w = torch.randn(out, inp, generator=g) / inp**0.5
    bias = torch.randn(out, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, a, b, w, bias)]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    scale = float(want.abs().max()) or 1.0
    error = float((got.double().cpu() - want).abs().max())
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} against {scale:.3g} ({dtype})"


def _factored_reference(x, a, b, bias):
    x, a, b = (t.double().cpu() for t in (x, a, b))
    y = (x @ a.T) @ b.T
    return y if bias is None else y + bias.double().cpu()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_factored_kernel_equals_the_reference(shape, dtype):
    for i, tokens in enumerate(TOKENS):
        x, a, b, _, bias = _tensors(*shape, tokens, dtype, seed=i)
        with use_kernels("triton"):
            got = lowrank_linear(x, a, b, bias if i % 2 else None)
        _close(got, _factored_reference(x, a, b, bias if i % 2 else None), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_the_corrected_kernel_equals_the_reference(shape, dtype):
    for i, tokens in enumerate(TOKENS[:4]):
        x, a, b, w, bias = _tensors(*shape, tokens, dtype, seed=10 + i)
        with use_kernels("triton"):
            got = corrected_linear(x, w, a, b, bias if i % 2 else None)
        want = x.double().cpu() @ w.double().cpu().T + _factored_reference(x, a, b, bias if i % 2 else None)
        _close(got, want, dtype)


@needs_triton
def test_kernels_take_inputs_of_any_leading_shape_and_strides():
    x, a, b, w, bias = _tensors(24, 40, 7, 10, torch.float32)
    x3 = x.reshape(2, 5, 40)
    wide = torch.randn(2, 5, 80, device=DEVICE)[..., ::2]  # a strided input
    wide.copy_(x3)
    with use_kernels("triton"):
        got = lowrank_linear(wide, a, b, bias)
        corrected = corrected_linear(x3, w, a, b)
    assert got.shape == (2, 5, 24)
    _close(got.reshape(10, 24), _factored_reference(x, a, b, bias), torch.float32)
    _close(corrected.reshape(10, 24), x.double().cpu() @ w.double().cpu().T + _factored_reference(x, a, b, None), torch.float32)


@needs_triton
def test_a_factored_layer_runs_the_kernels_when_told():
    """FactoredLinear's forward goes through the dispatch: the Triton path gives the PyTorch path's output."""
    from compressor.formats.factored import FactoredLinear

    layer = FactoredLinear.from_factors(torch.randn(24, 6), torch.randn(6, 40), torch.randn(24)).to(DEVICE)
    x = torch.randn(3, 40, device=DEVICE)
    with torch.no_grad():
        with use_kernels("torch"):
            reference = layer(x)
        with use_kernels("triton"):
            assert path_for(x, layer.weight_a) == "triton"
            got = layer(x)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_the_torch_path_is_taken_on_the_cpu_by_default(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    x = torch.randn(4, 8)
    a, b = torch.randn(3, 8), torch.randn(5, 3)
    assert path_for(x, a) == "torch"
    torch.testing.assert_close(lowrank_linear(x, a, b), (x @ a.T) @ b.T)
    w = torch.randn(5, 8)
    torch.testing.assert_close(corrected_linear(x, w, a, b, torch.ones(5)), x @ w.T + (x @ a.T) @ b.T + 1)


def test_the_environment_chooses_the_path(monkeypatch):
    x, a = torch.randn(4, 8), torch.randn(3, 8)
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    assert path_for(x, a) == "torch"
    monkeypatch.setenv("COMPRESS_KERNELS", "fastest")
    with pytest.raises(UsageError, match="COMPRESS_KERNELS"):
        path_for(x, a)
    with pytest.raises(UsageError):
        with use_kernels("cublas"):
            pass


@needs_triton
def test_the_triton_path_refuses_gradients():
    x = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    a, b = torch.randn(3, 8, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    with use_kernels("triton"), pytest.raises(UsageError, match="gradients"):
        lowrank_linear(x, a, b)
    with use_kernels("auto"):  # auto falls back to autograd-capable PyTorch
        assert path_for(x, a) == "torch"
        lowrank_linear(x, a, b).sum().backward()
    assert x.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_takes_triton_for_decode_on_cuda_and_cublas_for_long_inputs(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    a = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    assert path_for(torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16), a) == ("triton" if HAS_TRITON else "torch")
    assert path_for(torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16), a) == "torch"
