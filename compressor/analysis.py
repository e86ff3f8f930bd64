"""Spectra of every target, plain and activation-whitened, and what each target ratio costs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from compressor.calibration.grams import Gram, gram_roots
from compressor.math.factorize import whitened_decomposition
from compressor.math import allocate, spectra
from compressor.streaming import weights_of
from compressor.pipeline import CALIBRATION_BATCH, collect_grams_whole_model, iterate_blocks
from compressor.progress import track
from compressor.targets import Target

if TYPE_CHECKING:
    from compressor.calibration.sources import CalibrationSet

ENERGY_LEVELS = (0.90, 0.95, 0.99)
COST_CURVE_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


@dataclass
class SpectrumStats:
    """What one spectrum tells: its values and the ranks read off them."""

    singular_values: torch.Tensor
    stable_rank: float
    energy_ranks: dict[str, int]

    @classmethod
    def of(cls, sv: torch.Tensor) -> "SpectrumStats":
        return cls(
            singular_values=sv,
            stable_rank=spectra.stable_rank(sv),
            energy_ranks={f"{round(p * 100)}": spectra.energy_rank(sv, p) for p in ENERGY_LEVELS},
        )

    def to_dict(self) -> dict:
        return {"stable_rank": round(self.stable_rank, 3), "energy_ranks": self.energy_ranks}


@dataclass
class ModuleAnalysis:
    name: str
    layer_type: str
    block_index: int | None
    shape: tuple[int, int]
    plain: SpectrumStats
    whitened: SpectrumStats | None = None
    calibration_tokens: int = 0
    welore_rank: int | None = None

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict:
        out = {
            "layer_type": self.layer_type,
            "block": self.block_index,
            "shape": list(self.shape),
            "params": self.params,
            "stable_rank": round(self.plain.stable_rank, 3),
            "welore_rank": self.welore_rank,
            "energy_ranks": self.plain.energy_ranks,
        }
        if self.whitened is not None:
            out["whitened"] = self.whitened.to_dict()
            out["calibration_tokens"] = self.calibration_tokens
        return out


@dataclass
class CostPoint:
    kept_ratio: float
    uniform_error: float
    allocated_error: float
    allocated_kept: float


@dataclass
class Analysis:
    modules: list[ModuleAnalysis]
    welore_target: float
    welore_threshold: float
    cost_curve: list[CostPoint] = field(default_factory=list)
    cost_basis: str = "plain"  # "whitened" when calibration was given


def analyze_module(target: Target, gram: Gram | None = None, root: torch.Tensor | None = None) -> ModuleAnalysis:
    weight = target.weight()
    result = ModuleAnalysis(
        name=target.name,
        layer_type=target.layer_type,
        block_index=target.block_index,
        shape=target.shape,
        plain=SpectrumStats.of(spectra.singular_values(weight)),
    )
    if gram is not None:
        whitened = whitened_decomposition(weight, gram=gram.matrix, root=root, values_only=True)
        result.whitened = SpectrumStats.of(whitened.sv)
        result.calibration_tokens = gram.tokens
    return result


def analyze_grams(targets: list[Target], grams: dict[str, Gram]) -> list[ModuleAnalysis]:
    """Analyze targets whose Grams are known; one whitening root per shared Gram, and only for
    matrices with more outputs than inputs (the others need none, see whitened_decomposition)."""
    roots = gram_roots(grams, [t.name for t in targets if t.shape[0] > t.shape[1]])
    return [analyze_module(t, grams[t.name], roots.get(t.name)) for t in targets]


def relative_errors(energies: list[torch.Tensor], plan: allocate.Plan) -> float:
    """Mean over matrices of the fraction of (whitened) energy the plan discards."""
    fractions = [
        allocate.discarded_energy(e, r) / float(e.sum()) if float(e.sum()) > 0 else 0.0
        for e, r in zip(energies, plan)
    ]
    return sum(fractions) / len(fractions)


def cost_curve(modules: list[ModuleAnalysis], ratios=COST_CURVE_RATIOS) -> tuple[list[CostPoint], str]:
    """Predicted mean relative error at each kept ratio: uniform ranks vs. the best allocation.

    The allocation minimizes the summed relative error (each matrix's discarded fraction of
    its own energy), the normalized form that does not starve small-energy matrices.
    """
    whitened = all(m.whitened is not None for m in modules)
    energies = [((m.whitened if whitened else m.plain).singular_values ** 2) for m in modules]
    shapes = [m.shape for m in modules]
    weights = [1.0 / float(e.sum()) if float(e.sum()) > 0 else 0.0 for e in energies]
    points = []
    for ratio in ratios:
        uniform = allocate.uniform_plan(shapes, ratio)
        best = allocate.greedy_plan(energies, shapes, ratio, weights=weights)
        points.append(
            CostPoint(
                kept_ratio=ratio,
                uniform_error=relative_errors(energies, uniform),
                allocated_error=relative_errors(energies, best),
                allocated_kept=allocate.kept_fraction(best, shapes),
            )
        )
    return points, ("whitened" if whitened else "plain")


def summarize(modules: list[ModuleAnalysis], welore_target: float) -> Analysis:
    plan, tau = allocate.welore_plan(
        [m.plain.singular_values for m in modules], [m.shape for m in modules], welore_target
    )
    for m, r in zip(modules, plan):
        m.welore_rank = min(m.shape) if r is None else r
    curve, basis = cost_curve(modules)
    return Analysis(modules, welore_target, tau, curve, basis)


def analyze_model(
    model: torch.nn.Module,
    targets: list[Target],
    calibration: CalibrationSet | None,
    compute_dtype: torch.dtype | None = None,
) -> list[ModuleAnalysis]:
    """Every target's analysis: plain spectra only without calibration; with it, also whitened by
    the Grams of its inputs, collected block by block in the layer loop (or over the whole model
    where a target lies outside the blocks)."""
    if calibration is None:
        found = []
        for t in track(targets, description="spectra"):
            with weights_of(model).holding(t.module):
                found.append(analyze_module(t))
        return found
    batches = calibration.batches(CALIBRATION_BATCH)
    if all(t.block_index is not None for t in targets):
        modules = []
        for step in iterate_blocks(model, batches, targets, "calibrating blocks", compute_dtype):
            modules.extend(analyze_grams(step.targets, step.collect_grams(block_final=True)))
        return modules
    with weights_of(model).holding(model):  # a streamed model whole, for the head's weight
        return analyze_grams(targets, collect_grams_whole_model(model, batches, targets, compute_dtype))
