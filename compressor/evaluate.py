"""Perplexity by the project's protocol, and agreement between two models."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from compressor.attention import chunked_causal_attention
from compressor.errors import InvalidInputError, NumericalError, UsageError
from compressor.progress import track


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens: windows × (seq_len − 1)
    windows: int
    seq_len: int
    seconds: float
    source: str = ""  # the model, as loading resolved it (set by api.evaluate)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "source"}


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seq_len`` tokens from the start."""
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"--max-windows must be at least 1, got {max_windows}")
    available = ids.numel() // seq_len
    if available == 0:
        raise InvalidInputError(f"the text holds {ids.numel()} tokens, fewer than one window of {seq_len}")
    n = available if max_windows is None else min(max_windows, available)
    return ids[: n * seq_len].view(n, seq_len)


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Summed NLL of tokens 2..L of each window, float64, one value per window."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    with chunked_causal_attention():
        logits = model(input_ids=windows, use_cache=False).logits
    nll = next_token_nll(logits.float(), windows, reduction="none").view(windows.shape)
    return nll.double().sum(dim=1).cpu()


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]`` (logits [batch, seq, vocab]).

    Computed over flattened tokens of the whole logits tensor, the last position ignored
    (``reduction="none"``: 0 there), so the logits are never copied. On the CPU the
    (batch, vocab, seq) layout of a transposed call is 3x slower and, in float32, sums up to
    4e-5 low over a 49k vocabulary (``benchmarks/cpu_ops.py``)."""
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction=reduction)


def perplexity(
    model, ids: torch.Tensor, *, seq_len: int = 512, max_windows: int | None = None, batch_size: int = 4
) -> PerplexityResult:
    """Perplexity over the first windows of a token stream (the whole text tokenized once)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    windows = eval_windows(ids, seq_len, max_windows)
    start = time.perf_counter()
    total = 0.0
    for batch in track(windows.split(batch_size), description="evaluating"):
        total += float(window_nll(model, batch).sum())
    tokens = windows.shape[0] * (seq_len - 1)
    nll = total / tokens
    if not math.isfinite(nll):
        raise NumericalError("the model produced non-finite log-likelihoods")
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=tokens,
        windows=windows.shape[0],
        seq_len=seq_len,
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class Comparison:
    perplexity: float
    reference_perplexity: float
    top1_agreement: float  # fraction of predicted positions where both models' argmax agree
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    source: str = ""  # the model, as loading resolved it (set by api.evaluate)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "source"}


@torch.inference_mode()
def compare(
    model, reference, ids: torch.Tensor, *, seq_len: int = 512, max_windows: int | None = None, batch_size: int = 4
) -> Comparison:
    """Perplexity of both models on the same windows and their top-1 next-token agreement."""
    windows = eval_windows(ids, seq_len, max_windows)
    start = time.perf_counter()
    nll = {"model": 0.0, "reference": 0.0}
    agree = 0
    for batch in track(windows.split(batch_size), description="comparing"):
        top1 = {}
        for key, m in (("model", model), ("reference", reference)):
            device = next(m.parameters()).device
            with chunked_causal_attention():
                logits = m(input_ids=batch.to(device), use_cache=False).logits.float()
            nll[key] += float(next_token_nll(logits, batch.to(device)))
            top1[key] = logits[:, :-1].argmax(-1).cpu()
        agree += int((top1["model"] == top1["reference"]).sum())
    tokens = windows.shape[0] * (seq_len - 1)
    if not all(math.isfinite(v) for v in nll.values()):
        raise NumericalError("a model produced non-finite log-likelihoods")
    return Comparison(
        perplexity=math.exp(nll["model"] / tokens),
        reference_perplexity=math.exp(nll["reference"] / tokens),
        top1_agreement=agree / tokens,
        tokens=tokens,
        windows=windows.shape[0],
        seq_len=seq_len,
        seconds=time.perf_counter() - start,
    )
