"""The baseline file of ``compress check``: a reference model's predictions on fixed windows, kept
compactly in JSON so that CI compares a compressed model with it without loading the original.

Arrays are stored as ``{"dtype", "shape", "zlib_base64"}``: the little-endian bytes, deflated,
in base64. About 330 bytes per predicted token (5.4 MB for 32 windows of 512): see
:class:`compressor.evaluate.ReferenceStats` for what is kept and why.
"""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.errors import InvalidInputError, first_line
from compressor.evaluate import ReferenceStats

FORMAT = "compress-check-baseline"
VERSION = 1
_ARRAYS = {  # name → (dtype, columns: None for one value per token, "k"/"s" for the stored widths)
    "top_ids": ("int32", "k"),
    "top_logp": ("float32", "k"),
    "tail_ids": ("int32", "s"),
    "tail_logp_mean": ("float32", None),
    "tail_mass": ("float32", None),
}


def _encode(t: torch.Tensor, dtype: str) -> dict[str, Any]:
    array = np.ascontiguousarray(t.numpy().astype(np.dtype(dtype).newbyteorder("<")))
    return {
        "dtype": dtype,
        "shape": list(array.shape),
        "zlib_base64": base64.b64encode(zlib.compress(array.tobytes(), 6)).decode("ascii"),
    }


def _decode(entry: Any, dtype: str, name: str) -> torch.Tensor:
    if not isinstance(entry, dict) or entry.get("dtype") != dtype:
        raise ValueError(f"{name} must be an array of {dtype}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"{name} has no valid shape")
    raw = zlib.decompress(base64.b64decode(entry.get("zlib_base64", ""), validate=True))
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise ValueError(f"{name} holds {len(raw)} bytes, its shape {shape} needs {expected}")
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return torch.from_numpy(array.astype(np.dtype(dtype))).clone()


def baseline_json(stats: ReferenceStats, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        **meta,
        "seq_len": stats.seq_len,
        "windows": stats.windows,
        "tokens_sha256": stats.tokens_sha256,
        "perplexity": stats.perplexity,
        "window_nll": stats.window_nll,
        "arrays": {name: _encode(getattr(stats, name), dtype) for name, (dtype, _) in _ARRAYS.items()},
    }


def read_baseline(path: str | os.PathLike[str]) -> tuple[ReferenceStats, dict[str, Any]]:
    """A baseline file, validated: (its stats, the whole JSON minus the arrays). InvalidInputError
    (exit 3) names what is wrong with a file that is not a baseline of this version."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"cannot read the baseline {path}: {first_line(e)}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidInputError(f"{path} is not a compress check baseline (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise InvalidInputError(f"{path}: baseline version {data.get('version')!r}; this compress reads version {VERSION}")
    try:
        seq_len, windows = data["seq_len"], data["windows"]
        if not (isinstance(seq_len, int) and seq_len >= 2 and isinstance(windows, int) and windows >= 1):
            raise ValueError("seq_len and windows must be integers ≥ 2 and ≥ 1")
        nll = data["window_nll"]
        if not (isinstance(nll, list) and len(nll) == windows and all(isinstance(v, (int, float)) and math.isfinite(v) for v in nll)):
            raise ValueError(f"window_nll must hold {windows} finite numbers")
        if not isinstance(data["tokens_sha256"], str):
            raise ValueError("tokens_sha256 must be a string")
        arrays = {name: _decode(data["arrays"][name], dtype, name) for name, (dtype, _) in _ARRAYS.items()}
        tokens = windows * (seq_len - 1)
        widths = {"k": arrays["top_ids"].shape[-1], "s": arrays["tail_ids"].shape[-1]}
        for name, (_, columns) in _ARRAYS.items():
            shape = (tokens,) if columns is None else (tokens, widths[columns])
            if tuple(arrays[name].shape) != shape:
                raise ValueError(f"{name} is {list(arrays[name].shape)}, {windows} windows of {seq_len} need {list(shape)}")
            if arrays[name].is_floating_point() and not bool(torch.isfinite(arrays[name]).all()):
                raise ValueError(f"{name} holds NaN or Inf")
        if widths["k"] < 1:
            raise ValueError("top_ids must hold at least one token per position")
        for name in ("top_ids", "tail_ids"):
            if arrays[name].numel() and int(arrays[name].min()) < 0:
                raise ValueError(f"{name} holds negative token ids")
    except (KeyError, TypeError, ValueError, zlib.error, base64.binascii.Error) as e:
        raise InvalidInputError(f"{path}: not a valid baseline: {first_line(e)}") from e
    stats = ReferenceStats(seq_len, windows, data["tokens_sha256"], [float(v) for v in nll], **arrays)
    meta = {k: v for k, v in data.items() if k not in ("arrays", "window_nll")}
    return stats, meta
