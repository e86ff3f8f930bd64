"""``compress check``'s verdict: which metrics of a comparison hold their thresholds.

The metrics are those of :class:`compressor.evaluate.Comparison`. Thresholds are checked when
they are made (a bad one is a usage error before any model loads); a metric without one is
reported, never failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compressor.errors import UsageError
from compressor.evaluate import Comparison


@dataclass(frozen=True)
class Thresholds:
    max_ppl_ratio: float | None = None  # compressed perplexity / original's, at most
    max_kl: float | None = None  # mean KL(original ‖ compressed) per token, nats, at most
    min_top1: float | None = None  # top-1 next-token agreement, at least

    def __post_init__(self) -> None:
        for flag, value, low, high in (
            ("--max-ppl-ratio", self.max_ppl_ratio, 0.0, math.inf),
            ("--max-kl", self.max_kl, 0.0, math.inf),
            ("--min-top1", self.min_top1, 0.0, 1.0),
        ):
            if value is not None and not (math.isfinite(value) and low <= value <= high and (flag != "--max-ppl-ratio" or value > 0)):
                bound = "in [0, 1]" if high == 1.0 else ("positive" if flag == "--max-ppl-ratio" else "at least 0")
                raise UsageError(f"{flag} must be a finite number {bound}, got {value}")


@dataclass(frozen=True)
class MetricCheck:
    name: str  # as in the JSON and JUnit output
    label: str  # as in the table
    value: float
    limit: float | None = None
    at_most: bool = True  # the value must be ≤ limit (else ≥)

    @property
    def passed(self) -> bool:
        if self.limit is None:
            return True
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    @property
    def rule(self) -> str:
        return "" if self.limit is None else f"{'≤' if self.at_most else '≥'} {self.limit:g}"

    def to_dict(self) -> dict:
        return {"value": self.value, "limit": self.limit, "rule": self.rule or None, "passed": self.passed}


def judge(comparison: Comparison, thresholds: Thresholds) -> list[MetricCheck]:
    """Every metric of ``comparison``, with its threshold where one was given."""
    c = comparison
    return [
        MetricCheck("perplexity_original", "perplexity, original", c.reference_perplexity),
        MetricCheck("perplexity", "perplexity, compressed", c.perplexity),
        MetricCheck("ppl_ratio", "perplexity ratio", c.perplexity_ratio, thresholds.max_ppl_ratio),
        MetricCheck("kl", f"KL divergence (nats/token, {c.kl_method})", c.kl, thresholds.max_kl),
        MetricCheck("top1_agreement", "top-1 agreement", c.top1_agreement, thresholds.min_top1, at_most=False),
    ]
