"""Safetensors files and folders checked from their headers before anything reads a weight.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON describing
each tensor (dtype, shape, byte range in the data that follows), then the data. safetensors'
own reader checks much of this too, but only when a file is opened, and its errors surface from
deep inside transformers as whatever exception the caller happens to catch (or not). Reading the
header here, once, before any load gives one :class:`InvalidInputError` that names the file and
every problem, whatever later reads the file.

A sharded folder adds ``model.safetensors.index.json``: its ``weight_map`` names, per tensor,
the shard that holds it. :func:`read_weight_map` checks the index itself (and that its file
names stay inside the folder); :func:`read_folder_headers` checks every shard and that the index
and the shards agree, tensor by tensor. The factored, GPTQ and plain loaders all use these two.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import InvalidInputError, first_few, first_line, problems_message

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit: a larger header is refused by its reader

# Bits per element of each dtype safetensors writes (sub-byte dtypes pack several per byte).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it; offsets are relative to the data start."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None  # the header's ``__metadata__``, when it has one
    data_start: int  # byte offset of the data region in the file: 8 + the header's length


@dataclass(frozen=True)
class TensorHeader:
    """A tensor of a folder's weights: which file holds it, and its shape and dtype."""

    file: str  # name of the safetensors file in the folder
    shape: tuple[int, ...]
    dtype: str  # safetensors' code: F32, BF16, ...


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and check a safetensors file's header without reading its data.

    Refused, all named in one InvalidInputError: a file shorter than 8 bytes; a header length
    beyond the file or above :data:`MAX_HEADER_BYTES`; a header that is not a UTF-8 JSON object
    (starting with ``{``, as safetensors' reader requires), or
    names a key twice; a ``__metadata__`` that is not a str → str map; an entry without a known
    dtype, a shape of non-negative integers, or ``data_offsets`` [begin, end] with begin ≤ end ≤
    the data size and a byte length of exactly its elements × the dtype's size; tensors that
    overlap, leave gaps, or do not cover the data region to its end.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InvalidInputError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise InvalidInputError(
                    f"{path}: the header length {length} exceeds the file's {size - 8} bytes after it "
                    "(a truncated or corrupt safetensors file)"
                )
            if length > MAX_HEADER_BYTES:
                raise InvalidInputError(f"{path}: the header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(length)
    except OSError as e:
        raise InvalidInputError(f"cannot read {path}: {e.strerror or e}") from e
    if not raw.startswith(b"{"):  # safetensors' reader refuses any other start, whitespace included
        raise InvalidInputError(f"{path}: the safetensors header does not start with '{{' (not a safetensors file)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path}: the safetensors header is not UTF-8 text") from None
    except _DuplicateKey as e:
        raise InvalidInputError(f"{path}: the safetensors header names {e.key!r} twice") from None
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or an integer of thousands of digits
        raise InvalidInputError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    data_size = size - 8 - length
    problems: list[str] = []
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        problems.append("__metadata__ must map strings to strings")
        metadata = None
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        entry_problems = _entry_problems(entry)
        if entry_problems:
            problems.extend(f"{name}: {p}" for p in entry_problems)
        else:
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            tensors[name] = TensorEntry(entry["dtype"], shape, begin, end)
    past_end = sorted(name for name, t in tensors.items() if t.end > data_size)
    if past_end:  # one problem, not one per tensor: the usual cause is a file cut short
        needed = max(t.end for t in tensors.values())
        problems.append(
            f"the data of {first_few(past_end, 3)} lies past the end of the file: the tensors need {needed} "
            f"bytes of data, the file holds {data_size} (it is truncated, or its data_offsets are wrong)"
        )
    if not problems:
        problems.extend(_layout_problems(tensors, data_size))
    if problems:
        raise InvalidInputError(problems_message(f"{path} is not a valid safetensors file", problems))
    return SafetensorsHeader(path, tensors, metadata, 8 + length)


def _entry_problems(entry: Any) -> list[str]:
    if not isinstance(entry, dict):
        return [f"its entry is a JSON {type(entry).__name__}, not an object"]
    problems = []
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        problems.append(f"unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        problems.append(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        problems.append(f"data_offsets {offsets!r} is not [begin, end] of non-negative integers")
    elif offsets[0] > offsets[1]:
        problems.append(f"data_offsets {offsets} begin after they end")
    if problems:
        return problems
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        problems.append(
            f"{offsets[1] - offsets[0]} bytes of data do not hold shape {shape} of {dtype} ({bits / 8:g} bytes)"
        )
    return problems


def _layout_problems(tensors: dict[str, TensorEntry], data_size: int) -> list[str]:
    """The tensors must tile the data region: each starts where the previous one ended, the first
    at 0, the last ends at the end of the file (as safetensors' ``Metadata::validate`` requires)."""
    problems = []
    position = 0
    previous = None
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if t.begin < position:
            problems.append(f"{name} overlaps {previous}")
        elif t.begin > position:
            problems.append(f"{t.begin - position} bytes before {name} belong to no tensor")
        position = max(position, t.end)
        previous = name
    if position != data_size:
        problems.append(f"the tensors cover {position} of the {data_size} bytes of data")
    return problems


# --------------------------------------------------------------------------------------------
# Folders: the index and its shards


def check_file_name(folder: Path, name: str, where: object) -> None:
    """Refuse a file name (from an index) that could point outside ``folder``: ``..``, an absolute
    path, a path separator, or a symlink that resolves outside the folder. A Hugging Face cache
    snapshot (``…/snapshots/REV/``) links its files to ``…/blobs/``, which is allowed."""
    if not name or ".." in name or os.path.isabs(name) or "/" in name or "\\" in name or os.sep in name:
        raise InvalidInputError(f"{where} names {name!r}: a file name in the folder may not hold a path")
    path = folder / name
    if path.is_symlink():
        target = path.resolve()
        allowed = [folder.resolve()]
        if folder.resolve().parent.name == "snapshots":
            allowed.append(folder.resolve().parent.parent / "blobs")
        if not any(target.is_relative_to(root) for root in allowed):
            raise InvalidInputError(f"{where} names {name!r}, a symlink to {target}, outside {folder}")


def read_json(path: Path) -> Any:
    """A JSON file's value; InvalidInputError naming ``path`` when it cannot be read or parsed
    (not UTF-8, not JSON, nested too deeply, an integer of thousands of digits)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidInputError(f"cannot read {path}: {e.strerror or e}") from e
    except (ValueError, RecursionError) as e:
        raise InvalidInputError(f"cannot read {path}: {first_line(e)}") from e


def read_weight_map(folder: str | os.PathLike[str], index_name: str = SAFE_WEIGHTS_INDEX_NAME) -> dict[str, str]:
    """The index's tensor → file map, checked: valid JSON whose ``weight_map`` maps strings to
    the names of files in the folder (:func:`check_file_name`) that exist. InvalidInputError
    otherwise, naming the index and the problem."""
    folder = Path(folder)
    index = folder / index_name
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise InvalidInputError(f"{index}: weight_map must map tensor names to file names")
    if not isinstance(data.get("metadata", {}), dict):  # transformers adds keys to it
        raise InvalidInputError(f"{index}: its metadata is a JSON {type(data['metadata']).__name__}, not an object")
    names = sorted(set(weight_map.values()))
    try:
        for name in names:
            check_file_name(folder, name, index)
        missing = [name for name in names if not (folder / name).is_file()]
    except OSError as e:  # a name too long for the file system, say
        raise InvalidInputError(f"{index} names a file that cannot be looked up: {e.strerror or e}") from e
    if missing:
        raise InvalidInputError(f"{index}: {first_few(missing, 3)}, named by the index, {'is' if len(missing) == 1 else 'are'} missing")
    return weight_map


def safetensors_weight_files(folder: str | os.PathLike[str]) -> tuple[list[str], dict[str, str] | None] | None:
    """The safetensors files a loader reads from ``folder`` and the index's weight map: a single
    ``model.safetensors`` (which wins over an index beside it, as in transformers), or the shards a
    valid index names; None when the folder has neither."""
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [SAFE_WEIGHTS_NAME], None
    if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        weight_map = read_weight_map(folder)
        return sorted(set(weight_map.values())), weight_map
    return None


def read_folder_headers(
    folder: str | os.PathLike[str],
    files: list[str],
    weight_map: dict[str, str] | None,
    problems: list[str],
    *,
    require_pt_format: bool = False,
) -> dict[str, TensorHeader]:
    """Every tensor of ``files`` in ``folder``, from their checked headers
    (:func:`read_safetensors_header`). Problems are appended to ``problems``: an invalid or missing
    file, one without the metadata ``format: pt`` (when ``require_pt_format``), a tensor in two
    files, and, with a ``weight_map``, every disagreement between the index and the shards."""
    folder = Path(folder)
    tensors: dict[str, TensorHeader] = {}
    read: set[str] = set()  # the files whose headers are valid: only they can disagree with the index
    for name in files:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}, named by the index, is missing")
            continue
        try:
            header = read_safetensors_header(path)
        except InvalidInputError as e:
            problems.append(str(e).replace(f"{path}", name, 1))
            continue
        read.add(name)
        if require_pt_format and (header.metadata or {}).get("format") != "pt":
            problems.append(f"{name} lacks the safetensors metadata format=pt")
        for key, entry in header.tensors.items():
            if key in tensors:
                problems.append(f"{key} is in both {tensors[key].file} and {name}")
            tensors[key] = TensorHeader(name, entry.shape, entry.dtype)
    if weight_map is not None:
        for key, name in sorted(weight_map.items()):
            held = tensors.get(key)
            if held is None:
                if name in read:
                    problems.append(f"the index puts {key} in {name}, which does not hold it")
            elif held.file != name:
                problems.append(f"the index puts {key} in {name}, but {held.file} holds it")
        unlisted = sorted(set(tensors) - set(weight_map))
        if unlisted:
            problems.append(f"the index does not list {first_few(unlisted, 3)}")
    return tensors


def check_folder_headers(folder: str | os.PathLike[str]) -> dict[str, TensorHeader] | None:
    """Check the safetensors weights of a plain model folder (:func:`safetensors_weight_files`),
    raising one InvalidInputError naming every problem; None when the folder has none."""
    found = safetensors_weight_files(folder)
    if found is None:
        return None
    files, weight_map = found
    problems: list[str] = []
    tensors = read_folder_headers(folder, files, weight_map, problems)
    if problems:
        raise InvalidInputError(problems_message(f"the weights in {folder} are not valid", problems))
    return tensors
