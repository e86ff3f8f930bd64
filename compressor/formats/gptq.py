"""A GPTQ checkpoint folder (auto-gptq / GPTQModel ``checkpoint_format`` "gptq", v1): written
atomically, validated from its headers, and loaded as an ordinary dense transformers model without
gptqmodel or optimum.

On disk it is a Hugging Face model folder whose ``config.json`` carries

    "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false,
                            "sym": true, "checkpoint_format": "gptq", "meta": {"quantizer": [...], ...}}

(the same object is written as ``quantize_config.json``, which GPTQModel and auto-gptq read), and
each quantized linear layer ``<name>`` stores ``<name>.qweight``, ``.qzeros``, ``.scales``,
``.g_idx`` and its ``<name>.bias`` instead of ``<name>.weight``; the packing is
:mod:`compressor.formats.gptq_packing`'s. Every other tensor is as ``save_pretrained`` writes it.

Which layers can be written: in_features and out_features both multiples of 32, whatever the
bits. That is GPTQModel's own packer's rule (it refuses anything else, and it sizes qzeros as
out // 32 · bits words), so whatever this module writes, GPTQModel could have written. Reading is
looser: any dimension whose codes fill whole 32-bit words (n·bits a multiple of 32). GPTQModel 7.6
loads what is written here with symmetric grids, with logits equal to this module's load to
float16 precision; it refuses asymmetric v1 checkpoints unless its own name and a version ≥ 0.9
are in meta.quantizer (older producers wrote zero point 0 as −1), although zero points here are
always at least 1.

Loading dequantizes every quantized layer in float32 (:func:`~compressor.formats.gptq_packing.dequantize`)
and has transformers build the model that ``config.json`` describes, without its
quantization_config, from those dense weights: ``from_pretrained(None, config=…, state_dict=…)``,
which ties embeddings and makes non-persistent buffers (rotary ``inv_freq``) as a plain load does,
on transformers 5.0 through 5.25. GPTQModel's per-module ``dynamic`` bits and group sizes are
honoured; a layer it left unquantized simply keeps its ``.weight``.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressor.architecture import model_class
from compressor.errors import InvalidInputError, NumericalError, OutOfResourcesError, first_few, first_line
from compressor.formats.atomic import atomic_dir, raise_output_error
from compressor.formats.checkpoint import _load_tokenizer, _Problems, loading_problems
from compressor.formats.safetensors_header import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TensorHeader,
    read_folder_headers,
    safetensors_weight_files,
)
from compressor.formats.gptq_packing import (
    BITS,
    TENSOR_SUFFIXES,
    WORD_BITS,
    WRITE_ALIGNMENT,
    ZERO_OFFSETS,
    QuantizedWeight,
    dequantize,
    dequantize_codes,
    group_index,
    n_groups,
    pack_qweight,
    pack_qzeros,
    packing_problem,
    unpack_qweight,
    unpack_qzeros,
)
from compressor.formats.writer import releasing_writer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "BITS",
    "GptqConfig",
    "GptqFolder",
    "QuantizedWeight",
    "WRITE_ALIGNMENT",
    "dequantize",
    "dequantize_codes",
    "group_index",
    "is_gptq_folder",
    "load_gptq",
    "n_groups",
    "pack_qweight",
    "pack_qzeros",
    "packing_problem",
    "read_gptq_config",
    "save_gptq",
    "unpack_qweight",
    "unpack_qzeros",
    "validate_gptq_folder",
]

QUANT_METHOD = "gptq"
QUANTIZE_CONFIG_NAME = "quantize_config.json"  # GPTQModel's and auto-gptq's own copy of the config
_INT_DTYPES = frozenset({"I32"})
_INDEX_DTYPES = frozenset({"I32", "I64"})
_SCALE_DTYPES = frozenset({"F16", "BF16", "F32"})


# --------------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class GptqConfig:
    """config.json's quantization_config for a GPTQ checkpoint, as written and as read."""

    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    meta: Mapping[str, Any] = field(default_factory=dict)
    # GPTQModel's per-module overrides: {"regex" or "+:regex": {"bits": …, "group_size": …}, "-:regex": {}}
    dynamic: Mapping[str, Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if not (self.group_size == -1 or self.group_size >= 1):
            raise ValueError(f"group_size must be at least 1 or -1, got {self.group_size}")
        if self.checkpoint_format not in ZERO_OFFSETS:
            raise ValueError(f"checkpoint_format must be one of {', '.join(ZERO_OFFSETS)}, got {self.checkpoint_format!r}")

    def to_dict(self) -> dict[str, Any]:
        data = {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "checkpoint_format": self.checkpoint_format,
            "meta": dict(self.meta),
        }
        if self.dynamic:
            data["dynamic"] = {k: dict(v) for k, v in self.dynamic.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> GptqConfig:
        """Read a quantization_config (or quantize_config.json); InvalidInputError naming ``where``."""
        method = data.get("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise InvalidInputError(f"{where}: quant_method is {method!r}, not {QUANT_METHOD!r}")
        fmt = data.get("checkpoint_format", data.get("format", "gptq"))
        fmt = fmt.lower() if isinstance(fmt, str) else fmt
        pack_dtype = data.get("pack_dtype", "int32")
        if pack_dtype not in ("int32", "torch.int32"):
            raise InvalidInputError(f"{where}: pack_dtype {pack_dtype!r} is not read here (only int32)")
        bits = data.get("bits")
        if isinstance(bits, str) and bits.strip().isdigit():
            bits = int(bits)
        dynamic = data.get("dynamic")
        if dynamic is not None and not (
            isinstance(dynamic, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in dynamic.items())
        ):
            raise InvalidInputError(f"{where}: dynamic must map module patterns to objects")
        try:
            if not isinstance(bits, int) or isinstance(bits, bool):
                raise ValueError(f"bits must be an integer, got {bits!r}")
            group_size = data.get("group_size", -1)
            if not isinstance(group_size, int) or isinstance(group_size, bool):
                raise ValueError(f"group_size must be an integer, got {group_size!r}")
            config = cls(
                bits=bits,
                group_size=group_size,
                sym=bool(data.get("sym", True)),
                desc_act=bool(data.get("desc_act", False)),
                checkpoint_format=fmt,
                meta=dict(data.get("meta") or {}),
                dynamic=dynamic or None,
            )
            for overrides in (dynamic or {}).values():
                cls(bits=overrides.get("bits", bits), group_size=overrides.get("group_size", group_size))
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"{where}: {e}") from e
        return config

    def for_module(self, name: str) -> tuple[int, int]:
        """(bits, group_size) of one module: the first matching positive ``dynamic`` pattern's, else the config's."""
        for pattern, overrides in (self.dynamic or {}).items():
            if pattern.startswith("-:"):
                continue
            if re.match(pattern.removeprefix("+:"), name):
                return overrides.get("bits", self.bits), overrides.get("group_size", self.group_size)
        return self.bits, self.group_size


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"cannot read {path}: {e}") from e


def _gptq_dict(folder: Path) -> tuple[dict[str, Any], str] | None:
    """The GPTQ config of a folder and the file it came from: config.json's quantization_config,
    or, where config.json has none (auto-gptq), quantize_config.json. None if neither is GPTQ."""
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qconfig, dict):
        return (qconfig, "config.json") if qconfig.get("quant_method") == QUANT_METHOD else None
    legacy = folder / QUANTIZE_CONFIG_NAME
    if legacy.is_file():
        data = _read_json(legacy)
        if isinstance(data, dict) and data.get("quant_method", QUANT_METHOD) == QUANT_METHOD and "bits" in data:
            return data, QUANTIZE_CONFIG_NAME
    return None


def is_gptq_folder(path: str | os.PathLike[str]) -> bool:
    """The folder declares a GPTQ checkpoint (config.json, or auto-gptq's quantize_config.json)."""
    return _gptq_dict(Path(path)) is not None


def read_gptq_config(path: str | os.PathLike[str]) -> GptqConfig:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InvalidInputError(f"{folder} has no config.json: not a Hugging Face model folder")
    found = _gptq_dict(folder)
    if found is None:
        raise InvalidInputError(f"{folder} is not a GPTQ checkpoint: no quantization_config with quant_method 'gptq'")
    data, name = found
    return GptqConfig.from_dict(data, f"{folder / name}")


# --------------------------------------------------------------------------------------------
# Reading and validating


@dataclass(frozen=True)
class GptqModule:
    """A quantized layer of a checkpoint, checked against the model: where and how to dequantize it."""

    name: str  # the checkpoint's prefix of its tensors
    out_features: int
    in_features: int
    bits: int
    group_size: int
    transposed: bool  # a GPT-2 Conv1D: its dense weight is stored (in, out)


@dataclass(frozen=True)
class GptqFolder:
    """A GPTQ checkpoint folder that passed :func:`validate_gptq_folder`."""

    path: Path
    config: GptqConfig
    files: list[Path]
    modules: dict[str, GptqModule]
    model_config: Any  # the transformers config, without quantization_config
    model_class: type


def _weight_files(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files that hold the weights, and the index's map: model.safetensors, the
    shards its index names, or the folder's one safetensors file of another name (auto-gptq's
    ``gptq_model-4bit-128g``)."""
    found = safetensors_weight_files(folder)
    if found is not None:
        return found
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(others) != 1:
        raise InvalidInputError(
            f"{folder} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}"
            + (f", and several other safetensors files ({first_few(others, 3)})" if others else "")
        )
    return others, None


def _model_config(folder: Path) -> Any:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"cannot read the model config at {folder}: {first_line(e)}") from e
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # built and loaded dense: transformers must not look for gptqmodel
    return config


def _skeleton(folder: Path, config: Any) -> tuple[type, nn.Module]:
    cls = model_class(config)
    try:
        with torch.device("meta"):
            return cls, cls._from_config(config)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise InvalidInputError(f"cannot build the model that {folder}/config.json describes: {first_line(e)}") from e


def _geometry(module: nn.Module) -> tuple[int, int, bool] | None:
    """(out, in, transposed) of a linear layer, None for anything else."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0], True
    return None


def _check_module(
    prefix: str, geometry: tuple[int, int, bool], config: GptqConfig, headers: Mapping[str, TensorHeader], problems: list[str]
) -> GptqModule | None:
    out_features, in_features, transposed = geometry
    bits, group_size = config.for_module(prefix)
    missing = [s for s in TENSOR_SUFFIXES if f"{prefix}.{s}" not in headers]
    if missing:
        problems.append(f"{prefix} has qweight but lacks {', '.join(missing)}")
        return None
    if f"{prefix}.weight" in headers:
        problems.append(f"{prefix} has both a dense weight and qweight")
    ok = True
    for suffix, allowed in (("qweight", _INT_DTYPES), ("qzeros", _INT_DTYPES), ("g_idx", _INDEX_DTYPES), ("scales", _SCALE_DTYPES)):
        dtype = headers[f"{prefix}.{suffix}"].dtype
        if dtype not in allowed:
            problems.append(f"{prefix}.{suffix} is {dtype}, expected {' or '.join(sorted(allowed))}")
            ok = False
    for what, n in (("in_features", in_features), ("out_features", out_features)):
        if n * bits % WORD_BITS:
            problems.append(f"{prefix}: {what} {n} cannot be packed in whole 32-bit words at {bits} bits")
            ok = False
    if not ok:
        return None
    groups = n_groups(in_features, group_size)
    expected = {
        "qweight": (in_features * bits // WORD_BITS, out_features),
        "qzeros": (groups, out_features * bits // WORD_BITS),
        "scales": (groups, out_features),
        "g_idx": (in_features,),
    }
    for suffix, shape in expected.items():
        found = headers[f"{prefix}.{suffix}"].shape
        if found != shape:
            problems.append(
                f"{prefix}.{suffix} is {list(found)}, expected {list(shape)} for a {out_features}×{in_features} "
                f"layer at {bits} bits, group size {group_size}"
            )
            ok = False
    return GptqModule(prefix, out_features, in_features, bits, group_size, transposed) if ok else None


def validate_gptq_folder(path: str | os.PathLike[str]) -> GptqFolder:
    """Check a GPTQ checkpoint against its config and its model before any weight is read.

    Raises InvalidInputError naming every problem: a config that is not GPTQ or not readable here;
    a quantized layer (one with ``qweight``) that lacks qzeros, scales or g_idx, whose tensors have
    the wrong dtype or the wrong shapes for its bits and group size, or that the model does not
    have as a linear layer; orphaned qzeros or g_idx; shards that do not match their index. The
    other tensors are checked by the load itself.
    """
    folder = Path(path)
    config = read_gptq_config(folder)
    problems = _Problems()
    files, weight_map = _weight_files(folder)
    headers = read_folder_headers(folder, files, weight_map, problems)
    model_config = _model_config(folder)
    cls, skeleton = _skeleton(folder, model_config)
    named = dict(skeleton.named_modules())
    base = getattr(skeleton, "base_model_prefix", "") or ""
    prefixes = sorted(key.removesuffix(".qweight") for key in headers if key.endswith(".qweight"))
    for key in sorted(headers):
        prefix, _, suffix = key.rpartition(".")
        if suffix in ("qzeros", "g_idx") and f"{prefix}.qweight" not in headers:
            problems.append(f"{key} has no {prefix}.qweight")
    if not prefixes:
        problems.append("no quantized layer (no tensor named *.qweight)")
    modules: dict[str, GptqModule] = {}
    for prefix in prefixes:
        candidates = [prefix] + ([prefix.removeprefix(f"{base}."), f"{base}.{prefix}"] if base else [])
        module = next((named[c] for c in candidates if c in named), None)
        geometry = None if module is None else _geometry(module)
        if geometry is None:
            problems.append(f"{prefix}.qweight: the model has no linear layer {prefix}")
            continue
        checked = _check_module(prefix, geometry, config, headers, problems)
        if checked is not None:
            modules[prefix] = checked
    problems.raise_if_any(f"the GPTQ checkpoint at {folder} is not valid")
    return GptqFolder(folder, config, [folder / f for f in files], modules, model_config, cls)


# --------------------------------------------------------------------------------------------
# Loading


def _dense_state_dict(folder: GptqFolder, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, with each quantized layer's four replaced by its dense weight."""
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[str, torch.Tensor]] = {name: {} for name in folder.modules}
    for file in folder.files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    prefix, _, suffix = key.rpartition(".")
                    if prefix in pieces and suffix in TENSOR_SUFFIXES:
                        pieces[prefix][suffix] = f.get_tensor(key)
                    else:
                        state[key] = f.get_tensor(key)
        except (OSError, SafetensorError, ValueError, RuntimeError) as e:
            raise InvalidInputError(f"cannot read {file}: {first_line(e)}") from e
    fmt = folder.config.checkpoint_format
    for name, module in folder.modules.items():
        tensors = pieces.pop(name)
        g_idx = tensors["g_idx"]
        groups = tensors["scales"].shape[0]
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise InvalidInputError(f"{folder.path}: {name}.g_idx holds groups outside [0, {groups})")
        weight = dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], g_idx, module.bits, checkpoint_format=fmt)
        if not torch.isfinite(weight).all():
            raise NumericalError(f"{folder.path}: {name} dequantizes to NaN or Inf (its scales are not finite)")
        state[f"{name}.weight"] = (weight.t() if module.transposed else weight).to(dtype).contiguous()
    return state


def load_gptq(path: str | os.PathLike[str] | GptqFolder, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """Load a GPTQ checkpoint as the plain model it encodes: (model in eval mode, tokenizer or None).

    The folder is validated first (:func:`validate_gptq_folder`); each quantized layer becomes an
    ordinary linear layer holding its dequantized weight (in ``dtype``), and the model has no
    quantization_config, so neither gptqmodel nor optimum is needed, and anything that works on a
    dense model works on it. Tensors the model lacks, or that it has and the folder does not, are
    refused (InvalidInputError)."""
    folder = path if isinstance(path, GptqFolder) else validate_gptq_folder(path)
    try:
        state = _dense_state_dict(folder, dtype)
        model, info = folder.model_class.from_pretrained(
            None, config=folder.model_config, state_dict=state, dtype=dtype, output_loading_info=True
        )
    except MemoryError as e:
        raise OutOfResourcesError(f"out of memory while loading {folder.path}") from e
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise InvalidInputError(f"cannot load the GPTQ checkpoint at {folder.path}: {first_line(e)}") from e
    problems = loading_problems(info)
    problems.raise_if_any(f"the GPTQ checkpoint at {folder.path} does not match its model")
    model.config.name_or_path = str(folder.path)
    _load_generation_config(model, folder.path)
    model.eval()
    return model, _load_tokenizer(folder.path)


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    """What ``from_pretrained(folder)`` would read beside the weights (EOS, sampling defaults)."""
    if not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidInputError(f"cannot read {folder / 'generation_config.json'}: {first_line(e)}") from e


# --------------------------------------------------------------------------------------------
# Saving


class _PackedLinear(nn.Module):
    """Stands in for a linear layer while ``save_pretrained`` writes it: its four GPTQ tensors as
    buffers and the original bias, so that they are saved under the layer's name."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], bias: nn.Parameter | None) -> None:
        super().__init__()
        for suffix in TENSOR_SUFFIXES:
            self.register_buffer(suffix, tensors[suffix])
        self.bias = bias


@contextmanager
def _packed_modules(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], checkpoint_format: str
) -> Iterator[None]:
    """Swap each quantized layer for a :class:`_PackedLinear`; put the originals back afterwards."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, q in quantized.items():
            module = model.get_submodule(name)
            geometry = _geometry(module)
            if geometry is None or geometry[:2] != q.shape:
                raise ValueError(f"{name} is not a linear layer of shape {list(q.shape)}")
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _PackedLinear(q.packed(checkpoint_format), module.bias))
            swapped.append((parent, child, module))
        yield
    finally:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)


@contextmanager
def _described_as_gptq(model: PreTrainedModel, config: GptqConfig) -> Iterator[None]:
    """Temporarily give the model our quantization_config and no quantizer; restore both afterwards."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(quantizer.quantization_config, "quant_method", "?")
        raise ValueError(f"the model is already quantized with {method}; it cannot be saved as GPTQ")
    hf_config = model.config
    missing = object()
    saved = vars(hf_config).get("quantization_config", missing)
    hf_config.quantization_config = config.to_dict()
    try:
        yield
    finally:
        if saved is missing:
            if hasattr(hf_config, "quantization_config"):
                del hf_config.quantization_config
        else:
            hf_config.quantization_config = saved


def save_gptq(
    model: PreTrainedModel,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    quantized: Mapping[str, QuantizedWeight],
    config: GptqConfig,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write ``model`` as a GPTQ checkpoint folder, each layer named in ``quantized`` packed.

    ``quantized`` maps module names (as in ``model.named_modules()``) to their quantized weights,
    all of ``config``'s bits and group size; every such layer must be packable
    (:func:`packing_problem`: callers refuse those before any work, with the names). The other
    tensors are written as ``save_pretrained`` writes them, the tokenizer (may be None) beside
    them. The folder is validated as a reader would before it takes its place, and appears
    complete or not at all (:func:`compressor.formats.atomic.atomic_dir`). The model is left as it was.
    """
    problems = [p for name, q in quantized.items() if (p := packing_problem(name, *q.shape))]
    problems += [
        f"{name} is quantized at {q.bits} bits, group size {q.group_size}; the config says {config.bits}, {config.group_size}"
        for name, q in quantized.items()
        if (q.bits, q.group_size) != (config.bits, config.group_size)
    ]
    if not quantized:
        problems.append("no quantized layer to write")
    if problems:
        raise ValueError(f"cannot write a GPTQ checkpoint: {'; '.join(problems[:8])}")
    json.dumps(config.to_dict())  # a meta that JSON cannot hold fails here, before any file
    out = Path(out_dir)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            with _packed_modules(model, quantized, config.checkpoint_format), _described_as_gptq(model, config):
                with releasing_writer():
                    model.save_pretrained(tmp, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / QUANTIZE_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
            try:
                validate_gptq_folder(tmp)
            except InvalidInputError as e:
                raise RuntimeError(f"the GPTQ checkpoint just written does not validate: {e}") from e
    except OSError as e:
        raise_output_error(e, out)
    return out
