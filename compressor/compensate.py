"""EoRA compensation: a rank-r correction B·A per module for what compression took away.

For each target, the residual ΔW = W − Ŵ (original minus compressed weight) is approximated in
the metric of the calibration inputs X that reach the compressed module: minimize
‖(ΔW − B·A)·Xᵀ‖_F over rank-r products. With G = XᵀX = S·Sᵀ and ΔW·S = U·Σ·Vᵀ, the optimum is
B = U_r, A = U_rᵀ·ΔW (:mod:`compressor.math.factorize`, the same closed form the factorization
uses). EoRA writes it as the SVD of ΔW·Q·Λ^½ mapped back by Λ^-½·Qᵀ (G = QΛQᵀ); on the span of
the calibration inputs the two are the same product, and this one never divides by an
eigenvalue: tiny or negative eigenvalues of a rank-deficient Gram cannot blow it up, and the
correction is also right on input directions the calibration set never reached.

Methods: ``eora`` (the above); ``fisher`` (the outputs weighted by the loss's mean squared
gradient, minimizing ‖D·(ΔW − B·A)·Xᵀ‖ with D² the output Fisher diagonal, so the error reads as
a predicted loss increase); ``svd`` (plain SVD of ΔW, the data-free baseline). Allocation:
``uniform`` (every module rank r) or ``global`` (the same total parameters, spent where the
predicted loss falls most). Sequential (default): each block is calibrated on the inputs that
the already-corrected blocks before it produce.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from compressor.architecture import has_lm_head
from compressor.calibration.grams import Gram, gram_roots
from compressor.calibration.sources import CalibrationSet
from compressor.errors import InvalidInputError, UsageError, first_few
from compressor.formats.adapter import LowRankTerm, terms_applied
from compressor.math import allocate
from compressor.math.factorize import Decomposition, svd_decomposition, whitened_decomposition
from compressor.options import CompensateOptions
from compressor.pipeline import CALIBRATION_BATCH, iterate_blocks
from compressor.precision import decomposition_dtype, resolve_calib_dtype
from compressor.progress import track
from compressor.residency import release
from compressor.sensitivity import fisher_scale, layer_sensitivities, output_fisher
from compressor.targets import Target

log = logging.getLogger(__name__)

GLOBAL_RANK_CAP = 4  # under --alloc global no module gets more than this many times the average rank


@dataclass
class ModuleResult:
    name: str
    shape: tuple[int, int]
    rank: int
    energy: float  # the residual's error before correction, in the method's metric (Σσ²)
    remaining: float  # after: Σ of the σ² beyond the rank (exact for the data the Gram came from)

    @property
    def relative_error(self) -> float:
        return self.remaining / self.energy if self.energy > 0 else 0.0


@dataclass
class CompensateOutcome:
    options: CompensateOptions  # what ran, after any fallback
    corrections: dict[str, LowRankTerm]
    modules: list[ModuleResult]
    seconds: float
    calibration_ran_in: str | None = None
    fisher_windows: int | None = None

    @property
    def adapter_params(self) -> int:
        return sum(c.a.numel() + c.b.numel() for c in self.corrections.values())

    @property
    def mean_relative_error(self) -> float:
        return sum(m.relative_error for m in self.modules) / max(len(self.modules), 1)

    def to_dict(self) -> dict:
        return {
            "adapter_params": self.adapter_params,
            "mean_relative_error": self.mean_relative_error,
            "modules": {
                m.name: {"shape": list(m.shape), "rank": m.rank, "relative_error": m.relative_error} for m in self.modules
            },
        }


def matching_originals(original: nn.Module, targets: list[Target]) -> dict[str, Target]:
    """The original model's module for each target, same name and shape; refuses a mismatch whole."""
    modules = dict(original.named_modules())
    found: dict[str, Target] = {}
    missing, mismatched = [], []
    for t in targets:
        module = modules.get(t.name)
        if module is None or not hasattr(module, "weight"):
            missing.append(t.name)
            continue
        kind = "conv1d" if t.kind == "conv1d" or type(module).__name__ == "Conv1D" else "linear"
        original_target = Target(t.name, module, t.block_index, kind)
        if original_target.shape != t.shape:
            mismatched.append(f"{t.name} {tuple(original_target.shape)} vs {tuple(t.shape)}")
            continue
        found[t.name] = original_target
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"the original model has no linear module {first_few(missing)}")
        if mismatched:
            problems.append(f"shapes differ (original vs compressed): {first_few(mismatched)}")
        raise InvalidInputError("the two models do not match: " + "; ".join(problems))
    return found


def check_targets(options: CompensateOptions, targets: list[Target]) -> None:
    """What can be refused before any work: a rank no target can hold (above min(out, in)); targets
    outside the transformer blocks, which the layer loop cannot calibrate; a serving form above
    the largest rank serving engines take."""
    too_small = [f"{t.name} {t.shape}" for t in targets if options.rank > min(t.shape)]
    if too_small:
        raise UsageError(f"--rank {options.rank} exceeds min(out, in) of {first_few(too_small)}")
    outside = [t.name for t in targets if t.block_index is None]
    if outside and (options.needs_calibration):
        raise UsageError(
            f"{first_few(outside)} lie outside the transformer blocks: calibrated compensation covers the blocks' "
            "layers only (--method svd --alloc uniform corrects any layer)"
        )
    if options.serve_form is not False:
        from compressor.formats.adapter import SERVING_RANKS

        top = options.rank
        if options.alloc == "global":
            top = max(min(min(t.shape), GLOBAL_RANK_CAP * options.rank) for t in targets)
        if top > SERVING_RANKS[-1] and (options.serve_form or options.alloc == "uniform"):
            raise UsageError(
                f"ranks up to {top} exceed the largest rank serving engines accept ({SERVING_RANKS[-1]}): "
                "lower --rank, or write --exact-form"
            )
    factored = [t.name for t in targets if t.kind == "factored"]
    if factored:
        log.warning("%s are factored modules: PEFT cannot attach LoRA to them; apply the adapter with "
                    "compress eval --adapter, or to the export-dense of the checkpoint", first_few(factored))


def residual(original: Target, compressed: Target) -> torch.Tensor:
    """ΔW = W − Ŵ as (out, in), float64 on the CPU."""
    w = original.weight().to("cpu", torch.float64)
    return w - compressed.weight().to("cpu", torch.float64)


def _block_decompositions(
    targets: list[Target],
    originals: dict[str, Target],
    grams: dict[str, Gram] | None,
    scales: dict[str, torch.Tensor] | None,
    keep: dict[str, int],
    dtype: torch.dtype,
    values_only: bool = False,
) -> dict[str, tuple[Decomposition, torch.Tensor]]:
    roots = {} if grams is None else gram_roots(grams, [t.name for t in targets if t.shape[0] > t.shape[1]], dtype)
    result = {}
    for t in targets:
        delta = residual(originals[t.name], t)
        if grams is None:
            d = svd_decomposition(delta)
        else:
            d = whitened_decomposition(
                delta,
                gram=grams[t.name].matrix,
                root=roots.get(t.name),
                scale=None if scales is None else scales[t.name],
                values_only=values_only,
                keep=keep[t.name],
                dtype=dtype,
            )
        result[t.name] = (d, delta)
        release(originals[t.name].module.parameters())
    return result


def correction(
    delta: torch.Tensor,
    rank: int,
    gram: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> LowRankTerm:
    """The rank-``rank`` B·A closest to ``delta`` [out, in] in the metric of the inputs' Gram
    ``gram`` (plain SVD without one), outputs weighted by ``scale`` where given."""
    if gram is None:
        d = svd_decomposition(delta)
    else:
        d = whitened_decomposition(delta, gram=gram, scale=scale, keep=min(rank, *delta.shape), dtype=dtype)
    return _correction(d, delta, rank)


def _correction(d: Decomposition, delta: torch.Tensor, rank: int) -> LowRankTerm:
    b, a = d.factors(delta, rank, torch.float32)
    return LowRankTerm(b, a)


def compensate_model(
    original: nn.Module,
    compressed: nn.Module,
    targets: list[Target],
    options: CompensateOptions,
    calibration: CalibrationSet | None,
) -> CompensateOutcome:
    """The corrections of ``targets`` (modules of ``compressed``) toward ``original``'s weights.

    ``compressed`` is left as it was (corrections are applied only while the passes run)."""
    start = time.perf_counter()
    check_targets(options, targets)
    originals = matching_originals(original, targets)
    if options.needs_calibration and calibration is None:
        raise UsageError(f"--method {options.method} --alloc {options.alloc} needs calibration data")
    compute_dtype = resolve_calib_dtype(options.calib_dtype, compressed)
    ran_in = str(compute_dtype or next(compressed.parameters()).dtype).removeprefix("torch.")
    fisher = None
    fisher_windows = None
    if options.needs_fisher:
        if has_lm_head(compressed):
            windows = calibration.batches(1)[: options.fisher_windows]
            fisher_windows = len(windows)
            fisher = output_fisher(compressed, targets, windows, compute_dtype)
        else:
            fallbacks = [f for f, used in (("--method fisher falls back to eora", options.method == "fisher"),
                                            ("--alloc global to uniform", options.alloc == "global")) if used]
            log.warning("%s has no language-model head to take loss gradients from: %s", type(compressed).__name__,
                        ", ".join(fallbacks))
            options = replace(
                options, method="eora" if options.method == "fisher" else options.method, alloc="uniform"
            )
    scales = {name: fisher_scale(v) for name, v in fisher.items()} if options.method == "fisher" else None
    data_aware = options.method != "svd"
    dtype = decomposition_dtype(compute_dtype)
    caps = {t.name: min(min(t.shape), GLOBAL_RANK_CAP * options.rank) for t in targets}

    if options.alloc == "uniform":
        ranks = {t.name: options.rank for t in targets}
        pass1 = None
    else:
        # Pass 1: every residual's spectrum in the method's metric, on the uncorrected model.
        pass1 = _one_shot(compressed, targets, originals, calibration if data_aware else None, scales, caps,
                          compute_dtype, dtype, values_only=options.sequential)
        shapes = [t.shape for t in targets]
        energies = [pass1[t.name].sv.to(torch.float64) ** 2 for t in targets]
        if options.method == "fisher" or fisher is None:
            weights = None  # fisher energies already are predicted loss
        else:
            per_layer = layer_sensitivities(fisher)
            weights = [per_layer[t.name] for t in targets]
        budget = sum(options.rank * (m + n) for m, n in shapes)
        plan = allocate.budget_ranks(energies, shapes, budget, [caps[t.name] for t in targets], weights)
        ranks = {t.name: r for t, r in zip(targets, plan)}

    corrections: dict[str, LowRankTerm] = {}
    results: list[ModuleResult] = []

    def record(t: Target, d: Decomposition, delta: torch.Tensor) -> None:
        r = ranks[t.name]
        if r > 0:
            corrections[t.name] = _correction(d, delta, r)
        energy = float((d.sv.to(torch.float64) ** 2).sum())
        results.append(ModuleResult(t.name, t.shape, r, energy, d.discarded(r)))

    if options.sequential and data_aware:
        for step in iterate_blocks(compressed, calibration.batches(CALIBRATION_BATCH), targets, "compensating", compute_dtype):
            grams = step.collect_grams()
            keep = {t.name: max(ranks[t.name], 1) for t in step.targets}
            decs = _block_decompositions(step.targets, originals, grams, scales, keep, dtype)
            new = {}
            for t in step.targets:
                d, delta = decs[t.name]
                record(t, d, delta)
                if t.name in corrections:
                    new[t.name] = corrections[t.name]
            # The block's outputs, the next block's inputs, come from the corrected block.
            with terms_applied(compressed, new):
                step.outputs()
    elif pass1 is not None:  # one-shot, or svd (whose pass 1 is all there is to it)
        for t in targets:
            d = pass1[t.name]
            record(t, d, residual(originals[t.name], t))
    else:
        decs = _one_shot(compressed, targets, originals, calibration if data_aware else None, scales,
                         {t.name: max(ranks[t.name], 1) for t in targets}, compute_dtype, dtype)
        for t in targets:
            record(t, decs[t.name], residual(originals[t.name], t))
    by_name = {m.name: m for m in results}
    modules = [by_name[t.name] for t in targets]
    return CompensateOutcome(options, corrections, modules, time.perf_counter() - start, ran_in, fisher_windows)


def _one_shot(
    compressed: nn.Module,
    targets: list[Target],
    originals: dict[str, Target],
    calibration: CalibrationSet | None,
    scales: dict[str, torch.Tensor] | None,
    keep: dict[str, int],
    compute_dtype: torch.dtype | None,
    dtype: torch.dtype,
    values_only: bool = False,
) -> dict[str, Decomposition]:
    """Every target's residual decomposed on the uncorrected compressed model's inputs, its
    singular vectors kept up to ``keep`` (none with ``values_only``)."""
    out: dict[str, Decomposition] = {}
    if calibration is None:
        for t in track(targets, description="decomposing residuals"):
            d = svd_decomposition(residual(originals[t.name], t))
            out[t.name] = d.truncated(keep[t.name], torch.float64)
        return out
    batches = calibration.batches(CALIBRATION_BATCH)
    for step in iterate_blocks(compressed, batches, targets, "calibrating, decomposing", compute_dtype):
        grams = step.collect_grams(block_final=True)
        for name, (d, _) in _block_decompositions(step.targets, originals, grams, scales, keep, dtype, values_only).items():
            out[name] = d if values_only else d.truncated(keep[name], torch.float64)
    return out

