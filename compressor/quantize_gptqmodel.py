"""GPTQ through GPTQModel (the optional ``gptq`` extra): a loaded model → a GPTQ v1 checkpoint folder.

GPTQModel reads the weights again, layer by layer, from the safetensors folder they came from
(``LoadedModel.folder``; a model from the hub is first saved to a temporary folder), runs GPTQ on
our calibration windows, and writes format "gptq" (v1: qzeros store zero − 1), desc_act False:
``g_idx`` is ``i // group_size``, so kernels that ignore ``g_idx`` read it right. GPTQModel,
transformers (with optimum and gptqmodel installed) and ``compressor.formats.gptq.load_gptq`` load
it; vLLM too, where every quantized layer's in_features is a multiple of the group size (vLLM
refuses a partial last group, which GPTQModel writes: see :func:`partial_groups`).

Importing GPTQModel changes process-wide state (tokenicer points ``HF_HOME`` and the other
Hugging Face cache variables at /tmp and calls ``logging.basicConfig``; GPTQModel sets allocator
variables); :func:`import_gptqmodel` undoes those changes once the import is done. GPTQModel
prints its log and progress bars on stdout: here they go to stderr.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from compressor import __version__
from compressor.calibration.sources import CalibrationSet
from compressor.errors import InvalidInputError, OutOfResourcesError, UsageError, first_few, first_line
from compressor.formats.atomic import atomic_dir, check_destination, raise_output_error, scratch_dir
from compressor.loading import LoadedModel
from compressor.precision import resolve_calib_dtype
from compressor.progress import track

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[gptq]'"
BITS = (2, 3, 4, 8)  # what the GPTQ v1 format packs into int32 words and vLLM reads
# The group sizes GPTQModel 7.6 packs (its torch kernel's SUPPORTS_GROUP_SIZE); -1: one group per row.
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
# Calibration windows per forward pass: all windows are one length, so batches need no padding.
BATCH_SIZE = 8
SIDE_INFO_KEY = "compress"  # quantization_config.meta[SIDE_INFO_KEY]: what made the checkpoint, from what


class GPTQOptions(Protocol):
    bits: int
    group_size: int
    sym: bool
    calib_dtype: str  # compressor.precision.resolve_calib_dtype: the matmul dtype of the calibration passes


def quantize_with_gptqmodel(
    loaded: LoadedModel,
    options: GPTQOptions,
    calibration: CalibrationSet,
    output: Path,
    *,
    overwrite: bool = False,
) -> None:
    """GPTQ-quantize ``loaded`` with GPTQModel on ``calibration`` and write the checkpoint at ``output``.

    ``options``: ``bits`` (2, 3, 4, 8), ``group_size`` (−1: per row), ``sym``, ``calib_dtype``
    (GPTQModel's forward passes autocast to it; its Hessians and GPTQ's solves stay float32). The
    folder appears complete or not at all (:func:`compressor.formats.atomic.atomic_dir`);
    GPTQModel's scratch files go to a hidden folder beside it, removed at the end. The
    non-quantized tensors (embeddings, norms, head) keep the dtype of ``loaded.model``. ``loaded``
    is not changed."""
    check_options(options)
    dest = check_destination(output, overwrite)
    source = _plain_source(loaded)
    gptqmodel = import_gptqmodel()
    dtype = next(loaded.model.parameters()).dtype
    compute_dtype = resolve_calib_dtype(options.calib_dtype, loaded.model)
    uneven = partial_groups(loaded.model, options.group_size)
    if uneven:
        log.warning(
            "group size %d does not divide the inputs of %d linear layers (%s): GPTQModel gives each "
            "a partial last group, which GPTQModel and transformers read and vLLM refuses",
            options.group_size, len(uneven), first_few(uneven, 3),
        )
    start = time.perf_counter()
    with scratch_dir(dest, "gptq") as scratch:
        folder = source if source is not None else _saved_copy(loaded, Path(scratch) / "source")
        qconfig = gptqmodel.QuantizeConfig(
            bits=options.bits,
            group_size=options.group_size,
            sym=options.sym,
            desc_act=False,
            format="gptq",
            offload_to_disk_path=str(Path(scratch) / "offload"),
        )
        with _quiet_gptqmodel(), _enough_cpu_workers(), _logs_in(Path(scratch) / "logs"):
            for _ in track([folder], description=f"GPTQ w{options.bits} g{options.group_size} (GPTQModel)"):
                model = _load(gptqmodel, folder, qconfig, dtype)
                _quantize(model, calibration, compute_dtype)
                model.quantize_config.meta_set(SIDE_INFO_KEY, _side_info(loaded, calibration, gptqmodel.__version__))
                _save(model, loaded.tokenizer, dest, overwrite)
    seconds = time.perf_counter() - start
    log.info("quantized %s with GPTQModel %s in %.0f s", loaded.source, gptqmodel.__version__, seconds)


def check_options(options: GPTQOptions) -> None:
    """Bits and group size that GPTQModel packs into GPTQ v1, and GPTQModel installed (found, not
    imported: that takes seconds); raises UsageError before anything loads."""
    if options.bits not in BITS:
        raise UsageError(f"GPTQ packs {', '.join(map(str, BITS))} bits, not {options.bits}")
    if options.group_size not in GROUP_SIZES:
        raise UsageError(
            f"GPTQModel packs group sizes {', '.join(map(str, GROUP_SIZES))}, not {options.group_size}"
        )
    if importlib.util.find_spec("gptqmodel") is None:
        raise UsageError(f"GPTQ quantization needs the gptqmodel package: {INSTALL_HINT}")


def partial_groups(model: nn.Module, group_size: int) -> list[str]:
    """The linear layers of the transformer blocks whose in_features ``group_size`` does not divide.

    GPTQModel quantizes each of them with ⌈in/group⌉ groups, the last one shorter (SmolLM2's 576
    inputs at group 128: four groups of 128 and one of 64), and ``g_idx`` says so; vLLM's GPTQ
    kernels require whole groups and refuse such a layer."""
    if group_size <= 0:
        return []
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.in_features % group_size and module is not _head(model):
            names.append(name)
    return names


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def import_gptqmodel() -> ModuleType:
    """The gptqmodel package, imported with the process's environment, root logger and warning
    filters put back as they were; UsageError naming the install command when it is missing."""
    with _process_state_kept(), contextlib.redirect_stdout(sys.stderr):
        try:
            import gptqmodel
        except ImportError as e:
            raise UsageError(
                f"GPTQ quantization needs the gptqmodel package: {INSTALL_HINT} ({first_line(e)})"
            ) from e
    return gptqmodel


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    environ = dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    filters = list(warnings.filters)
    try:
        yield
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
        root.setLevel(level)
        warnings.filters[:] = filters


@contextlib.contextmanager
def _quiet_gptqmodel() -> Iterator[None]:
    """GPTQModel's INFO lines (tables per layer and per module) only when we log at DEBUG, and its
    progress bars on stderr rather than stdout (where the CLI writes its results)."""
    loggers = [logging.getLogger(name) for name in ("logbar", "tokenicer")]  # GPTQModel's, its tokenizer wrapper's
    levels = [logger.level for logger in loggers]
    if not log.isEnabledFor(logging.DEBUG):
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _logs_in(folder: Path) -> Iterator[None]:
    """GPTQModel 7.6 writes per-run log files into ``./logs`` of the working directory (a module
    constant of its loop processor); point it at the scratch folder instead, so that a run leaves
    nothing behind in the user's directory."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # another layout: leave it be
        yield
        return
    saved = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        if saved is not None:
            loop_processor._PROJECT_LOG_DIR = saved


@contextlib.contextmanager
def _enough_cpu_workers() -> Iterator[None]:
    """GPTQModel 7.6 builds its thread pool on first use with (cores + 1) // 2 CPU workers, and
    fails below 2 ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has
    1"): on one or two cores, ask for 2 through its variable, unless the user set it."""
    if "GPTQMODEL_CPU_WORKERS" in os.environ or (os.cpu_count() or 1) > 2:
        yield
        return
    os.environ["GPTQMODEL_CPU_WORKERS"] = "2"
    try:
        yield
    finally:
        os.environ.pop("GPTQMODEL_CPU_WORKERS", None)


def _plain_source(loaded: LoadedModel) -> Path | None:
    """The folder GPTQModel may read ``loaded``'s weights from, None when there is none (a hub
    model: saved first). UsageError for a checkpoint that is already compressed."""
    folder = loaded.folder
    if folder is None:
        return None
    qconfig = _folder_config(folder).get("quantization_config")
    if isinstance(qconfig, dict):
        method = qconfig.get("quant_method", "?")
        raise UsageError(
            f"{loaded.source} is already quantized ({method}); GPTQ needs a model in floating point"
        )
    return folder


def _folder_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"cannot read {folder / 'config.json'}: {e}") from e
    return config if isinstance(config, dict) else {}


def _saved_copy(loaded: LoadedModel, folder: Path) -> Path:
    try:
        loaded.model.save_pretrained(folder)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(folder)
    except OSError as e:
        raise_output_error(e, folder)
    return folder


def _load(gptqmodel: ModuleType, folder: Path, qconfig, dtype: torch.dtype):
    try:
        return gptqmodel.GPTQModel.load(str(folder), qconfig, dtype=dtype)
    except MemoryError as e:
        raise OutOfResourcesError(f"out of memory while GPTQModel loads {folder}") from e
    except (OSError, ValueError, KeyError) as e:  # ValueError: an architecture GPTQModel does not know
        raise InvalidInputError(f"GPTQModel cannot load {folder}: {first_line(e)}") from e


def _quantize(model, calibration: CalibrationSet, compute_dtype: torch.dtype | None) -> None:
    """GPTQModel runs the layers' forward passes in this thread (so under our autocast) and GPTQ's
    solves in its worker threads (autocast is per thread: they stay float32)."""
    windows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in calibration.input_ids]
    device = str(getattr(model.quantize_config.device, "value", model.quantize_config.device)).split(":")[0]
    autocast = contextlib.nullcontext() if compute_dtype is None else torch.autocast(device, dtype=compute_dtype)
    try:
        with autocast:
            model.quantize(windows, batch_size=min(BATCH_SIZE, len(windows)))
    except MemoryError as e:
        raise OutOfResourcesError("out of memory while GPTQModel quantizes") from e


def _side_info(loaded: LoadedModel, calibration: CalibrationSet, gptqmodel_version: str) -> dict[str, Any]:
    return {
        "tool": f"compress {__version__}",
        "quantizer": f"gptqmodel {gptqmodel_version}",
        "source": loaded.source,
        "calibration": calibration.info.to_dict(),
    }


def _save(model, tokenizer, dest: Path, overwrite: bool) -> None:
    try:
        with atomic_dir(dest, overwrite=overwrite) as tmp:
            model.save(str(tmp), meta_quantizer=f"compress:{__version__}")
            if tokenizer is not None:  # the caller's tokenizer, as it loaded it
                tokenizer.save_pretrained(tmp)
            _check_written(tmp)
    except OSError as e:
        raise_output_error(e, dest)


def _check_written(folder: Path) -> None:
    """What this module promises of the folder, checked as a reader checks it before it takes its
    place: a valid GPTQ checkpoint (:func:`compressor.formats.gptq.validate_gptq_folder`), format
    v1, desc_act False."""
    from compressor.formats.gptq import validate_gptq_folder

    try:
        config = validate_gptq_folder(folder).config
    except InvalidInputError as e:
        raise RuntimeError(f"the checkpoint GPTQModel wrote does not validate: {e}") from e
    if config.checkpoint_format != "gptq" or config.desc_act:
        raise RuntimeError(
            f"GPTQModel wrote checkpoint_format {config.checkpoint_format!r}, desc_act {config.desc_act}: "
            "not GPTQ v1 without desc_act"
        )
