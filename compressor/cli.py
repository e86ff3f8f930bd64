"""The ``compress`` command line: parse, call the API, render, map errors to exit codes."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from compressor import __version__
from compressor.errors import EXIT_INTERRUPTED, CompressError, OutOfResourcesError, UsageError
from compressor.options import CalibrationOptions, CompensateOptions, FactorizeOptions
from compressor.options import DEVICE_HELP, QuantizeOptions
from compressor.progress import reporting_to

try:  # typer ≥ 0.20 vendors click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

T = TypeVar("T")
EXIT_INTERNAL = 70
CALIBRATION = CalibrationOptions()  # the defaults of the calibration flags

app = typer.Typer(
    name="compress",
    help="Compress Hugging Face language models: analyze spectra, factorize, compensate, check.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
_state = {"debug": os.environ.get("COMPRESS_DEBUG", "") not in ("", "0")}

ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="A model folder (safetensors), a .gguf file, a Hugging Face hub id, or the alias smollm2-135m.",
        show_default=False,
    ),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weights dtype: float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help=f"Where the models and the computation run: {DEVICE_HELP}")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per window.")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON to this path.")]
CalibOpt = Annotated[
    str,
    typer.Option(
        "--calib",
        help="Calibration: a .txt or .jsonl file, hf:NAME[:CONFIG[:SPLIT]], or self (text the model generates).",
    ),
]
CalibSamplesOpt = Annotated[int, typer.Option("--calib-samples", min=1, help="Calibration windows.")]
CalibDtypeOpt = Annotated[
    str,
    typer.Option(
        "--calib-dtype",
        help="Matmul dtype of the calibration forward passes: auto (bfloat16 autocast for a float32 model "
        "where the hardware has native bfloat16, else the model's dtype), float32 or bfloat16.",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
IncludeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--include", help="Glob over module names to target (repeatable); default: the linear layers of the blocks."),
]
ExcludeOpt = Annotated[
    Optional[list[str]], typer.Option("--exclude", help="Glob over module names to leave alone (repeatable).")
]


class RichProgressSink:
    """Renders the library's progress reports as rich progress bars on stderr."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )

    def __enter__(self) -> "RichProgressSink":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        task = self.progress.add_task(description, total=total)
        for item in items:
            yield item
            self.progress.advance(task)


# Warnings of dependencies that say nothing about the user's run: torchao (installed with the gptq
# extra) on its CUDA-only libraries, torch on a deprecation inside torchao's import.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _running() -> Iterator[None]:
    """What every command runs in: libraries set up for a run, and the library's progress reports
    shown as rich bars on stderr. Commands enter it in their bodies, so that ``--help`` and bad
    flags answer without importing torch or transformers."""
    for name in _NOISY_LOGGERS:  # before the imports that make them speak
        logging.getLogger(name).setLevel(logging.ERROR)
    from compressor.loading import allowing_pickle
    from compressor.residency import bound_kernel_caches, fix_mmap_threshold

    bound_kernel_caches()  # before the process's first bfloat16 product
    fix_mmap_threshold()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    # huggingface_hub's logger has a stream handler of its own and also propagates to the root
    # logger's: without this, each of its warnings would be printed twice.
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        hub_logger.removeHandler(handler)
    pickle = allowing_pickle() if _state.get("allow_pickle") else contextlib.nullcontext()
    if _secondary_process():  # under torchrun, process 0 alone reports; the others only say what fails
        out.quiet = True
        logging.getLogger().setLevel(logging.ERROR)
        with pickle:
            yield
        return
    with pickle, RichProgressSink(err) as sink, reporting_to(sink):
        yield


def _secondary_process() -> bool:
    """One of several processes torchrun started, other than the first (RANK 0)."""
    from compressor import distributed

    return distributed.launched() and os.environ.get("RANK", "0") != "0"


def _torch_dtype(name: str):
    from compressor.loading import parse_dtype

    return parse_dtype(name)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"compress {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Load pickle weights (pytorch_model.bin) from folders without safetensors; unpickling can run "
            "code, so only for files you trust (loaded with torch's weights_only=True).",
        ),
    ] = False,
) -> None:
    if debug:
        _state["debug"] = True
    _state["allow_pickle"] = allow_pickle  # every run says anew (run() may be called again in one process)


@app.command("eval")
def eval_command(
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", help="A text file, read whole (e.g. wikitext2-raw-test.txt).")],
    seq_len: SeqLenOpt = CALIBRATION.seq_len,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", min=1, help="Evaluate only the first N windows.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")] = 4,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    adapter: Annotated[
        Optional[Path], typer.Option("--adapter", help="A PEFT LoRA adapter folder (e.g. from compress compensate) to apply first.")
    ] = None,
) -> None:
    """Perplexity on a text file: the whole file tokenized once, consecutive windows from the start."""
    with _running():
        from compressor import api
        from compressor.report import write_json

        result = api.evaluate(
            model, data, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, dtype=_torch_dtype(dtype), adapter=adapter, device=device,
        )
    out.print(
        f"perplexity [bold]{result.perplexity:.4f}[/] on {data} "
        f"({result.windows} windows × {result.seq_len} tokens, {result.tokens} predicted, {result.seconds:.1f} s)"
    )
    if json_path:
        extra = {"adapter": str(adapter)} if adapter else {}
        write_json(json_path, {"model": result.source, **extra, "data": str(data), "dtype": dtype, **result.to_dict()})


@app.command("analyze")
def analyze_command(
    model: ModelArg,
    calib: Annotated[
        str,
        typer.Option(
            "--calib",
            help="Calibration: a .txt or .jsonl file, hf:NAME[:CONFIG[:SPLIT]], self (text the model "
            "generates), or none (weights only).",
        ),
    ] = CALIBRATION.spec,
    calib_samples: CalibSamplesOpt = CALIBRATION.samples,
    seq_len: SeqLenOpt = CALIBRATION.seq_len,
    seed: SeedOpt = CALIBRATION.seed,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    welore_target: Annotated[
        float, typer.Option("--welore-target", help="Kept parameter fraction at which WeLore ranks are reported.")
    ] = 0.5,
    json_path: JsonOpt = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Write PNG plots into this folder.")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    calib_dtype: CalibDtypeOpt = FactorizeOptions.calib_dtype,
) -> None:
    """Singular-value spectra of every target layer, plain and activation-whitened, and predicted costs."""
    calibration = None if calib == "none" else CalibrationOptions(calib, calib_samples, seq_len, seed)
    with _running():
        from compressor import api
        from compressor.report import analysis_plots, analysis_table, write_json

        result = api.analyze(
            model, calibration, include=include, exclude=exclude, welore_target=welore_target,
            calib_dtype=calib_dtype, dtype=_torch_dtype(dtype), device=device,
        )
    analysis_table(result.analysis, out)
    info = result.calibration
    used = "none (weights only)" if info is None else f"{info['spec']} ({info['tokens']} tokens)"
    out.print(f"{len(result.analysis.modules)} modules analyzed in {result.seconds:.1f} s; calibration: {used}")
    if _secondary_process():
        return
    if json_path:
        write_json(json_path, result.to_json())
        out.print(f"wrote {json_path}")
    if plots:
        for path in analysis_plots(result.analysis, plots):
            out.print(f"wrote {path}")


@app.command("factorize")
def factorize_command(
    model: ModelArg,
    target: Annotated[float, typer.Option("--target", help="Kept fraction of the targeted layers' parameters, 0 < R ≤ 1.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Folder to write the factored checkpoint to.")] = None,
    calib: CalibOpt = CALIBRATION.spec,
    calib_samples: CalibSamplesOpt = CALIBRATION.samples,
    seq_len: SeqLenOpt = CALIBRATION.seq_len,
    seed: SeedOpt = CALIBRATION.seed,
    method: Annotated[str, typer.Option("--method", help="fisher (activation-whitened, loss-gradient-weighted outputs), whiten (activation-whitened) or svd (plain).")] = FactorizeOptions.method,
    alloc: Annotated[str, typer.Option("--alloc", help="Rank allocation: global (sensitivity-weighted), relative, uniform or welore.")] = FactorizeOptions.alloc,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential/--one-shot",
            help="One-shot (default): whiten every block on the original model's inputs. Sequential: re-whiten "
            "each block on the inputs the factored blocks before it produce; a second calibration pass, "
            "about twice the time, up to 3 % lower perplexity at strong compression.",
        ),
    ] = FactorizeOptions.sequential,
    fisher_windows: Annotated[
        int,
        typer.Option(
            "--fisher-windows",
            min=1,
            help="Calibration windows of the loss-gradient (output-Fisher) pass of --method fisher and --alloc global: "
            "more estimate the loss's sensitivity better, each costs about a second and a half on a small CPU.",
        ),
    ] = FactorizeOptions.fisher_windows,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the rank plan and sizes; write nothing.")] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    calib_dtype: CalibDtypeOpt = FactorizeOptions.calib_dtype,
) -> None:
    """Low-rank factorization W ≈ B·A of every target, ranks chosen to meet --target exactly."""
    options = FactorizeOptions(
        target=target, method=method, alloc=alloc, sequential=sequential, calib_dtype=calib_dtype, fisher_windows=fisher_windows
    )
    calibration = CalibrationOptions(calib, calib_samples, seq_len, seed) if options.needs_calibration else None
    if output is None and not dry_run:
        raise UsageError("give an output folder with -o, or --dry-run")
    with _running():
        from compressor import api
        from compressor.report import factorize_summary, write_json

        result = api.factorize(
            model,
            options,
            calibration,
            include=include,
            exclude=exclude,
            output=None if dry_run else output,
            overwrite=overwrite,
            dtype=_torch_dtype(dtype),
            device=device,
        )
    factorize_summary(result, out)
    if json_path and not _secondary_process():
        write_json(json_path, result.to_json())


@app.command("compensate")
def compensate_command(
    original: Annotated[str, typer.Argument(metavar="ORIGINAL", help="The uncompressed MODEL.", show_default=False)],
    compressed: Annotated[
        str,
        typer.Argument(
            metavar="COMPRESSED",
            help="The compressed MODEL: a GPTQ, pruned or factored checkpoint of the same architecture.",
            show_default=False,
        ),
    ],
    rank: Annotated[int, typer.Option("--rank", help="Rank of each module's correction (under --alloc global, the average).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write the PEFT LoRA adapter to.")],
    calib: CalibOpt = CALIBRATION.spec,
    calib_samples: CalibSamplesOpt = CALIBRATION.samples,
    seq_len: SeqLenOpt = CALIBRATION.seq_len,
    seed: SeedOpt = CALIBRATION.seed,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="eora (the residual in the calibration inputs' eigenspace), fisher (the same, outputs weighted "
            "by the loss gradient) or svd (plain SVD of the residual).",
        ),
    ] = CompensateOptions.method,
    alloc: Annotated[
        str,
        typer.Option("--alloc", help="uniform (every module --rank) or global (the same parameters, placed where the predicted loss falls most)."),
    ] = CompensateOptions.alloc,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential/--one-shot",
            help="Sequential: calibrate each block on the inputs the corrected blocks before it produce. "
            "One-shot: on the uncorrected compressed model's inputs.",
        ),
    ] = CompensateOptions.sequential,
    serve_form: Annotated[
        Optional[bool],
        typer.Option(
            "--serve-form/--exact-form",
            help="Serving form: every module zero-padded to one rank vLLM and SGLang accept. Exact form: each "
            "module's own rank (rank_pattern; PEFT only). Default: serving form when the ranks are uniform.",
            show_default=False,
        ),
    ] = None,
    fisher_windows: Annotated[
        int, typer.Option("--fisher-windows", min=1, help="Calibration windows of the loss-gradient pass of --method fisher and --alloc global.")
    ] = CompensateOptions.fisher_windows,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    calib_dtype: CalibDtypeOpt = CompensateOptions.calib_dtype,
) -> None:
    """Repair a compressed model: a rank-R correction per module from calibration data, as a PEFT LoRA adapter."""
    options = CompensateOptions(
        rank=rank, method=method, alloc=alloc, sequential=sequential, calib_dtype=calib_dtype,
        fisher_windows=fisher_windows, serve_form=serve_form,
    )
    calibration = CalibrationOptions(calib, calib_samples, seq_len, seed) if options.needs_calibration else None
    with _running():
        from compressor import api
        from compressor.report import write_json

        result = api.compensate(
            original, compressed, options, calibration, include=include, exclude=exclude,
            output=output, overwrite=overwrite, dtype=_torch_dtype(dtype), device=device,
        )
    o = result.outcome
    ranks = [m.rank for m in o.modules]
    out.print(
        f"{len(o.corrections)} modules corrected (ranks {min(ranks)}-{max(ranks)}, mean {sum(ranks) / len(ranks):.1f}; "
        f"{o.adapter_params:,} adapter parameters); calibration-weighted error kept: {o.mean_relative_error:.3f} "
        f"of the residual on average; {result.seconds:.1f} s"
    )
    out.print(f"wrote {result.output}")
    if json_path:
        write_json(json_path, result.to_json())


@app.command("quantize")
def quantize_command(
    model: ModelArg,
    bits: Annotated[int, typer.Option("--bits", help="Bits per weight: 2, 3, 4 or 8.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write the GPTQ checkpoint to.")],
    group_size: Annotated[
        int, typer.Option("--group-size", help="Input columns sharing one scale and zero point; -1: one group per row.")
    ] = QuantizeOptions.group_size,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="rtn (round to nearest; no calibration) or gptq (GPTQModel on calibration data; needs the gptq extra).",
        ),
    ] = QuantizeOptions.method,
    sym: Annotated[
        bool,
        typer.Option("--sym/--asym", help="Symmetric (zero point 2^(bits-1)) or asymmetric (min/max) grid per group."),
    ] = QuantizeOptions.sym,
    calib: CalibOpt = CALIBRATION.spec,
    calib_samples: CalibSamplesOpt = CALIBRATION.samples,
    seq_len: SeqLenOpt = CALIBRATION.seq_len,
    seed: SeedOpt = CALIBRATION.seed,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    calib_dtype: CalibDtypeOpt = QuantizeOptions.calib_dtype,
) -> None:
    """Integer weights in groups, written as a GPTQ checkpoint: round to nearest, or GPTQ (GPTQModel)."""
    options = QuantizeOptions(bits=bits, group_size=group_size, method=method, sym=sym, calib_dtype=calib_dtype)
    calibration = CalibrationOptions(calib, calib_samples, seq_len, seed) if options.needs_calibration else None
    with _running():
        from compressor import api
        from compressor.report import write_json

        result = api.quantize(model, options, calibration, output=output, overwrite=overwrite, dtype=_torch_dtype(dtype), device=device)
    grid = "sym" if options.sym else "asym"
    out.print(
        f"quantized [bold]{len(result.modules)}[/] layers to {options.bits} bits (group size {options.group_size}, "
        f"{grid}, {options.method}); wrote {result.output} ({result.file_bytes / 2**20:.1f} MB) in {result.seconds:.1f} s"
    )
    if json_path:
        write_json(json_path, result.to_json())


@app.command("check")
def check_command(
    original: Annotated[str, typer.Argument(metavar="ORIGINAL", help="The uncompressed MODEL.", show_default=False)],
    compressed: Annotated[
        Optional[str],
        typer.Argument(
            metavar="[COMPRESSED]",
            help="The compressed MODEL (GPTQ, factored, pruned...); omit it with --save-baseline to only record the original.",
            show_default=False,
        ),
    ] = None,
    data: Annotated[Path, typer.Option("--data", help="A text file, read whole and cut into windows as by eval.")] = ...,
    adapter: Annotated[
        Optional[Path], typer.Option("--adapter", help="A PEFT LoRA adapter folder (e.g. from compress compensate) applied to COMPRESSED.")
    ] = None,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", min=1, help="Compare on the first N windows only.")] = None,
    seq_len: SeqLenOpt = 512,
    max_ppl_ratio: Annotated[
        Optional[float], typer.Option("--max-ppl-ratio", help="Fail when compressed perplexity / original perplexity exceeds X.")
    ] = None,
    max_kl: Annotated[
        Optional[float], typer.Option("--max-kl", help="Fail when the mean KL(original ‖ compressed) per token exceeds X nats.")
    ] = None,
    min_top1: Annotated[
        Optional[float], typer.Option("--min-top1", help="Fail when top-1 next-token agreement falls below X (0-1).")
    ] = None,
    baseline: Annotated[
        Optional[Path],
        typer.Option("--baseline", help="A baseline file from --save-baseline: the original's predictions, so it is not run again."),
    ] = None,
    save_baseline: Annotated[
        Optional[Path], typer.Option("--save-baseline", help="Write the original's predictions here, for later --baseline runs.")
    ] = None,
    json_path: JsonOpt = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Write JUnit XML here: one testcase per metric.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")] = 4,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
) -> None:
    """Gate a compressed model in CI: exit 1 when a metric passes its threshold (perplexity ratio, KL, top-1)."""
    from compressor.check import Thresholds
    from compressor.errors import QualityCheckFailed

    thresholds = Thresholds(max_ppl_ratio=max_ppl_ratio, max_kl=max_kl, min_top1=min_top1)
    if compressed is None and (junit or thresholds != Thresholds()):
        raise UsageError("thresholds and --junit need the COMPRESSED model to check")
    torch_dtype = _torch_dtype(dtype)
    with _running():
        from compressor import api
        from compressor.report import check_table, write_json, write_junit

        result = api.check(
            original, compressed, data, adapter=adapter, thresholds=thresholds, seq_len=seq_len,
            max_windows=max_windows, batch_size=batch_size, dtype=torch_dtype, baseline=baseline, save_baseline=save_baseline, device=device,
        )
    if result.comparison is None:
        out.print(f"wrote the baseline of {result.original} to {result.saved_baseline}")
        if json_path:
            write_json(json_path, result.to_json())
        return
    check_table(result, out)
    if result.saved_baseline:
        out.print(f"wrote the baseline of {result.original} to {result.saved_baseline}")
    if json_path:
        write_json(json_path, result.to_json())
    if junit:
        write_junit(junit, result)
    if not result.passed:
        failed = "; ".join(f"{m.name} {m.value:.4g} (threshold {m.rule})" for m in result.failures)
        raise QualityCheckFailed(f"check failed: {failed}")
    given = [m for m in result.checks if m.limit is not None]
    out.print(f"check passed: {len(given)} threshold{'s' if len(given) != 1 else ''} held" if given else "no thresholds given: nothing to fail")


@app.command("verify")
def verify_command(
    path: Annotated[Path, typer.Argument(metavar="OUT", help="A factored checkpoint folder.", show_default=False)],
    against: Annotated[Optional[str], typer.Option("--against", help="The original MODEL to compare with.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Text file for the comparison.")] = None,
    seq_len: SeqLenOpt = 512,
    max_windows: Annotated[int, typer.Option("--max-windows", min=1, help="Windows to compare on.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")] = 4,
    json_path: JsonOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Check a factored checkpoint: every tensor present and finite, ranks as recorded, loads."""
    with _running():
        from compressor import api
        from compressor.report import write_json

        result = api.verify(path, against=against, data=data, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, device=device)
    out.print(f"{path}: {result.tensors} tensors, {len(result.ranks)} factored modules, all finite; loads: ok")
    if result.comparison:
        c = result.comparison
        out.print(
            f"perplexity {c.perplexity:.4f} (original {c.reference_perplexity:.4f}); KL divergence {c.kl:.4f} nats/token; "
            f"top-1 agreement {c.top1_agreement:.4f} over {c.tokens} tokens"
        )
    if json_path:
        write_json(json_path, result.to_json())


@app.command("export-dense")
def export_dense_command(
    path: Annotated[Path, typer.Argument(metavar="OUT", help="A factored checkpoint folder.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the dense checkpoint.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
) -> None:
    """Merge B·A back into plain weights: a standard checkpoint any tool loads."""
    with _running(), err.status(f"exporting {path}"):
        from compressor import api

        written = api.export_dense(path, output, overwrite=overwrite)
    out.print(f"wrote {written}")


@app.command("bench")
def bench_command(
    model: Annotated[
        Optional[str],
        typer.Argument(metavar="[MODEL]", help="Also time this model's decode, dense and factored to --target.", show_default=False),
    ] = None,
    shapes: Annotated[
        Optional[str],
        typer.Option("--shapes", help="Layer shapes OUTxINxR,… to time (default without MODEL: LLaMA-3-8B's at kept 0.5 and 0.8)."),
    ] = None,
    tokens: Annotated[str, typer.Option("--tokens", help="Tokens per call (per decode step with MODEL), comma-separated.")] = "1,4,16,64",
    target: Annotated[float, typer.Option("--target", help="MODEL's kept fraction for the decode comparison (uniform ranks).")] = 0.5,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Decode steps timed per run.")] = 32,
    kernels: Annotated[str, typer.Option("--kernels", help="auto (Triton on CUDA), triton or torch.")] = "auto",
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Timed rounds per case; the median is reported.")] = 10,
    json_path: JsonOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of speedup against the ceiling here.")] = None,
    dtype: Annotated[
        Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on the CPU).")
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Time factored and corrected layers against dense (speedup against the ceiling mn/(r(m+n))), and a model's decode."""
    torch_dtype = None if dtype is None else _torch_dtype(dtype)
    with _running():
        from compressor import api
        from compressor.report import bench_plot, bench_tables, write_json

        result = api.bench(model, shapes=shapes, tokens=tokens, target=target, new_tokens=new_tokens, dtype=torch_dtype,
                           device=device, kernels=kernels, rounds=rounds)
    bench_tables(result, out)
    if json_path:
        write_json(json_path, result.to_json())
    if plot and result.shapes:
        out.print(f"wrote {bench_plot(result, plot)}")


def _fail(message: str, code: int) -> int:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if _state["debug"]:
        err.print(traceback.format_exc(), highlight=False, markup=False)
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code instead of exiting."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="compress", standalone_mode=False)
        if rv == EXIT_INTERRUPTED:  # Typer's own answer to Ctrl-C, returned rather than raised
            return _fail("interrupted", EXIT_INTERRUPTED)
        return rv if isinstance(rv, int) else 0
    except (typer.Exit, getattr(click_exceptions, "Exit", typer.Exit)) as e:
        return e.exit_code
    except click_exceptions.ClickException as e:
        e.show(file=sys.stderr)
        return 2 if isinstance(e, click_exceptions.UsageError) else e.exit_code
    except (typer.Abort, getattr(click_exceptions, "Abort", typer.Abort), KeyboardInterrupt):
        return _fail("interrupted", EXIT_INTERRUPTED)
    except UsageError as e:
        return _fail(f"{e} (see compress --help)", e.exit_code)
    except CompressError as e:
        return _fail(str(e), e.exit_code)
    except MemoryError:
        return _fail("out of memory; try a smaller --batch-size, --calib-samples or --seq-len", OutOfResourcesError.exit_code)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _fail(f"out of disk space: {e}", OutOfResourcesError.exit_code)
        return _fail(f"internal error: {e} (run with --debug for the traceback)", EXIT_INTERNAL)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if type(e).__name__ == "OutOfMemoryError":  # torch's (a RuntimeError), not imported just to name it
            return _fail("out of memory; try a smaller --batch-size, --calib-samples or --seq-len", OutOfResourcesError.exit_code)
        return _fail(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", EXIT_INTERNAL)


def main() -> None:
    sys.exit(run())
