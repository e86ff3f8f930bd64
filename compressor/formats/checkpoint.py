"""A factored checkpoint folder on disk: written atomically, validated from its headers, loaded strictly.

Validation reads ``config.json`` and the safetensors headers (names, shapes, dtypes), never the
weights, and compares them with the model that the config describes, built on the meta device
with a :class:`~compressor.formats.factored.FactoredLinear` at each recorded rank. So the refusals
(missing, unexpected or mis-shaped tensors, ranks that do not fit their factors, an index that
does not match its shards) come before any model is built, with every problem named in one
message, and they hold whatever a transformers release reports about the keys it loads.
Writing, :func:`compressor.api.verify` and loading all use this one check.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from compressor.architecture import model_class
from compressor.errors import InvalidInputError, OutOfResourcesError, first_few, first_line, problems_message
from compressor.formats.atomic import atomic_dir, raise_output_error
from compressor.formats.factored import (
    QUANT_METHOD,
    LowRankConfig,
    LowRankQuantizer,
    factored_modules,
    replace_with_factored,
    resolve_module_name,
)
from compressor.formats.safetensors_header import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TensorHeader,
    read_folder_headers,
    safetensors_weight_files,
)
from compressor.formats.writer import releasing_writer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
PROBLEMS_SHOWN = 8
# Keys of quantization_config that the format owns; caller metadata may not set them.
_RESERVED_KEYS = frozenset({"quant_method", "format_version", "ranks"})
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclass(frozen=True)
class FactoredFolder:
    """A factored checkpoint folder that passed :func:`validate_factored_folder`."""

    path: Path
    quantization_config: dict[str, Any]
    tensors: dict[str, TensorHeader]
    model_class: type  # the class the folder's config.json builds

    @property
    def ranks(self) -> dict[str, int]:
        return dict(self.quantization_config.get("ranks", {}))

    @property
    def files(self) -> list[Path]:
        return [self.path / name for name in sorted({t.file for t in self.tensors.values()})]


def loading_problems(info: dict | None) -> "_Problems":
    """What ``from_pretrained(..., output_loading_info=True)`` reported missing, unexpected or mismatched."""
    problems = _Problems()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(_key_text(k) for k in (info or {}).get(kind) or ())
        if keys:
            problems.append(f"{kind.replace('_', ' ')}: {first_few(keys)}")
    return problems


def _key_text(key: object) -> str:
    """A key of the loading report; a mismatched one is (name, checkpoint shape, model shape)."""
    if isinstance(key, tuple) and len(key) == 3:
        name, found, needed = key
        return f"{name} is {list(found)}, the model needs {list(needed)}"
    return str(key)


class _Problems(list):
    def raise_if_any(self, what: str) -> None:
        if self:
            raise InvalidInputError(problems_message(what, self, PROBLEMS_SHOWN))


# --------------------------------------------------------------------------------------------
# Reading and validating


def read_quantization_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json's quantization_config, after checking that it describes a factored checkpoint
    of a format version this code reads. Raises InvalidInputError naming what it found."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise InvalidInputError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"cannot read {config_path}: {e}") from e
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qconfig, dict):
        raise InvalidInputError(f"{path} is not a factored checkpoint: config.json has no quantization_config")
    method = qconfig.get("quant_method")
    if method != QUANT_METHOD:
        raise InvalidInputError(
            f"{path} is not a factored checkpoint: quantization_config.quant_method is {method!r}, "
            f"expected {QUANT_METHOD!r}"
        )
    try:
        LowRankConfig(**qconfig)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{path}: {e}") from e
    return qconfig


def _read_tensor_headers(folder: Path, problems: list[str]) -> dict[str, TensorHeader]:
    """Every tensor of the folder's safetensors files, from their checked headers
    (:func:`~compressor.formats.safetensors_header.read_folder_headers`); a factored checkpoint's
    files must also carry the metadata ``format: pt``. Problems are appended to ``problems``."""
    found = safetensors_weight_files(folder)
    if found is None:
        raise InvalidInputError(f"{folder} has no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME})")
    files, weight_map = found
    return read_folder_headers(folder, files, weight_map, problems, require_pt_format=True)


@dataclass(frozen=True)
class _Expected:
    """The tensors the described model holds: parameters in groups of tied names (a checkpoint holds
    at least one name of each group), and persistent buffers (optional: the model makes its own)."""

    model_class: type
    parameters: list[tuple[list[str], tuple[int, ...]]]
    buffers: dict[str, tuple[int, ...]]
    factored: dict[str, str]  # recorded module name → its name in the model
    geometry: dict[str, tuple[int, int]]  # model module name → (out, in)
    rename: _Renamer  # checkpoint name → model name
    ignored_missing: tuple[re.Pattern[str], ...]  # the model's own `_keys_to_ignore_on_load_missing`
    ignored_unexpected: tuple[re.Pattern[str], ...]  # and `_keys_to_ignore_on_load_unexpected`


class _Renamer:
    """Checkpoint tensor name → the model's, as transformers renames it while loading.

    ``save_pretrained`` reverts transformers' conversions, so a folder can name tensors otherwise
    than the model in memory does: legacy names for every architecture (``LayerNorm.gamma``, and
    5.0 writes them back when it saves a model it loaded), prefixes of multimodal models
    (``language_model.model.…``). The renamings are transformers' own; where it also converts
    tensors while loading (fuses MoE experts), ``converts`` is set: only the factored modules can
    then be checked by name here, and the rest is left to the report of the load that follows."""

    def __init__(self, skeleton: Any) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        conversions = copy.deepcopy(get_model_conversion_mapping(skeleton))  # renaming marks them used
        self.renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self.converts = len(self.renamings) < len(conversions)

    def __call__(self, key: str) -> str:
        for renaming in self.renamings:
            key, _ = renaming.rename_source_key(key)
        return key


def _expected_tensors(folder: Path, ranks: Mapping[str, int]) -> _Expected:
    """Build the model that config.json describes on the meta device, factored at ``ranks``."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"cannot read the model config at {folder}: {first_line(e)}") from e
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is built plain, then factored by us
    cls = model_class(config)
    try:
        with torch.device("meta"):
            skeleton = cls._from_config(config)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise InvalidInputError(f"cannot build the model that {folder}/config.json describes: {first_line(e)}") from e
    module_names = {name for name, _ in skeleton.named_modules()}
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    try:
        factored = {recorded: resolve_module_name(recorded, module_names, prefix) for recorded in ranks}
        replace_with_factored(skeleton, ranks)
    except ValueError as e:
        raise InvalidInputError(f"{folder}: {e}") from e
    groups: dict[int, list[str]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        shapes[id(p)] = tuple(p.shape)
    parameters = [(names, shapes[key]) for key, names in groups.items()]
    declared = getattr(skeleton, "all_tied_weights_keys", None) or {}
    if declared:  # a tie the model declares but did not make on the meta device: merge the groups
        by_name = {n: i for i, (names, _) in enumerate(parameters) for n in names}
        for target, source in declared.items():
            i, j = by_name.get(target), by_name.get(source)
            if i is not None and j is not None and i != j and parameters[i][1] == parameters[j][1]:
                parameters[j][0].extend(parameters[i][0])
                parameters[i] = ([], parameters[i][1])
        parameters = [(names, shape) for names, shape in parameters if names]
    param_names = {n for names, _ in parameters for n in names}
    buffers = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k not in param_names}
    geometry = {name: (m.out_features, m.in_features) for name, m in factored_modules(skeleton).items()}
    def patterns(attribute: str) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(p) for p in getattr(skeleton, attribute, None) or ())

    return _Expected(
        cls, parameters, buffers, factored, geometry, _Renamer(skeleton),
        patterns("_keys_to_ignore_on_load_missing"), patterns("_keys_to_ignore_on_load_unexpected"),
    )


def validate_factored_folder(path: str | os.PathLike[str]) -> FactoredFolder:
    """Check a factored checkpoint against its config before anything is built or read.

    Raises InvalidInputError naming every problem: a quantization_config that is not ours or of an
    unknown version; missing, unexpected, mis-shaped or non-floating factor tensors; recorded
    ranks that do not fit the factors; shards that do not match their index.
    """
    folder = Path(path)
    qconfig = read_quantization_config(folder)
    ranks = dict(qconfig.get("ranks", {}))
    problems = _Problems()
    tensors = _read_tensor_headers(folder, problems)
    expected = _expected_tensors(folder, ranks)
    model_names = {key: expected.rename(key) for key in tensors}
    by_model_name = {model_names[key]: header for key, header in tensors.items()}
    misfits: set[str] = set()  # factors of another rank than recorded: reported as such, once
    for recorded, rank in ranks.items():
        name = expected.factored[recorded]
        out_features, in_features = expected.geometry[name]
        a, b = by_model_name.get(f"{name}.weight_a"), by_model_name.get(f"{name}.weight_b")
        if a is not None and b is not None and len(a.shape) == len(b.shape) == 2:
            if (a.shape[1], b.shape[0]) == (in_features, out_features) and a.shape[0] == b.shape[1] != rank:
                problems.append(f"{recorded}: config.json records rank {rank}, its factors have rank {a.shape[0]}")
                misfits.update((f"{name}.weight_a", f"{name}.weight_b"))
        for header, key in ((a, "weight_a"), (b, "weight_b")):
            if header is not None and header.dtype not in FLOAT_DTYPES:
                problems.append(f"{name}.{key} is {header.dtype}, not a floating-point tensor")
    factored_prefixes = tuple(f"{name}." for name in expected.factored.values())
    checked = (lambda n: n.startswith(factored_prefixes)) if expected.rename.converts else (lambda n: True)
    known: set[str] = set()
    for names, shape in expected.parameters:
        known.update(names)
        if not any(checked(n) for n in names):
            continue
        present = [n for n in names if n in by_model_name]
        if not present and not any(p.search(n) for p in expected.ignored_missing for n in names):
            problems.append(f"missing {names[0]} {list(shape)}")
        for n in present:
            if by_model_name[n].shape != shape and n not in misfits:
                problems.append(f"{n} is {list(by_model_name[n].shape)}, the model needs {list(shape)}")
    for n, shape in expected.buffers.items():
        known.add(n)
        if n in by_model_name and by_model_name[n].shape != shape:
            problems.append(f"{n} is {list(by_model_name[n].shape)}, the model needs {list(shape)}")
    unexpected = sorted(
        key for key, name in model_names.items()
        if name not in known and checked(name) and not any(p.search(name) for p in expected.ignored_unexpected)
    )
    if unexpected:
        problems.append(f"unexpected tensors: {first_few(unexpected)}")
    problems.raise_if_any(f"the checkpoint at {folder} does not match the model its config.json describes")
    return FactoredFolder(folder, qconfig, tensors, expected.model_class)


# --------------------------------------------------------------------------------------------
# Loading


def load_factored(
    path: str | os.PathLike[str] | FactoredFolder, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Any]:
    """Load a factored checkpoint strictly: (model in eval mode, tokenizer or None).

    The folder is validated first (:func:`validate_factored_folder`, unless it already was);
    then stock ``from_pretrained`` builds the model, and anything it still reports as missing,
    unexpected or mismatched is refused as well.
    """
    folder = path if isinstance(path, FactoredFolder) else validate_factored_folder(path)
    try:
        model, info = folder.model_class.from_pretrained(folder.path, dtype=dtype, output_loading_info=True)
    except MemoryError as e:
        raise OutOfResourcesError(f"out of memory while loading {folder.path}") from e
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise InvalidInputError(f"cannot load the factored checkpoint at {folder.path}: {first_line(e)}") from e
    problems = loading_problems(info)
    loaded = {name: m.rank for name, m in factored_modules(model).items()}
    names = {name for name, _ in model.named_modules()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    recorded = {resolve_module_name(name, names, prefix): rank for name, rank in folder.ranks.items()}
    if loaded != recorded:
        problems.append("the factored modules built differ from the recorded ranks")
    problems.raise_if_any(f"the checkpoint at {folder.path} does not match its model")
    model.eval()
    return model, _load_tokenizer(folder.path)


def _load_tokenizer(folder: Path) -> Any:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"cannot load the tokenizer at {folder}: {first_line(e)}") from e


# --------------------------------------------------------------------------------------------
# Saving


def save_factored(
    model: PreTrainedModel,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write ``model`` (already holding FactoredLinear modules) as a factored checkpoint folder.

    ``metadata`` fills the free fields of quantization_config (``method``, ``target``,
    ``calibration``, and any other JSON-serialisable key except the format's own ones); the ranks
    are read from the modules. ``tokenizer`` may be None. The folder is validated as a reader
    would before it takes its place, and appears complete or not at all
    (:func:`compressor.formats.atomic.atomic_dir`). The model is left as it was.
    """
    reserved = _RESERVED_KEYS & set(metadata)
    if reserved:
        raise ValueError(f"metadata may not set {', '.join(sorted(reserved))}: the format records them")
    try:
        json.dumps(dict(metadata))
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata is not JSON-serialisable: {e}") from e
    ranks = {name: m.rank for name, m in factored_modules(model).items()}
    qconfig = LowRankConfig(ranks=ranks, **dict(metadata))
    out = Path(out_dir)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            from compressor.streaming import weights_of

            with _described_as_factored(model, qconfig), releasing_writer(weights_of(model).read_for_writing):
                model.save_pretrained(tmp, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            try:
                validate_factored_folder(tmp)
            except InvalidInputError as e:
                raise RuntimeError(f"the factored checkpoint just written does not validate: {e}") from e
    except OSError as e:
        raise_output_error(e, out)
    return out


@contextmanager
def _described_as_factored(model: PreTrainedModel, qconfig: LowRankConfig) -> Iterator[None]:
    """Temporarily give the model our quantization_config and no quantizer, so save_pretrained
    writes the factors as plain tensors and records the config; restore both afterwards."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not isinstance(quantizer, LowRankQuantizer):
        method = getattr(quantizer.quantization_config, "quant_method", "?")
        raise ValueError(f"the model is quantized with {method}; it cannot be saved as a factored checkpoint")
    config = model.config
    missing = object()
    saved_config = vars(config).get("quantization_config", missing)
    saved_quantizer = vars(model).get("hf_quantizer", missing)
    config.quantization_config = qconfig.to_dict()
    model.hf_quantizer = None
    try:
        yield
    finally:
        if saved_config is missing:
            if hasattr(config, "quantization_config"):
                del config.quantization_config
        else:
            config.quantization_config = saved_config
        if saved_quantizer is missing:
            del model.hf_quantizer
        else:
            model.hf_quantizer = saved_quantizer
