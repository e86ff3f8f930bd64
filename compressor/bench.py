"""How fast factored and corrected layers run: per shape against dense, and a model's decode.

Decode multiplies a few tokens by every weight, so a layer's time is the time to read its weights:
a factored layer keeps r·(m + n) of a dense layer's m·n values, and its speedup over dense can
reach at most the **ceiling** mn / (r(m + n)). ``efficiency`` = speedup / ceiling says how much of
that a path realizes. On a GPU the achieved bandwidth is set against the measured copy bandwidth:
η = bytes moved / (time × copy bandwidth).

Timing: weights come in several copies used in turn, so that the caches never hold the next call's
weights (the weights a layer reads at decode are in memory, not in cache); each time is the median
of repeated rounds. On CUDA the calls of a round are captured once in a CUDA graph and replayed,
so that Python and launch overheads do not hide the kernels.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from compressor import __version__
from compressor.errors import UsageError
from compressor.kernels import corrected_linear, lowrank_linear, use_kernels

ROTATE_BYTES = 512 << 20  # weights cycled through per round: well beyond any cache (an H200's L2 is 60 MB)
CORRECTION_RANK = 64


@dataclass(frozen=True)
class Shape:
    out: int
    inp: int
    rank: int

    @property
    def ceiling(self) -> float:
        """The speedup reading r·(m + n) values instead of m·n gives at most."""
        return self.out * self.inp / (self.rank * (self.out + self.inp))

    def __str__(self) -> str:
        return f"{self.out}x{self.inp}x{self.rank}"


def parse_shapes(text: str) -> list[Shape]:
    """``OUTxINxR,…`` → shapes (R ≥ 1, at most min(OUT, IN))."""
    shapes = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out, inp, rank = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise UsageError(f"--shapes: {part!r} is not OUTxINxR (e.g. 4096x4096x1024)") from None
        if min(out, inp, rank) < 1 or rank > min(out, inp):
            raise UsageError(f"--shapes: {part}: need OUT, IN ≥ 1 and 1 ≤ R ≤ min(OUT, IN)")
        shapes.append(Shape(out, inp, rank))
    if not shapes:
        raise UsageError("--shapes: no shape given")
    return shapes


def parse_tokens(text: str) -> list[int]:
    try:
        tokens = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--tokens: {text!r} is not a list of numbers such as 1,4,16,64") from None
    if not tokens or min(tokens) < 1:
        raise UsageError("--tokens: give one or more token counts ≥ 1")
    return tokens


def rank_for(out: int, inp: int, kept: float) -> int:
    """The rank that keeps ``kept`` of an out × in matrix's parameters."""
    return max(1, min(min(out, inp), int(kept * out * inp / (out + inp))))


# LLaMA-3-8B's layer shapes (attention q/o, MLP gate/up, MLP down) at kept fractions 0.5 and 0.8
DEFAULT_SHAPES = ",".join(
    f"{o}x{i}x{rank_for(o, i, k)}" for k in (0.5, 0.8) for o, i in ((4096, 4096), (14336, 4096), (4096, 14336))
)


@dataclass
class ShapeResult:
    shape: str
    tokens: int
    dtype: str
    dense_us: float
    factored_us: float
    corrected_us: float
    ceiling: float
    two_matmul_us: float | None = None  # on CUDA: the PyTorch path, beside the kernels
    factored_bytes: int = 0
    dense_bytes: int = 0
    corrected_bytes: int = 0
    copy_gbs: float | None = None  # measured copy bandwidth, GB/s (CUDA)

    @property
    def speedup(self) -> float:
        return self.dense_us / self.factored_us

    @property
    def efficiency(self) -> float:
        """speedup / ceiling."""
        return self.speedup / self.ceiling

    @property
    def correction_overhead(self) -> float:
        """corrected time / dense time − 1."""
        return self.corrected_us / self.dense_us - 1

    def eta(self, which: str = "factored") -> float | None:
        """Bytes moved / (time × copy bandwidth), where the copy bandwidth was measured."""
        if self.copy_gbs is None:
            return None
        seconds = getattr(self, f"{which}_us") * 1e-6
        return getattr(self, f"{which}_bytes") / (seconds * self.copy_gbs * 1e9)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(speedup=self.speedup, efficiency=self.efficiency, correction_overhead=self.correction_overhead,
                 eta_dense=self.eta("dense"), eta_factored=self.eta("factored"), eta_corrected=self.eta("corrected"))
        return d


@dataclass
class DecodeResult:
    model: str
    target: float
    tokens_per_step: int
    new_tokens: int
    dense_tokens_per_s: float
    factored_tokens_per_s: float
    params_dense: int
    params_factored: int

    @property
    def speedup(self) -> float:
        return self.factored_tokens_per_s / self.dense_tokens_per_s


@dataclass
class BenchResult:
    device: str
    kernels: str
    shapes: list[ShapeResult] = field(default_factory=list)
    decode: list[DecodeResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "tool": f"compress {__version__}",
            "command": "bench",
            "device": self.device,
            "kernels": self.kernels,
            "shapes": [r.to_dict() for r in self.shapes],
            "decode": [{**asdict(d), "speedup": d.speedup} for d in self.decode],
        }


def _median_seconds(run_round: Callable[[], None], calls: int, device: torch.device, rounds: int, warmup: int = 2) -> float:
    """Median time of one call, from ``rounds`` timed rounds of ``calls`` calls each."""
    for _ in range(warmup):
        run_round()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_round()
        graph.replay()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
    else:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            run_round()
            times.append(time.perf_counter() - start)
    return statistics.median(times) / calls


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second a device-to-device copy moves (read + write), measured."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), 1, device, rounds=10)
    return 2 * nbytes / seconds


def _copies(nbytes: int) -> int:
    """Copies of a weight that fill ROTATE_BYTES (at most 64: a tiny shape's then fit in a large cache)."""
    return max(2, min(64, -(-ROTATE_BYTES // max(nbytes, 1))))


def bench_shape(shape: Shape, tokens: int, dtype: torch.dtype, device: torch.device, rounds: int = 10,
                copy_gbs: float | None = None) -> ShapeResult:
    """Dense, factored and dense + rank-64-corrected times of one layer shape at ``tokens`` tokens."""
    g = torch.Generator(device="cpu").manual_seed(0)
    m, n, r = shape.out, shape.inp, shape.rank
    size = torch.tensor([], dtype=dtype).element_size()
    c = min(CORRECTION_RANK, m, n)
    copies = _copies(m * n * size)

    def randn(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=g) / dims[-1] ** 0.5).to(device, dtype)

    x = randn(tokens, n)
    dense = [randn(m, n) for _ in range(copies)]
    factors = [(randn(r, n), randn(m, r)) for _ in range(copies)]
    corrections = [(randn(c, n), randn(m, c)) for _ in range(copies)]

    def timed(body: Callable[[int], torch.Tensor]) -> float:
        def run_round() -> None:
            for i in range(copies):
                body(i)
        return _median_seconds(run_round, copies, device, rounds) * 1e6

    with torch.inference_mode():
        dense_us = timed(lambda i: F.linear(x, dense[i]))
        factored_us = timed(lambda i: lowrank_linear(x, *factors[i]))
        corrected_us = timed(lambda i: corrected_linear(x, dense[i], *corrections[i]))
        two_matmul_us = None
        if device.type == "cuda":
            with use_kernels("torch"):
                two_matmul_us = timed(lambda i: lowrank_linear(x, *factors[i]))
    activations = tokens * (m + n) * size
    return ShapeResult(
        str(shape), tokens, str(dtype).removeprefix("torch."), dense_us, factored_us, corrected_us, shape.ceiling,
        two_matmul_us=two_matmul_us, factored_bytes=r * (m + n) * size + activations, dense_bytes=m * n * size + activations,
        corrected_bytes=(m * n + c * (m + n)) * size + activations, copy_gbs=copy_gbs,
    )


def bench_shapes(shapes: list[Shape], tokens: list[int], dtype: torch.dtype, device: torch.device, rounds: int = 10) -> list[ShapeResult]:
    from compressor.progress import track

    copy_gbs = copy_bandwidth(device) / 1e9 if device.type == "cuda" else None
    cases = [(s, t) for s in shapes for t in tokens]
    return [bench_shape(s, t, dtype, device, rounds, copy_gbs) for s, t in track(cases, description="timing shapes")]


def decode_tokens_per_second(model: torch.nn.Module, vocab: int, batch: int, new_tokens: int, device: torch.device,
                             prompt: int = 16, rounds: int = 3) -> float:
    """Tokens per second of greedy decoding ``new_tokens`` steps for ``batch`` sequences at once
    (``batch`` tokens per step), prompt processing excluded; a static KV cache on CUDA."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device)
    # eager: transformers would compile a static-cache decode by itself (CUDA graphs), which is not
    # yet checked with the Triton kernels inside
    from transformers import GenerationConfig

    kwargs = {"do_sample": False, "pad_token_id": 0}
    if hasattr(GenerationConfig(), "disable_compile"):
        kwargs["disable_compile"] = True
    if device.type == "cuda":
        kwargs["cache_implementation"] = "static"

    def generate(steps: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    generate(new_tokens + 1)  # warm up at the timed lengths (kernels, autotuning, the cache)
    generate(1)
    per_round = []
    for _ in range(rounds):
        # the prompt and first step cost the same in both runs; their difference is the steps alone
        per_round.append((generate(new_tokens + 1) - generate(1)) / new_tokens)
    return batch / statistics.median(per_round)


def factored_copy(model: torch.nn.Module, target: float) -> torch.nn.Module:
    """A copy of ``model`` whose target layers are factored at uniform ranks for ``target``, each
    from a randomized truncated SVD on the model's device (decode speed depends on the shapes
    alone: no calibration is spent, and the factors are still the weights' leading ones)."""
    import copy

    from compressor.formats.factored import apply_factors
    from compressor.math.allocate import uniform_plan
    from compressor.targets import select_targets

    factored = copy.deepcopy(model)
    targets = select_targets(factored)
    ranks = uniform_plan([t.shape for t in targets], target)
    factors = {}
    with torch.no_grad():
        for t, rank in zip(targets, ranks):
            if rank is None:
                continue
            u, s, v = torch.svd_lowrank(t.weight().float(), q=rank, niter=2)
            root = s.sqrt()
            factors[t.name] = (u * root, root[:, None] * v.T)
        apply_factors(factored, factors)
    return factored


def bench_decode(spec: str, target: float, tokens: list[int], new_tokens: int, dtype: torch.dtype, device: torch.device) -> list[DecodeResult]:
    """Decode speed of MODEL dense and factored to ``target`` (:func:`factored_copy`), for each
    number of ``tokens`` per step (sequences decoded together)."""
    from compressor.factorize import count_params
    from compressor.loading import load_model
    from compressor.progress import track

    loaded = load_model(spec, dtype)
    dense = loaded.model.to(device).eval()
    if not hasattr(dense, "generate"):
        raise UsageError(f"{spec}: {type(dense).__name__} cannot generate text; decode speed needs a causal language model")
    factored = factored_copy(dense, target).eval()
    vocab = int(dense.config.get_text_config().vocab_size)
    results = []
    for batch in track(tokens, description="timing decode"):
        d = decode_tokens_per_second(dense, vocab, batch, new_tokens, device)
        f = decode_tokens_per_second(factored, vocab, batch, new_tokens, device)
        results.append(DecodeResult(spec, target, batch, new_tokens, d, f, count_params(dense), count_params(factored)))
    return results
