"""What a run is asked to do, checked once, when it is made.

Each options object validates itself on construction, so an invalid one cannot exist: the CLI
builds them from its flags before any model loads (a bad flag fails at once), API callers build
them the same way, and no code further in checks them again. The defaults live here, once, and
the CLI's flags take theirs from here. This module imports neither torch nor transformers, so the
CLI can read it while it parses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compressor.errors import InvalidInputError, UsageError

METHODS = ("fisher", "whiten", "svd")
ALLOCATIONS = ("global", "relative", "uniform", "welore")
CALIB_DTYPES = ("auto", "float32", "bfloat16")
DEVICE_HELP = "auto (the first CUDA device when there is one, else the CPU), cpu, cuda or cuda:N."
# Windows of the output-Fisher backward pass: 16 gave 0.3-2.8 % lower perplexity on SmolLM2 for
# ~12 s more (docs/factorize.md); 8 keeps the default run within its 60 s goal.
SENSITIVITY_WINDOWS = 8


def check_target(target: float) -> None:
    """A kept fraction R: 0 < R ≤ 1."""
    if not 0 < target <= 1:
        raise UsageError(f"target must be in (0, 1], got {target}")


def check_calib_dtype(name: str) -> None:
    if name not in CALIB_DTYPES:
        raise UsageError(f"unknown --calib-dtype {name!r}; choose one of {', '.join(CALIB_DTYPES)}")


@dataclass(frozen=True)
class CalibrationOptions:
    """Where calibration windows come from (``--calib SPEC``) and how many of what length."""

    spec: str = "self"
    samples: int = 64
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise UsageError(f"--calib-samples must be at least 1, got {self.samples}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {self.seq_len}")
        spec = self.spec
        if spec == "self":
            return
        if spec.startswith("hf:"):
            parts = spec[3:].split(":")
            if not parts[0] or len(parts) > 3:
                raise UsageError(f"bad dataset spec {spec!r}: use hf:NAME[:CONFIG[:SPLIT]]")
            return
        path = Path(spec)
        if path.suffix.lower() not in (".txt", ".jsonl"):
            raise UsageError(f"unknown calibration source {spec!r}: use a .txt or .jsonl file, hf:NAME, or self")
        if not path.is_file():
            raise InvalidInputError(f"calibration file not found: {spec}")


class _NeedsOfMethod:
    """What a ``method`` and ``alloc`` ask for, the same for factorize and compensate."""

    method: str
    alloc: str

    @property
    def needs_calibration(self) -> bool:
        return self.method != "svd" or self.alloc == "global"

    @property
    def needs_fisher(self) -> bool:
        return self.method == "fisher" or self.alloc == "global"


@dataclass(frozen=True)
class FactorizeOptions(_NeedsOfMethod):
    """How ``factorize`` chooses ranks and factors (``--target``, ``--method``, ``--alloc``, …)."""

    target: float
    method: str = "fisher"
    alloc: str = "global"
    sequential: bool = False
    floor_fraction: float = 0.5  # global allocation: no matrix below this share of its uniform rank
    calib_dtype: str = "auto"  # matmul dtype of the calibration passes (precision.resolve_calib_dtype)
    fisher_windows: int = SENSITIVITY_WINDOWS  # calibration windows of the output-Fisher pass (at most all of them)

    def __post_init__(self) -> None:
        check_target(self.target)
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.alloc not in ALLOCATIONS:
            raise UsageError(f"unknown --alloc {self.alloc!r}; choose one of {', '.join(ALLOCATIONS)}")
        check_calib_dtype(self.calib_dtype)
        if self.fisher_windows < 1:
            raise UsageError(f"--fisher-windows must be at least 1, got {self.fisher_windows}")
        if not 0 <= self.floor_fraction <= 1:
            raise UsageError(f"floor fraction must be in [0, 1], got {self.floor_fraction}")


COMPENSATE_METHODS = ("fisher", "eora", "svd")
COMPENSATE_ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class CompensateOptions(_NeedsOfMethod):
    """How ``compensate`` fits its rank-``rank`` corrections (``--rank``, ``--method``, ``--alloc``, …).

    ``rank``: per module under ``uniform``; under ``global``, the average that fixes the budget
    (the adapter holds as many parameters as uniform rank ``rank`` would). ``serve_form``: pad every
    module's correction with zeros to one rank that serving engines accept (True), write each
    module's own rank with ``rank_pattern`` (False), or the serving form exactly when ranks are
    uniform (None).
    """

    rank: int
    method: str = "fisher"  # 5-6 % below eora at w3 r16 (docs/compensate.md)
    alloc: str = "uniform"  # global measured no better
    sequential: bool = True
    calib_dtype: str = "auto"
    # 4, not factorize's 8: compensating SmolLM2 at rank 64 then takes 1.41-1.46x an evaluation of the
    # same tokens instead of 1.49-1.55x, for 1 % more perplexity at w3 rank 16 (docs/compensate.md)
    fisher_windows: int = 4
    serve_form: bool | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.method not in COMPENSATE_METHODS:
            raise UsageError(f"unknown --method {self.method!r}; choose one of {', '.join(COMPENSATE_METHODS)}")
        if self.alloc not in COMPENSATE_ALLOCATIONS:
            raise UsageError(f"unknown --alloc {self.alloc!r}; choose one of {', '.join(COMPENSATE_ALLOCATIONS)}")
        check_calib_dtype(self.calib_dtype)
        if self.fisher_windows < 1:
            raise UsageError(f"--fisher-windows must be at least 1, got {self.fisher_windows}")


QUANTIZE_BITS = (2, 3, 4, 8)
QUANTIZE_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantizeOptions:
    """How ``quantize`` rounds weights to integers (``--bits``, ``--group-size``, ``--method``, ``--sym``).

    ``group_size``: input columns sharing one scale and zero point; -1 for one group per row.
    ``sym``: zero point fixed at 2^(bits−1) and the scale from the largest magnitude, else the
    zero point and scale from each group's minimum and maximum. ``calib_dtype``: matmul dtype of
    the calibration passes of ``gptq`` (``rtn`` needs no calibration).
    """

    bits: int
    group_size: int = 128
    method: str = "rtn"
    sym: bool = True
    calib_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.bits not in QUANTIZE_BITS:
            raise UsageError(f"--bits must be one of {', '.join(map(str, QUANTIZE_BITS))}, got {self.bits}")
        if not (self.group_size == -1 or self.group_size >= 1):
            raise UsageError(f"--group-size must be at least 1, or -1 for one group per row; got {self.group_size}")
        if self.method not in QUANTIZE_METHODS:
            raise UsageError(f"unknown --method {self.method!r}; choose one of {', '.join(QUANTIZE_METHODS)}")
        check_calib_dtype(self.calib_dtype)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"
