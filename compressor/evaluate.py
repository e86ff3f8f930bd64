"""Perplexity by the project's protocol, and agreement between two models."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from compressor.attention import chunked_causal_attention
from compressor.device import model_device
from compressor.errors import InvalidInputError, NumericalError, UsageError
from compressor.progress import track
from compressor.streaming import is_streamed


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
    device = model_device(model)
    windows = windows.to(device)
    with chunked_causal_attention():
        logits = model(input_ids=windows, use_cache=False).logits
    nll = next_token_nll(logits.float(), windows, reduction="none").view(windows.shape)
    return nll.double().sum(dim=1).cpu()


STREAMED_GROUP_BYTES = 256 << 20  # hidden states of the windows that go through the blocks together


def _streamed_nll(model, windows: torch.Tensor, batch_size: int) -> float:
    """Summed NLL of a streamed model (:mod:`compressor.streaming`): groups of windows go through the
    blocks together, each block read once per group (:func:`logits_block_by_block`)."""
    from compressor.pipeline import hidden_width, logits_block_by_block

    per_window = windows.shape[1] * hidden_width(model) * 4
    group = max(batch_size, STREAMED_GROUP_BYTES // per_window // batch_size * batch_size)
    device = model_device(model)
    total = 0.0
    for part in track(windows.split(group), description="evaluating"):
        # one window per pass: the logits of one window ([seq, vocab]) are alive at a time
        batches = [b.to(device) for b in part.split(1)]
        for batch, logits in zip(batches, logits_block_by_block(model, batches)):
            nll = next_token_nll(logits.float(), batch, reduction="none")
            total += float(nll.double().sum())
    return total


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]`` (logits [batch, seq, vocab]).

    Computed over flattened tokens of the whole logits tensor, the last position ignored
    (``reduction="none"``: 0 there), so the logits are never copied. On the CPU the
    (batch, vocab, seq) layout of a transposed call is 3x slower and, in float32, sums up to
    4e-5 low over a 49k vocabulary (``benchmarks/cpu_ops.py``)."""
    return labelled_nll(logits, next_token_labels(ids), reduction)


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """What each position predicts: the next token; -100 (ignored) at the last."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def labelled_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of ``logits`` [batch, seq, vocab] against ``labels`` [batch, seq] (-100: ignored)."""
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
    if is_streamed(model):
        total = _streamed_nll(model, windows, batch_size)
    else:
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


# What a baseline keeps of the reference's next-token distribution at each predicted position: its
# TOP_K most likely tokens exactly, and TAIL_SAMPLES tokens drawn from the rest. With these the KL
# term of the rest is estimated without bias; on SmolLM2 (4 windows of 512, RTN 2-8 bits) the
# estimate is within 0.6 % of the exact KL, where dropping the rest (top-32 and one bin for the
# rest) is 18-30 % low (docs/check.md).
TOP_K = 32
TAIL_SAMPLES = 16
BASELINE_SEED = 0


@dataclass(frozen=True)
class Comparison:
    perplexity: float
    reference_perplexity: float
    kl: float  # mean KL(reference ‖ model) per predicted token, nats
    top1_agreement: float  # fraction of predicted positions where both models' most likely token agree
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    kl_method: str = "exact"  # or "estimated": from a baseline's top tokens and tail samples
    source: str = ""  # the model, as loading resolved it (set by api.evaluate)

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "source"}


@dataclass
class ReferenceStats:
    """What comparing with a reference model needs of its predictions, without the model: the
    summed NLL of each window, and per predicted token its ``TOP_K`` log-probabilities, the mass
    of the rest, and ``TAIL_SAMPLES`` tokens drawn from the rest with their mean log-probability.
    ``tokens_sha256`` fingerprints the windows (data, tokenizer, seq_len and count)."""

    seq_len: int
    windows: int
    tokens_sha256: str
    window_nll: list[float]
    top_ids: torch.Tensor  # [tokens, k] int32, most likely first
    top_logp: torch.Tensor  # [tokens, k] float32
    tail_ids: torch.Tensor  # [tokens, s] int32
    tail_logp_mean: torch.Tensor  # [tokens] float32
    tail_mass: torch.Tensor  # [tokens] float32

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.window_nll) / (self.windows * (self.seq_len - 1)))


def windows_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token at positions 1..L-1 of each window, [batch·(L−1), vocab], float32."""
    device = model_device(model)
    with chunked_causal_attention():
        logits = model(input_ids=batch.to(device), use_cache=False).logits
    return logits[:, :-1].float().log_softmax(-1).reshape(-1, logits.shape[-1]).cpu()


def _summarize(log_p: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One batch's part of :class:`ReferenceStats`."""
    k = min(TOP_K, log_p.shape[-1])
    top_logp, top_ids = log_p.topk(k, dim=-1)
    tail = log_p.exp().scatter_(-1, top_ids, 0.0)
    tail_mass = tail.sum(-1)
    if k == log_p.shape[-1]:  # no tail: a vocabulary smaller than TOP_K
        tail_ids = torch.zeros(log_p.shape[0], 0, dtype=torch.int64)
        tail_logp_mean = torch.zeros(log_p.shape[0])
    else:
        empty = tail_mass <= 0  # all mass in the top tokens after rounding: any draw, weighted by 0
        tail[empty] = 1.0
        tail_ids = torch.multinomial(tail, TAIL_SAMPLES, replacement=True, generator=generator)
        tail_logp_mean = log_p.gather(-1, tail_ids).mean(-1)
        tail_mass = tail_mass.masked_fill(empty, 0.0)
    return {
        "top_ids": top_ids.to(torch.int32), "top_logp": top_logp, "tail_ids": tail_ids.to(torch.int32),
        "tail_logp_mean": tail_logp_mean, "tail_mass": tail_mass,
    }


def _estimated_kl(stats: dict[str, torch.Tensor], log_q: torch.Tensor) -> float:
    """Summed KL(reference ‖ model) over a batch's tokens from the reference's summary: the top
    tokens exactly, the rest by its mass times the mean log-ratio of the tokens drawn from it."""
    top_p = stats["top_logp"].exp()
    top = (top_p * (stats["top_logp"] - log_q.gather(-1, stats["top_ids"].long()))).sum(-1)
    if stats["tail_ids"].shape[-1] == 0:
        return float(top.double().sum())
    tail_q = log_q.gather(-1, stats["tail_ids"].long()).mean(-1)
    return float((top + stats["tail_mass"] * (stats["tail_logp_mean"] - tail_q)).double().sum())


def _nll_per_window(log_p: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    labels = batch[:, 1:].reshape(-1, 1).to(log_p.device)
    return -log_p.gather(-1, labels).view(batch.shape[0], -1).double().sum(-1)


@torch.inference_mode()
def compare(
    model,
    reference,
    ids: torch.Tensor,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    baseline: ReferenceStats | None = None,
    record: bool = False,
) -> tuple[Comparison | None, ReferenceStats | None]:
    """Perplexity of both models on the same windows, the mean KL divergence of ``model``'s
    next-token distribution from the reference's, and their top-1 agreement.

    The reference is a model (the KL is exact; with ``record`` its :class:`ReferenceStats` are
    returned too, for a later ``baseline``) or the ``baseline`` of an earlier run (the KL is
    estimated, the rest exact). ``model`` may be None with ``record``: only the stats are made
    (and no comparison returned)."""
    if (reference is None) == (baseline is None):
        raise ValueError("compare needs a reference model or a baseline, not both")
    windows = eval_windows(ids, seq_len, max_windows)
    fingerprint = windows_fingerprint(windows)
    if baseline is not None:
        if (baseline.seq_len, baseline.windows) != (seq_len, windows.shape[0]):
            raise InvalidInputError(
                f"the baseline holds {baseline.windows} windows of {baseline.seq_len} tokens, this run "
                f"{windows.shape[0]} of {seq_len}: pass the same --seq-len and --max-windows"
            )
        if baseline.tokens_sha256 != fingerprint:
            raise InvalidInputError("the baseline was made on other tokens (another data file or tokenizer)")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(BASELINE_SEED)
    ref_nll: list[float] = []
    nll = kl = 0.0
    agree = 0
    pieces: list[dict[str, torch.Tensor]] = []
    offset = 0
    for batch in track(windows.split(batch_size), description="comparing"):
        n = batch.shape[0] * (seq_len - 1)
        if reference is not None:
            log_p = _log_probs(reference, batch)
            ref_nll.extend(_nll_per_window(log_p, batch).tolist())
            summary = _summarize(log_p, generator) if record else None
            if summary is not None:
                pieces.append(summary)
            ref_top1 = log_p.argmax(-1)
        else:
            summary = {key: getattr(baseline, key)[offset : offset + n] for key in _STAT_KEYS}
            ref_top1 = summary["top_ids"][:, 0].long()
        offset += n
        if model is None:
            continue
        log_q = _log_probs(model, batch)
        nll += float(_nll_per_window(log_q, batch).sum())
        if reference is not None:
            if log_q.shape != log_p.shape:
                raise InvalidInputError(
                    f"the models predict over vocabularies of {log_p.shape[-1]} and {log_q.shape[-1]} tokens: not the same model"
                )
            kl += float((log_p.exp() * (log_p - log_q)).sum(-1).double().sum())
        else:
            if max(int(summary[key].max()) for key in ("top_ids", "tail_ids") if summary[key].numel()) >= log_q.shape[-1]:
                raise InvalidInputError(f"the baseline names token ids beyond the model's {log_q.shape[-1]}-token vocabulary")
            kl += _estimated_kl(summary, log_q)
        agree += int((log_q.argmax(-1) == ref_top1).sum())
    tokens = windows.shape[0] * (seq_len - 1)
    stats = None
    if record:
        stats = ReferenceStats(
            seq_len, windows.shape[0], fingerprint, ref_nll,
            **{key: torch.cat([p[key] for p in pieces]) for key in _STAT_KEYS},
        )
    if model is None:
        return None, stats
    if baseline is not None:
        ref_nll = list(baseline.window_nll)
    values = [sum(ref_nll), nll, kl]
    if not all(math.isfinite(v) for v in values):
        raise NumericalError("a model produced non-finite log-likelihoods")
    comparison = Comparison(
        perplexity=math.exp(nll / tokens),
        reference_perplexity=math.exp(sum(ref_nll) / tokens),
        kl=kl / tokens,
        top1_agreement=agree / tokens,
        tokens=tokens,
        windows=windows.shape[0],
        seq_len=seq_len,
        seconds=time.perf_counter() - start,
        kl_method="exact" if reference is not None else "estimated",
    )
    return comparison, stats


_STAT_KEYS = ("top_ids", "top_logp", "tail_ids", "tail_logp_mean", "tail_mass")
