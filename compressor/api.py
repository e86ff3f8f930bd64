"""The Python API: what the CLI calls, usable on its own."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import importlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from compressor import __version__, distributed
from compressor.analysis import Analysis, analyze_model, summarize
from compressor.calibration.sources import CalibrationSet, load_calibration, read_text, tokenize_text
from compressor.device import resolve_device
from compressor.errors import InvalidInputError, UsageError
from compressor.evaluate import PerplexityResult, perplexity
from compressor import loading
from compressor.loading import LoadedModel
from compressor.math.spectra import all_finite
from compressor.precision import resolve_calib_dtype
from compressor.options import CalibrationOptions, CompensateOptions, FactorizeOptions, check_calib_dtype, check_target
from compressor.options import QuantizeOptions
from compressor.progress import track
from compressor.residency import return_free_heap
from compressor.streaming import materialized
from compressor.targets import Target, select_targets

if TYPE_CHECKING:
    from compressor.bench import BenchResult
    from compressor.compensate import CompensateOutcome
    from compressor.evaluate import Comparison
    from compressor.factorize import FactorizeOutcome


log = logging.getLogger(__name__)


def _loaded(
    model: LoadedModel | str, dtype: torch.dtype = torch.float32, device: torch.device | None = None, *, streamed: bool = False
) -> LoadedModel:
    """``model`` loaded (unless it already is), on ``device`` when one is given. ``streamed``: as a
    skeleton whose blocks are read onto ``device`` when the layer loop reaches them, where the
    checkpoint allows (:func:`loading.load_model`)."""
    if not isinstance(model, LoadedModel):
        for _ in track([model], description=f"loading {model}"):
            model = loading.load_model(model, dtype, streamed_to=(device or torch.device("cpu")) if streamed else None)
    if device is not None and not model.streamed:
        model.model.to(device)
    return model


def _input_paths(model: LoadedModel | str | Path) -> list[Path]:
    """The files and folders a MODEL spec (or a loaded model) is read from, as far as they can be
    told before it loads: a local folder or file; nothing for an alias or a hub id."""
    if isinstance(model, LoadedModel):
        source = Path(model.source)
        return [p for p in (model.folder, source if source.is_absolute() and source.exists() else None) if p is not None]
    if str(model) in loading.ALIASES:
        return []
    path = Path(model).expanduser()
    return [path] if path.exists() else []


def _destination(output: str | Path, overwrite: bool, *inputs: LoadedModel | str | Path) -> Path:
    """``output`` checked before anything loads: not one of the inputs nor inside or around one
    (writing it would replace what is read), and not a folder that may not be replaced."""
    from compressor.formats.atomic import check_destination, refuse_overlap

    refuse_overlap(output, [p for model in inputs for p in _input_paths(model)])
    return check_destination(output, overwrite)


def targets_of(
    loaded: LoadedModel, include: list[str] | None = None, exclude: list[str] | None = None, factored: bool = False
) -> list[Target]:
    targets = select_targets(loaded.model, include, exclude, factored=factored)
    if not targets:
        raise UsageError("no target modules: the --include/--exclude patterns match no linear layer")
    return targets


def evaluate(
    model: LoadedModel | str,
    data: str | Path,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "auto",
    adapter: str | Path | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on a text file by the project's protocol. ``model``: a loaded
    model, or a MODEL spec loaded in ``dtype`` once the text (and ``adapter``) have been read.
    ``adapter``: a PEFT LoRA folder added to the model first (a loaded model is changed in place)."""
    device = resolve_device(device)  # checked before anything loads
    from compressor.formats.adapter import apply_adapter, read_adapter

    text = read_text(data)
    terms = None if adapter is None else read_adapter(adapter)
    loaded = _loaded(model, dtype, device, streamed=terms is None)  # an adapter is added to a model loaded whole
    if not loaded.is_causal_lm:
        raise InvalidInputError(f"{loaded.source} is not a causal language model; perplexity needs one")
    loaded.check_seq_len(seq_len)
    if terms is not None:
        if terms.base_model and terms.base_model != loaded.source:
            log.warning("the adapter was made for %s, not %s", terms.base_model, loaded.source)
        apply_adapter(loaded.model, terms)
    ids = tokenize_text(loaded.tokenizer, text)
    result = perplexity(loaded.model, ids, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
    return dataclasses.replace(result, source=loaded.source)


def _calibration_options(calibration: CalibrationOptions | CalibrationSet | str | None) -> CalibrationOptions | CalibrationSet | None:
    """What a caller may pass as calibration: options (a SPEC string gets the default sizes), or
    windows already made by :func:`calibrate`. Checked before anything loads."""
    if isinstance(calibration, str):
        return CalibrationOptions(calibration)
    if calibration is None or isinstance(calibration, (CalibrationOptions, CalibrationSet)):
        return calibration
    raise UsageError(f"calibration must be CalibrationOptions, a SPEC string or a CalibrationSet, not {type(calibration).__name__}")


def _windows(loaded: LoadedModel, calibration: CalibrationOptions | CalibrationSet, calib_dtype: str) -> CalibrationSet:
    return calibration if isinstance(calibration, CalibrationSet) else calibrate(loaded, calibration, calib_dtype=calib_dtype)


def calibrate(loaded: LoadedModel, options: CalibrationOptions, *, calib_dtype: str = "auto") -> CalibrationSet:
    """Calibration windows; ``calib_dtype``: matmul dtype while the model generates them (``self``)."""
    loaded.check_seq_len(options.seq_len)
    compute_dtype = resolve_calib_dtype(calib_dtype, loaded.model)
    # Generating text runs the whole model for every token: a streamed model is held whole meanwhile.
    whole = materialized(loaded.model) if options.spec == "self" else contextlib.nullcontext()
    with whole:
        windows = load_calibration(options, loaded.tokenizer, loaded.model, compute_dtype=compute_dtype)
    return_free_heap()  # what tokenizing the whole text took (0.13 GB for WikiText-2 validation)
    return windows


@dataclass
class AnalyzeResult:
    analysis: Analysis
    source: str
    calibration: dict | None
    seconds: float

    def to_json(self) -> dict:
        a = self.analysis
        return {
            "tool": f"compress {__version__}",
            "model": self.source,
            "calibration": self.calibration,
            "welore": {"target": a.welore_target, "threshold": a.welore_threshold},
            "cost_curve": {
                "basis": a.cost_basis,
                "points": [vars(p) for p in a.cost_curve],
            },
            "seconds": round(self.seconds, 2),
            "modules": {m.name: m.to_dict() for m in a.modules},
        }


def analyze(
    model: LoadedModel | str,
    calibration: CalibrationOptions | CalibrationSet | str | None = None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    welore_target: float = 0.5,
    calib_dtype: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "auto",
) -> AnalyzeResult:
    """Spectra of every target; with ``calibration``, also of the activation-whitened weights.

    ``model``: a loaded model, or a MODEL spec loaded in ``dtype`` once the options are checked.
    ``calib_dtype``: matmul dtype of the calibration passes (:func:`resolve_calib_dtype`)."""
    device = resolve_device(device)  # checked before anything loads
    check_target(welore_target)
    check_calib_dtype(calib_dtype)
    calibration = _calibration_options(calibration)
    start = time.perf_counter()
    distributed.start(device)
    loaded = _loaded(model, dtype, device, streamed=True)
    targets = targets_of(loaded, include, exclude)
    windows = None if calibration is None else _windows(loaded, calibration, calib_dtype)
    modules = analyze_model(loaded.model, targets, windows, resolve_calib_dtype(calib_dtype, loaded.model))
    analysis = summarize(modules, welore_target)
    info = windows.info.to_dict() if windows is not None else None
    return AnalyzeResult(analysis, loaded.source, info, time.perf_counter() - start)


@dataclass
class FactorizeResult:
    outcome: FactorizeOutcome
    source: str
    calibration: dict | None
    output: Path | None
    file_bytes: int | None
    seconds: float
    processes: int = 1  # under torchrun, how many shared the work

    def to_json(self) -> dict:
        o = self.outcome
        return {
            "tool": f"compress {__version__}",
            "model": self.source,
            "calibration": self.calibration,
            "output": str(self.output) if self.output else None,
            "kept_fraction": o.plan.kept_fraction,
            "model_fraction": o.model_fraction,
            "model_params_before": o.model_params_before,
            "model_params_after": o.model_params_after,
            "file_bytes": self.file_bytes,
            "seconds": round(self.seconds, 2),
            "processes": self.processes,
            "plan": o.plan.to_dict(),
        }


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def factorize(
    model: LoadedModel | str,
    options: FactorizeOptions,
    calibration: CalibrationOptions | CalibrationSet | str | None = None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "auto",
) -> FactorizeResult:
    """Factor every target of ``model``; write the factored checkpoint to ``output`` unless None.

    ``model``: a loaded model, or a MODEL spec loaded in ``dtype`` once ``output`` has been found
    usable (so a folder that may not be replaced fails before anything slow). ``calibration``:
    options, a SPEC string, or windows from :func:`calibrate`; the default (``self``, 64 windows
    of 512) when None and the options need calibration.

    While it runs, the factors made so far are kept in a hidden folder beside ``output`` (on its
    disk) rather than in memory, and the model reads them from there. The folder is removed at the
    end; on Linux and macOS the model's factors stay readable (the files are gone from the folder,
    not from the disk, until the model is freed), so a caller who keeps using the model should
    reload ``output`` instead (``compressor.load``) where that disk space matters.
    """
    device = resolve_device(device)  # checked before anything loads
    from compressor.factorize import factorize_model
    from compressor.formats.atomic import scratch_dir
    from compressor.residency import Spill

    start = time.perf_counter()
    calibration = _calibration_options(calibration)
    dest = None if output is None else _destination(output, overwrite, model)
    distributed.start(device)
    loaded = _loaded(model, dtype, device, streamed=True)
    targets = targets_of(loaded, include, exclude)
    calibration_set = None
    if options.needs_calibration:
        calibration_set = _windows(loaded, calibration or CalibrationOptions(), options.calib_dtype)
    spill_folder: contextlib.AbstractContextManager = contextlib.nullcontext(None)
    if dest is not None:
        spill_folder = scratch_dir(dest, "spill")
    with spill_folder as spill:
        with _tokenizer_parked(loaded, Path(spill) if spill else None):
            outcome = factorize_model(
                loaded.model, targets, options, calibration_set, dry_run=dest is None, spill=Spill(spill) if spill else None
            )
        info = calibration_set.info.to_dict() if calibration_set is not None else None
        writes = dest is not None and distributed.is_main()  # under torchrun, process 0 alone writes
        file_bytes = _save_factorized(loaded, outcome, options, info, dest, overwrite) if writes else None
    return FactorizeResult(outcome, loaded.source, info, dest, file_bytes, time.perf_counter() - start, distributed.world_size())


@contextlib.contextmanager
def _tokenizer_parked(loaded: LoadedModel, folder: Path | None) -> Iterator[None]:
    """While the passes run, the tokenizer waits as its own files in ``folder`` rather than in
    memory (SmolLM2's takes 43 MB resident), and is loaded back from them afterwards, whatever happens."""
    tokenizer = loaded.tokenizer
    stock = type(tokenizer).__module__.startswith("transformers.")  # loads back without remote code
    if folder is None or tokenizer is None or not stock or not hasattr(tokenizer, "save_pretrained"):
        yield
        return
    import transformers

    from compressor.residency import return_free_heap

    path = folder / "tokenizer"
    tokenizer.save_pretrained(path)
    loaded.tokenizer = tokenizer = None
    return_free_heap()
    try:
        yield
    finally:
        loaded.tokenizer = transformers.AutoTokenizer.from_pretrained(path)


def _save_factorized(
    loaded: LoadedModel, outcome, options, calibration_info: dict | None, output: Path, overwrite: bool
) -> int:
    """Write the factored checkpoint; returns its size in bytes."""
    from compressor.formats.checkpoint import save_factored

    done = outcome.plan.options  # what ran, after any fallback
    metadata = {
        "method": done.method,
        "alloc": done.alloc,
        "sequential": done.sequential,
        "calib_dtype": outcome.plan.calibration_ran_in,
        **({"fisher_windows": done.fisher_windows} if done.needs_fisher else {}),
        "target": options.target,
        "kept_fraction": outcome.plan.kept_fraction,
        "calibration": calibration_info,
        "source": loaded.source,
        "tool": f"compress {__version__}",
    }
    return folder_bytes(save_factored(loaded.model, loaded.tokenizer, output, metadata, overwrite=overwrite))


@dataclass
class CompensateResult:
    outcome: CompensateOutcome
    original: str
    compressed: str
    calibration: dict | None
    output: Path | None
    seconds: float

    def to_json(self) -> dict:
        o = self.outcome
        return {
            "tool": f"compress {__version__}",
            "original": self.original,
            "compressed": self.compressed,
            "calibration": self.calibration,
            "output": str(self.output) if self.output else None,
            "options": dataclasses.asdict(o.options),
            "calibration_ran_in": o.calibration_ran_in,
            "fisher_windows": o.fisher_windows,
            "seconds": round(self.seconds, 2),
            **o.to_dict(),
        }


def compensate(
    original: LoadedModel | str,
    compressed: LoadedModel | str,
    options: CompensateOptions,
    calibration: CalibrationOptions | CalibrationSet | str | None = None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "auto",
) -> CompensateResult:
    """EoRA-style corrections that bring ``compressed`` back toward ``original``, written to
    ``output`` as a PEFT LoRA adapter for ``compressed`` (unless None).

    The compressed model is loaded first and the rank checked against its modules before the
    original loads or any calibration runs. Calibration windows come from the original model's
    tokenizer (and, for ``self``, its generations); the default is ``self`` with 64 windows of 512.
    """
    device = resolve_device(device)  # checked before anything loads
    from compressor.compensate import check_targets, compensate_model, matching_originals
    from compressor.formats.adapter import save_adapter

    start = time.perf_counter()
    calibration = _calibration_options(calibration)
    dest = None if output is None else _destination(output, overwrite, original, compressed)
    small = _loaded(compressed, dtype, device)
    targets = targets_of(small, include, exclude, factored=True)
    check_targets(options, targets)
    big = _loaded(original, dtype, device)
    matching_originals(big.model, targets)  # before calibration, which may generate text for minutes
    windows = None
    if options.needs_calibration:
        windows = _windows(big, calibration or CalibrationOptions(), options.calib_dtype)
    outcome = compensate_model(big.model, small.model, targets, options, windows)
    info = windows.info.to_dict() if windows is not None else None
    if dest is not None:
        metadata = {
            "tool": f"compress {__version__}",
            "original": big.source,
            "compressed": small.source,
            "options": dataclasses.asdict(outcome.options),
            "calibration": info,
            "calibration_ran_in": outcome.calibration_ran_in,
            "fisher_windows": outcome.fisher_windows,
            "mean_relative_error": outcome.mean_relative_error,
        }
        linear_names = [t.name for t in select_targets(small.model, include=["*"], factored=True)]
        save_adapter(
            dest,
            outcome.corrections,
            base_model=small.source,
            serve_form=options.serve_form,
            fan_in_fan_out=any(t.kind == "conv1d" for t in targets),
            model_linear_names=linear_names,
            metadata=metadata,
            overwrite=overwrite,
        )
    return CompensateResult(outcome, big.source, small.source, info, dest, time.perf_counter() - start)


@dataclass
class QuantizeResult:
    source: str
    options: QuantizeOptions
    modules: list[str]  # the layers the checkpoint holds quantized
    calibration: dict | None
    output: Path
    file_bytes: int
    seconds: float

    def to_json(self) -> dict:
        o = self.options
        return {
            "tool": f"compress {__version__}",
            "model": self.source,
            "method": o.method,
            "bits": o.bits,
            "group_size": o.group_size,
            "sym": o.sym,
            "checkpoint_format": "gptq",
            "calibration": self.calibration,
            "output": str(self.output),
            "quantized_modules": len(self.modules),
            "modules": self.modules,
            "file_bytes": self.file_bytes,
            "seconds": round(self.seconds, 2),
        }


def quantize(
    model: LoadedModel | str,
    options: QuantizeOptions,
    calibration: CalibrationOptions | CalibrationSet | str | None = None,
    *,
    output: str | Path,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "auto",
) -> QuantizeResult:
    """Quantize the linear layers of the blocks to ``options.bits`` and write a GPTQ checkpoint
    (``checkpoint_format`` "gptq", v1) to ``output``.

    ``model``: a loaded model, or a MODEL spec loaded in ``dtype`` once ``output`` has been found
    usable (and, for ``gptq``, GPTQModel found). ``rtn`` needs no calibration, refuses layers that
    cannot be packed before it quantizes any, and leaves a loaded model holding the dequantized
    weights, exactly what the checkpoint decodes to. ``gptq`` runs GPTQModel on ``calibration``
    (the default ``self``, 64 windows of 512, when None) and leaves the model as it was.
    """
    device = resolve_device(device)  # checked before anything loads
    start = time.perf_counter()
    calibration = _calibration_options(calibration)
    dest = _destination(output, overwrite, model)
    backend = _gptqmodel_backend(options) if options.method == "gptq" else None
    loaded = _loaded(model, dtype, device)
    info = None
    if backend is not None:
        from compressor.formats.gptq import validate_gptq_folder

        windows = _windows(loaded, calibration or CalibrationOptions(), options.calib_dtype)
        backend.quantize_with_gptqmodel(loaded, options, windows, dest, overwrite=overwrite)
        info = windows.info.to_dict()
        modules = sorted(validate_gptq_folder(dest).modules)
    else:
        modules = _quantize_rtn(loaded, options, dest, overwrite)
    return QuantizeResult(loaded.source, options, modules, info, dest, folder_bytes(dest), time.perf_counter() - start)


def _gptqmodel_backend(options: QuantizeOptions):
    """compressor.quantize_gptqmodel, its options checked; UsageError with the install command
    when it (or GPTQModel) is missing. Called before the model loads."""
    try:
        quantize_gptqmodel = importlib.import_module("compressor.quantize_gptqmodel")
    except ModuleNotFoundError as e:
        if e.name != "compressor.quantize_gptqmodel" and (e.name or "").split(".")[0] != "gptqmodel":
            raise
        raise UsageError(f"--method gptq needs GPTQModel: pip install -e '.[gptq]' ({e})") from e
    quantize_gptqmodel.check_options(options)
    return quantize_gptqmodel


def _quantize_rtn(loaded: LoadedModel, options: QuantizeOptions, output: Path, overwrite: bool) -> list[str]:
    from compressor.formats.gptq import GptqConfig, save_gptq
    from compressor.quantize import quantize_rtn

    outcome = quantize_rtn(targets_of(loaded), options)
    meta = {
        "quantizer": [f"compress:{__version__}"],
        "method": "rtn",
        "source": loaded.source,
        "tool": f"compress {__version__}",
    }
    config = GptqConfig(bits=options.bits, group_size=options.group_size, sym=options.sym, meta=meta)
    save_gptq(loaded.model, loaded.tokenizer, output, outcome.quantized, config, overwrite=overwrite)
    return outcome.modules


@dataclass
class VerifyResult:
    path: Path
    ranks: dict[str, int]
    tensors: int
    comparison: Comparison | None = None

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "factored_modules": len(self.ranks),
            "tensors": self.tensors,
            "comparison": self.comparison.to_dict() if self.comparison else None,
        }


def verify(
    path: str | Path,
    *,
    against: LoadedModel | str | None = None,
    data: str | Path | None = None,
    seq_len: int = 512,
    max_windows: int | None = 8,
    batch_size: int = 4,
    device: str | torch.device = "auto",
) -> VerifyResult:
    """Check a factored checkpoint: tensors present and finite, shapes as recorded, loads.

    With ``against`` and ``data``: perplexity of both and top-1 next-token agreement.
    """
    from safetensors import safe_open

    from compressor.errors import NumericalError
    from compressor.evaluate import compare
    from compressor.formats.checkpoint import load_factored, validate_factored_folder

    if against is not None and data is None:
        raise UsageError("--against needs --data to compare on")
    device = resolve_device(device)
    text = None if data is None else read_text(data)
    folder = validate_factored_folder(path)  # names, shapes and ranks, from the headers
    for file in track(folder.files, description="checking tensors"):  # values: finite
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not all_finite(tensor):
                        raise NumericalError(f"{file.name}: tensor {key} contains NaN or Inf")
        except (OSError, ValueError, RuntimeError) as e:
            if isinstance(e, NumericalError):
                raise
            raise InvalidInputError(f"cannot read {file}: {e}") from e
    model, tokenizer = load_factored(folder)
    result = VerifyResult(folder.path, folder.ranks, len(folder.tensors))
    if against is not None:
        model.to(device)
        reference = _loaded(against, device=device)
        ids = tokenize_text(reference.tokenizer, text)
        result.comparison, _ = compare(model, reference.model, ids, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
    return result


def export_dense(path: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Merge every B·A back into a plain weight; write a checkpoint any tool loads."""
    from compressor.formats.atomic import atomic_dir
    from compressor.formats.checkpoint import load_factored
    from compressor.formats.factored import export_dense as merge

    _destination(output, overwrite, path)  # before the load; atomic_dir checks again before its rename
    model, tokenizer = load_factored(path)
    merge(model)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(output)


@dataclass
class CheckResult:
    comparison: Comparison | None  # None for a run that only made a baseline
    checks: list  # of compressor.check.MetricCheck
    original: str
    compressed: str | None
    adapter: str | None
    data: str
    baseline: str | None  # the baseline file read, when the original was not run
    saved_baseline: str | None
    seconds: float

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict:
        c = self.comparison
        return {
            "tool": f"compress {__version__}",
            "original": self.original,
            "compressed": self.compressed,
            "adapter": self.adapter,
            "data": self.data,
            "baseline": self.baseline,
            "saved_baseline": self.saved_baseline,
            "seq_len": c.seq_len if c else None,
            "windows": c.windows if c else None,
            "tokens": c.tokens if c else None,
            "kl_method": c.kl_method if c else None,
            "passed": self.passed,
            "failed": [m.name for m in self.failures],
            "metrics": {m.name: m.to_dict() for m in self.checks},
            "seconds": round(self.seconds, 2),
        }


def check(
    original: LoadedModel | str,
    compressed: LoadedModel | str | None,
    data: str | Path,
    *,
    adapter: str | Path | None = None,
    thresholds=None,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "auto",
    baseline: str | Path | None = None,
    save_baseline: str | Path | None = None,
) -> CheckResult:
    """Compare ``compressed`` (plus ``adapter``) with ``original`` on the windows of ``data``:
    both perplexities, their ratio, the mean KL divergence, top-1 agreement, each against its
    threshold (:class:`compressor.check.Thresholds`).

    With ``baseline`` (a file an earlier run wrote with ``save_baseline``) the original is not
    loaded: its predictions come from the file and the KL is estimated from them (within 0.6 %
    of the exact value on SmolLM2). With ``compressed`` None, only ``save_baseline`` is written.
    Everything given is read and checked before a model loads."""
    device = resolve_device(device)  # checked before anything loads
    from compressor.check import Thresholds, judge
    from compressor.evaluate import compare
    from compressor.formats.adapter import apply_adapter, read_adapter
    from compressor.formats.baseline import baseline_json, read_baseline
    from compressor.report import write_json

    start = time.perf_counter()
    thresholds = thresholds or Thresholds()
    if compressed is None and save_baseline is None:
        raise UsageError("give the COMPRESSED model to check, or --save-baseline to only record the original")
    if compressed is None and adapter is not None:
        raise UsageError("--adapter needs the COMPRESSED model it applies to")
    if baseline is not None and save_baseline is not None:
        raise UsageError("--baseline and --save-baseline together: the baseline is only saved from a run of the original")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    text = read_text(data)
    stats = None
    if baseline is not None:
        stats, meta = read_baseline(baseline)
        if meta.get("model") and isinstance(original, str) and meta["model"] != _source_name(original):
            log.warning("the baseline was made from %s, not %s", meta["model"], original)
    terms = None if adapter is None else read_adapter(adapter)
    small = None if compressed is None else _loaded(compressed, dtype, device)
    if small is not None and not small.is_causal_lm:
        raise InvalidInputError(f"{small.source} is not a causal language model; check needs one")
    if terms is not None:
        apply_adapter(small.model, terms)
    big = None
    if stats is None:
        big = _loaded(original, dtype, device)
        if not big.is_causal_lm:
            raise InvalidInputError(f"{big.source} is not a causal language model; check needs one")
    for loaded in (big, small):
        if loaded is not None:
            loaded.check_seq_len(seq_len)
    tokenizer = (big or small).tokenizer
    if tokenizer is None:
        raise InvalidInputError(f"{(big or small).source} has no tokenizer to read {data} with")
    ids = tokenize_text(tokenizer, text)
    comparison, recorded = compare(
        None if small is None else small.model, None if big is None else big.model, ids,
        seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, baseline=stats,
        record=save_baseline is not None,
    )
    original_name = big.source if big is not None else _source_name(original)
    if recorded is not None:
        meta = {"tool": f"compress {__version__}", "model": original_name, "data": str(data), "dtype": str(dtype).removeprefix("torch.")}
        write_json(save_baseline, baseline_json(recorded, meta))
    checks = [] if comparison is None else judge(comparison, thresholds)
    return CheckResult(
        comparison, checks, original_name, None if small is None else small.source,
        None if adapter is None else str(adapter), str(data),
        None if baseline is None else str(baseline), None if save_baseline is None else str(save_baseline),
        time.perf_counter() - start,
    )


def _source_name(spec: LoadedModel | str) -> str:
    """What loading ``spec`` would record as its source, without loading it."""
    if isinstance(spec, LoadedModel):
        return spec.source
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def bench(
    model: str | None = None,
    *,
    shapes: str | None = None,
    tokens: str | list[int] = "1,4,16,64",
    target: float = 0.5,
    new_tokens: int = 32,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "auto",
    kernels: str = "auto",
    rounds: int = 10,
) -> "BenchResult":
    """Time factored (and dense + rank-64-corrected) layers against dense, per shape ``OUTxINxR,…``
    (default: LLaMA-3-8B's shapes at kept fractions 0.5 and 0.8, unless a MODEL is given alone), and
    with MODEL the decode speed of the model dense and factored to ``target``. ``dtype``: bfloat16 on
    CUDA and float32 on the CPU by default; ``kernels``: auto, triton or torch."""
    from compressor import bench as timing
    from compressor.kernels import use_kernels

    check_target(target)
    if new_tokens < 1:
        raise UsageError(f"--new-tokens must be at least 1, got {new_tokens}")
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    counts = timing.parse_tokens(tokens) if isinstance(tokens, str) else list(tokens)
    device = resolve_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({threads} thread{'s' if threads != 1 else ''})"
    result = timing.BenchResult(device=name, kernels=kernels)
    with use_kernels(kernels):
        if shapes is not None or model is None:
            parsed = timing.parse_shapes(shapes or timing.DEFAULT_SHAPES)
            result.shapes = timing.bench_shapes(parsed, counts, dtype, device, rounds)
        if model is not None:
            result.decode = timing.bench_decode(model, target, counts, new_tokens, dtype, device)
    return result
