"""Triton kernels for a factored layer, y = (x·Aᵀ)·Bᵀ + bias, and for a dense layer with a low-rank
correction, y = x·Wᵀ + (x·Aᵀ)·Bᵀ + bias. Imported only where Triton runs (CUDA, or the CPU
interpreter under ``TRITON_INTERPRET=1``, which must be set before this module is imported).

Decode multiplies a few tokens by every weight, so a call costs the time to read its weights
once. Two launches do that:

* **shrink**, t = x·Aᵀ (M × r, float32): the reduction over the input width is split across
  programs (split-K) so that a small r still spreads A over the whole GPU; each program reads its
  slice of A once and adds its partial sums into t atomically.
* **expand**, y = t·Bᵀ (+ x·Wᵀ) + bias: a program per block of outputs reads its rows of B (and
  of W) once; t, a few kilobytes, stays in cache. The base product and the correction share the
  program and its accumulator, so the corrected layer reads W and B once and writes y once.

Products accumulate in float32 whatever the inputs (fp16, bf16 or fp32; float32 inputs multiply in
full float32, not TF32). Block sizes are
autotuned per shape class (a bucket of the token count and the matrix shape) and the choice is
kept by Triton's autotuner (on disk too where the Triton release supports it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _autotune(configs: list[triton.Config], key: list[str], reset: list[str] | None = None):
    kwargs = {"configs": configs, "key": key}
    if reset:
        kwargs["reset_to_zero"] = reset
    try:
        return triton.autotune(**kwargs, cache_results=True)
    except TypeError:  # a Triton release without on-disk autotuning results
        return triton.autotune(**kwargs)


def _configs(shrink: bool) -> list[triton.Config]:
    if INTERPRETED:  # the interpreter runs every candidate on the CPU: one small one
        return [triton.Config({"BLOCK_R": 16, "BLOCK_K": 32, "SPLIT_K": 2} if shrink else {"BLOCK_N": 32, "BLOCK_K": 32})]
    if shrink:
        return [
            triton.Config({"BLOCK_R": br, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
            for br, bk, sk, w, s in [
                (32, 128, 16, 4, 3), (64, 128, 16, 4, 3), (64, 256, 8, 8, 3), (128, 128, 8, 8, 3),
                (32, 256, 32, 4, 4), (64, 64, 32, 4, 4), (128, 64, 16, 4, 3), (16, 256, 32, 4, 4),
            ]
        ]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3),
            (16, 256, 4, 4), (32, 256, 4, 3), (128, 64, 4, 4), (16, 512, 4, 3),
        ]
    ]


@triton.jit
def _tile_dot(x_ptr, w_ptr, rm, rn, rk, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """x[rm, rk]·W[rn, rk]ᵀ for one tile, in float32; rows and columns out of range read as 0."""
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
    w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(x, w, input_precision=PRECISION)


@_autotune(_configs(shrink=True), key=["M_BUCKET", "R", "K"], reset=["t_ptr"])
@triton.jit
def _shrink(
    x_ptr, a_ptr, t_ptr, M, R, K,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr,
    M_BUCKET: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """t[M, R] += x[M, K]·A[R, K]ᵀ over this program's share of K (t zeroed before)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * per_split
    for k0 in range(0, per_split, BLOCK_K):
        rk = k_start + k0 + tl.arange(0, BLOCK_K)
        acc += _tile_dot(x_ptr, a_ptr, rm, rr, rk, M, R, K, stride_xm, stride_xk, stride_ar, stride_ak, UPCAST, PRECISION)
    tl.atomic_add(t_ptr + rm[:, None] * stride_tm + rr[None, :] * stride_tr, acc,
                  mask=(rm[:, None] < M) & (rr[None, :] < R))


@_autotune(_configs(shrink=False), key=["M_BUCKET", "N", "K", "R", "HAS_BASE"])
@triton.jit
def _expand(
    x_ptr, w_ptr, t_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tr, stride_bn, stride_br, stride_ym, stride_yn,
    M_BUCKET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_RANK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[M, N] = t[M, R]·B[N, R]ᵀ (+ x[M, K]·W[N, K]ᵀ where HAS_BASE) (+ bias)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            acc += _tile_dot(x_ptr, w_ptr, rm, rn, rk, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, UPCAST, PRECISION)
    for r0 in range(0, R, BLOCK_RANK):
        rr = r0 + tl.arange(0, BLOCK_RANK)
        t = tl.load(t_ptr + rm[:, None] * stride_tm + rr[None, :] * stride_tr,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                    mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        else:
            t = t.to(b.dtype)  # the intermediate rounded to the weights' dtype, as the two-matmul path does
        acc += tl.dot(t, b, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _block_m(m: int) -> int:
    """Rows of tokens a program takes: tl.dot needs 16 at least; decode has a few."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 256)


def _shrunk(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    r = a.shape[0]
    t = torch.zeros(m, r, device=x.device, dtype=torch.float32)
    block_m = _block_m(m)

    def grid(meta):
        return (triton.cdiv(r, meta["BLOCK_R"]), meta["SPLIT_K"], triton.cdiv(m, block_m))

    _shrink[grid](
        x, a, t, m, r, k, x.stride(0), x.stride(1), a.stride(0), a.stride(1), t.stride(0), t.stride(1),
        M_BUCKET=_bucket(m), BLOCK_M=block_m, UPCAST=INTERPRETED or x.dtype == torch.float32, PRECISION="ieee",
    )
    return t


def _expanded(x: torch.Tensor, weight: torch.Tensor | None, t: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n, r = b.shape
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m = _block_m(m)
    w = weight if weight is not None else b  # an unread placeholder where there is no base

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))

    _expand[grid](
        x, w, t, b, bias if bias is not None else b, y, m, n, k, r,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), t.stride(0), t.stride(1), b.stride(0), b.stride(1),
        y.stride(0), y.stride(1),
        M_BUCKET=_bucket(m), BLOCK_M=block_m, BLOCK_RANK=max(16, min(64, triton.next_power_of_2(r))),
        UPCAST=INTERPRETED or x.dtype == torch.float32, PRECISION="ieee", HAS_BASE=weight is not None, HAS_BIAS=bias is not None,
    )
    return y


def factored(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x·Aᵀ)·Bᵀ + bias for x of shape (..., in), A (r, in), B (out, r)."""
    flat = x.reshape(-1, x.shape[-1])
    y = _expanded(flat, None, _shrunk(flat, a), b, bias)
    return y.reshape(*x.shape[:-1], b.shape[0])


def corrected(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + (x·Aᵀ)·Bᵀ + bias for x of shape (..., in), W (out, in), A (r, in), B (out, r)."""
    flat = x.reshape(-1, x.shape[-1])
    y = _expanded(flat, weight, _shrunk(flat, a), b, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])
