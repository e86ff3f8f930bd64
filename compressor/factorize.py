"""LoRD factorization of a model's targets: decompose, plan ranks under a budget, swap in B·A.

Pass 1 runs the original model block by block and decomposes every target: in the ``fisher``
metric (whitened by its calibration Gram and weighted per output unit by the loss's mean squared
gradient, from one backward pass over a few windows), whitened only, or plain. The rank plan
is made from those spectra. Then either the pass-1 decompositions are cut to the plan
(one-shot, the default), or, with ``sequential``, a second pass re-whitens each block on the
inputs that the already-factored blocks before it produce: up to 3 % lower perplexity at strong
compression, for twice the time (docs/factorize.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from compressor import distributed
from compressor.architecture import has_lm_head
from compressor.calibration.grams import Gram, gram_roots
from compressor.calibration.sources import CalibrationSet
from compressor.errors import UsageError
from compressor.math import allocate
from compressor.math.factorize import Decomposition, svd_decomposition, whitened_decomposition
from compressor.pipeline import CALIBRATION_BATCH, iterate_blocks
from compressor.options import FactorizeOptions
from compressor.precision import decomposition_dtype, resolve_calib_dtype
from compressor.progress import track
from compressor.residency import Spill, release
from compressor.streaming import weights_of
from compressor.sensitivity import fisher_scale, layer_sensitivities, output_fisher
from compressor.targets import Target

log = logging.getLogger(__name__)

@dataclass
class ModulePlan:
    name: str
    layer_type: str
    block: int | None
    shape: tuple[int, int]
    rank: int | None  # None: stays dense
    energy: float  # Σσ² of the (whitened) spectrum
    discarded: float  # predicted Σ of the dropped σ²

    @property
    def params_before(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def params_after(self) -> int:
        return allocate.cost(self.rank, self.shape)

    @property
    def relative_error(self) -> float:
        return self.discarded / self.energy if self.energy > 0 else 0.0


@dataclass
class FactorizePlan:
    options: FactorizeOptions  # what ran, after any fallback (the method, the Fisher windows used)
    modules: list[ModulePlan]
    welore_threshold: float | None = None
    calibration_ran_in: str | None = None  # the matmul dtype the calibration passes ran in (what --calib-dtype resolved to)

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def kept_fraction(self) -> float:
        return self.params_after / self.params_before

    @property
    def mean_relative_error(self) -> float:
        return sum(m.relative_error for m in self.modules) / len(self.modules)

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules if m.rank is not None}

    def to_dict(self) -> dict:
        return {
            "options": asdict(self.options),
            "calibration_ran_in": self.calibration_ran_in,
            "kept_fraction": self.kept_fraction,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "predicted_mean_relative_error": self.mean_relative_error,
            "welore_threshold": self.welore_threshold,
            "modules": {
                m.name: {
                    "shape": list(m.shape),
                    "rank": m.rank,
                    "params_after": m.params_after,
                    "predicted_relative_error": m.relative_error,
                }
                for m in self.modules
            },
        }


def plan_ranks(
    options: FactorizeOptions,
    targets: list[Target],
    spectra: dict[str, torch.Tensor],
    plain: dict[str, torch.Tensor],
    fisher: dict[str, torch.Tensor] | None = None,
) -> FactorizePlan:
    """Choose every target's rank. ``spectra``: singular values in the method's metric; ``plain``: of W;
    ``fisher``: per output unit, the loss per unit of output error (``global`` allocation)."""
    shapes = [t.shape for t in targets]
    energies = [spectra[t.name].to(torch.float64) ** 2 for t in targets]
    threshold = None
    weights = [1.0 / float(e.sum()) if float(e.sum()) > 0 else 0.0 for e in energies]
    if options.alloc == "uniform":
        ranks = allocate.uniform_plan(shapes, options.target)
    elif options.alloc == "welore":
        ranks, threshold = allocate.welore_plan([plain[t.name] for t in targets], shapes, options.target)
    else:
        uniform = allocate.uniform_plan(shapes, options.target)
        floors = [int(options.floor_fraction * (r if r is not None else allocate.max_factored_rank(s))) for r, s in zip(uniform, shapes)]
        if options.alloc == "global" and fisher is not None:
            # The fisher metric's energies already are predicted loss; the others get one factor per layer.
            per_layer = layer_sensitivities(fisher)
            weights = [1.0 if options.method == "fisher" else per_layer[t.name] for t in targets]
        ranks = allocate.greedy_plan(energies, shapes, options.target, weights=weights, floors=floors)
    if options.target < 1:
        ranks = allocate.fill_budget(ranks, energies, shapes, options.target, weights)
    modules = [
        ModulePlan(
            name=t.name,
            layer_type=t.layer_type,
            block=t.block_index,
            shape=t.shape,
            rank=r,
            energy=float(e.sum()),
            discarded=allocate.discarded_energy(e, r),
        )
        for t, r, e in zip(targets, ranks, energies)
    ]
    return FactorizePlan(options, modules, threshold)


Scales = dict[str, torch.Tensor]


def _decompose_block(
    targets: list[Target],
    grams: dict[str, Gram] | None,
    scales: Scales | None = None,
    values_only: bool = False,
    keep: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float64,
    done: Callable[[Target], None] | None = None,
    kept: Callable[[Decomposition, Target], Decomposition] | None = None,
) -> dict[str, Decomposition]:
    """``keep``: per target, the highest rank whose singular vectors are needed (default: all that
    can save parameters); ``dtype``: of the whitened decompositions. ``done(target)``: called once a
    target is decomposed, after which its weight is not read here again, and each Gram is freed
    after its last module (the caller needs neither any more). ``kept``: what to keep of each
    decomposition, applied as soon as it is made.

    The targets with the widest Grams go first: their Grams (an 8192-wide down_proj's is most
    of a LLaMA-1B block's) are let go before the others' decompositions need memory of their own."""
    if grams is None:
        return {t.name: svd_decomposition(t.weight()) for t in targets}
    # Under torchrun each process decomposes its share of the block's targets; all get every
    # result, and each keeps them after the gathering (a spilled tensor arrives as a copy).
    keep_now = None if distributed.active() else kept

    def decompose(names: list[str]) -> dict[str, Decomposition]:
        mine = sorted((t for t in targets if t.name in set(names)), key=lambda t: -grams[t.name].dim)
        # Only a matrix with more outputs than inputs needs the whitening root (whitened_decomposition).
        roots = gram_roots(grams, [t.name for t in mine if t.shape[0] > t.shape[1] and not grams[t.name].of_outputs], dtype)
        found = {}
        for i, t in enumerate(mine):
            gram = grams[t.name]
            made = whitened_decomposition(
                t.weight(),
                gram=None if gram.of_outputs else gram.packed,
                output_gram=gram.matrix if gram.of_outputs else None,
                root=roots.get(t.name),
                scale=None if scales is None else scales[t.name],
                values_only=values_only,
                keep=allocate.max_factored_rank(t.shape) if keep is None else keep[t.name],
                dtype=dtype,
            )
            found[t.name] = made if keep_now is None else keep_now(made, t)
            del made
            if done is not None:
                done(t)
                if not any(grams[later.name] is gram for later in mine[i + 1 :]):
                    gram.free()  # its last module is decomposed: its memory goes before the next one's work
        return found

    found = distributed.split_work([t.name for t in targets], decompose)
    if kept is not None and keep_now is None:
        by_name = {t.name: t for t in targets}
        found = {name: kept(d, by_name[name]) for name, d in found.items()}
    return found


def decompose_all(
    model: nn.Module,
    targets: list[Target],
    calibration: CalibrationSet | None,
    scales: Scales | None = None,
    values_only: bool = False,
    compute_dtype: torch.dtype | None = None,
    spill: Spill | None = None,
) -> dict[str, Decomposition]:
    """Pass 1: every target decomposed on the original model (kept only up to useful ranks).

    ``scales``: the output weights of the fisher metric; ``values_only``: spectra without
    singular vectors, all a sequential run needs from this pass; ``compute_dtype``: of the
    forward passes; ``spill``: where the singular vectors go, instead of staying in memory
    (SmolLM2's take 0.33 GB)."""

    def kept(d: Decomposition, target: Target) -> Decomposition:
        d = d.truncated(allocate.max_factored_rank(target.shape), torch.float32)
        return d if spill is None else d.held_by(spill)

    if calibration is None:
        found = {}
        for t in track(targets, description="decomposing"):
            with weights_of(model).holding(t.module):
                found[t.name] = kept(svd_decomposition(t.weight()), t)
        return found
    decompositions = {}
    batches = calibration.batches(CALIBRATION_BATCH)
    dtype = decomposition_dtype(compute_dtype)
    store = weights_of(model)
    for step in iterate_blocks(model, batches, targets, "calibrating, decomposing", compute_dtype, spill):
        # the next block's inputs are made: weights only for the math now
        grams = step.collect_grams(block_final=True)
        decompositions.update(
            _decompose_block(step.targets, grams, scales, values_only, dtype=dtype, done=lambda t: store.unload(t.module), kept=kept)
        )
    return decompositions


def factor_targets(
    model: nn.Module,
    targets: list[Target],
    plan: FactorizePlan,
    decompositions: dict[str, Decomposition] | None,
    calibration: CalibrationSet | None,
    scales: Scales | None = None,
    compute_dtype: torch.dtype | None = None,
    spill: Spill | None = None,
) -> dict[str, float]:
    """Swap each planned target for its factors. Returns the measured whitened error per module
    when the decomposition is re-made in sequential mode, else the pass-1 predictions.
    ``spill``: where the factors go once made, instead of staying in memory."""
    from compressor.formats.factored import apply_factors

    by_name = {m.name: m for m in plan.modules}
    errors: dict[str, float] = {}
    store = weights_of(model)

    def factor(step_targets: list[Target], decs: dict[str, Decomposition]) -> None:
        factors = {}
        planned = [t for t in step_targets if by_name[t.name].rank is not None]
        with store.holding([t.module for t in planned]):  # the weights, for A = (D·U_r)ᵀ·W and the biases
            for t in planned:
                rank = by_name[t.name].rank
                d = decs[t.name]
                factors[t.name] = d.factors(t.weight(), rank, store.dtype_of(t.module))
                errors[t.name] = d.discarded(rank)
                release([d.u, *([] if d.vh is None else [d.vh])])
            apply_factors(model, factors, dtype=store.dtype_of(planned[0].module) if planned else None)
        if spill is not None:
            for name in factors:
                module = model.get_submodule(name)
                module.weight_a.data = spill.hold(module.weight_a)
                module.weight_b.data = spill.hold(module.weight_b)

    if not plan.options.sequential or calibration is None:
        assert decompositions is not None
        for t in track(targets, description="factoring"):
            factor([t], decompositions)
        return errors
    batches = calibration.batches(CALIBRATION_BATCH)
    dtype = decomposition_dtype(compute_dtype)
    for step in iterate_blocks(model, batches, targets, "sequential factoring", compute_dtype, spill):
        factored = [t for t in step.targets if by_name[t.name].rank is not None]
        ranks = {t.name: by_name[t.name].rank for t in factored}
        if factored:  # a block whose targets all stay dense needs no statistics
            grams = step.collect_grams(only=factored)
            factor(factored, _decompose_block(factored, grams, scales, keep=ranks, dtype=dtype, done=lambda t: None))
    return errors


@dataclass
class FactorizeOutcome:
    plan: FactorizePlan
    model_params_before: int
    model_params_after: int
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def model_fraction(self) -> float:
        return self.model_params_after / self.model_params_before


def count_params(model: nn.Module) -> int:
    """Parameters of the model, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def factorize_model(
    model: nn.Module,
    targets: list[Target],
    options: FactorizeOptions,
    calibration: CalibrationSet | None,
    dry_run: bool = False,
    decompositions: dict[str, Decomposition] | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
    spill: Spill | None = None,
) -> FactorizeOutcome:
    """Factor ``targets`` of ``model`` in place (unless ``dry_run``).

    ``decompositions`` from an earlier :func:`decompose_all` of the same weights, calibration
    and metric, and ``fisher`` from an earlier :func:`output_fisher`, may be passed to skip
    that work (benchmarks reuse them across targets). ``spill``: keep the factors, and one-shot's
    pass-1 singular vectors, in files there rather than in memory (the model then reads its
    factors from those files).
    """
    if options.needs_calibration and calibration is None:
        raise UsageError(f"--method {options.method} --alloc {options.alloc} needs calibration data")
    start = time.perf_counter()
    before = count_params(model)
    compute_dtype = resolve_calib_dtype(options.calib_dtype, model)
    ran_in = str(compute_dtype or next(model.parameters()).dtype).removeprefix("torch.")  # recorded as what ran
    if options.needs_fisher and fisher is None:
        if has_lm_head(model):
            windows = calibration.batches(1)[: options.fisher_windows]
            options = replace(options, fisher_windows=len(windows))  # recorded as what ran
            fisher = output_fisher(model, targets, windows, compute_dtype)
        else:
            log.warning("%s has no language-model head to take loss gradients from: %s", type(model).__name__,
                        "--method fisher falls back to whiten, --alloc global to relative errors")
            options = replace(
                options,
                method="whiten" if options.method == "fisher" else options.method,
                alloc="relative" if options.alloc == "global" else options.alloc,
            )
    scales = {name: fisher_scale(v) for name, v in fisher.items()} if options.method == "fisher" else None
    whitened = options.method != "svd"
    sequential = options.sequential and whitened
    own_decompositions = decompositions is None
    if decompositions is None:
        decompositions = decompose_all(
            model, targets, calibration if whitened else None, scales, sequential or dry_run, compute_dtype, spill
        )
    spectra = {t.name: decompositions[t.name].sv for t in targets}
    plain = spectra if options.method == "svd" else {}
    if options.alloc == "welore" and whitened:
        plain = {}
        for t in targets:
            with weights_of(model).holding(t.module):
                plain[t.name] = torch.linalg.svdvals(t.weight().to("cpu", torch.float64))
    plan = plan_ranks(options, targets, spectra, plain, fisher)
    plan.calibration_ran_in = ran_in
    after = before - plan.params_before + plan.params_after
    if dry_run or (not sequential and not distributed.is_main()):  # one-shot: process 0 alone factors and writes
        return FactorizeOutcome(plan, before, after, time.perf_counter() - start)
    if sequential:
        if own_decompositions:
            decompositions.clear()
        errors = factor_targets(model, targets, plan, None, calibration, scales, compute_dtype, spill)
    else:
        errors = factor_targets(model, targets, plan, decompositions, None, spill=spill)
    return FactorizeOutcome(plan, before, count_params(model), time.perf_counter() - start, errors)
