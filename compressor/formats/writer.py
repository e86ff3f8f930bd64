"""A safetensors file written one tensor at a time, each tensor's mapped pages released as written.

safetensors' own writer reads every tensor of a shard while it writes; for weights that are
views of memory-mapped files (the source checkpoint, spilled factors) that makes the whole
model resident at the end of a run that otherwise held one block at a time; even one large
tensor (SmolLM2's embedding, 113 MB) is released in slices as they are written. The format is
an 8-byte little-endian header length, the JSON header (padded with spaces to a multiple
of 8), then the tensors' bytes at the offsets the header gives.
"""

from __future__ import annotations

import contextvars
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch

from compressor.residency import release

WRITE_CHUNK_BYTES = 16 << 20  # a tensor is read, written and released this much at a time

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    **{getattr(torch, name): code for name, code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                                                     ("float8_e8m0fnu", "F8_E8M0")) if hasattr(torch, name)},
}


def dtype_of_code(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``BF16`` → torch.bfloat16)."""
    for dtype, name in _DTYPES.items():
        if name == code:
            return dtype
    raise ValueError(f"safetensors dtype {code} has no torch dtype")


def save_file(tensors: Mapping[str, torch.Tensor], filename: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, reading and releasing one tensor at a time.

    Any safetensors reader loads it; the layout is not byte for byte safetensors' own (its order of
    tensors differs where dtypes of one width mix). Widest elements first, then by name, so that
    every tensor starts aligned to its element size."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata is not None else {}
    offset = 0
    for name, t in items:
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in items:
            if t.device.type == "meta":  # a streamed model's weight, still in its checkpoint: copied over a slice at a time
                reader = _META_READER.get()
                if reader is None:
                    raise ValueError(f"{name} is on the meta device: it has no data to write")
                written = 0
                for part in reader(name, t):
                    f.write(part.contiguous().view(torch.uint8).numpy().data)
                    written += part.numel()
                if written != t.numel():
                    raise ValueError(f"{name}: read {written} values of {t.numel()}")
                continue
            data = t.detach().to("cpu").contiguous().view(-1)
            step = max(1, WRITE_CHUNK_BYTES // data.element_size())
            for start in range(0, data.numel(), step):
                part = data[start : start + step]
                f.write(part.view(torch.uint8).numpy().data)
                release([part])
            release([t])  # where `data` is a copy, the pages it was read from


_META_READER: contextvars.ContextVar[Callable[[str, torch.Tensor], Iterable[torch.Tensor]] | None] = contextvars.ContextVar(
    "compress_meta_reader", default=None
)


@contextmanager
def releasing_writer(meta_reader: Callable[[str, torch.Tensor], Iterable[torch.Tensor]] | None = None) -> Iterator[None]:
    """Have transformers' ``save_pretrained`` write its shards with :func:`save_file`.

    Only the name transformers calls is swapped, for the duration; if a release of transformers
    stops calling it, saving still works, with safetensors' own writer. ``meta_reader(name,
    tensor)``: the data of a tensor on the meta device (a streamed model's weight, read from its
    checkpoint a slice at a time as the shards are written).
    """
    from transformers import modeling_utils

    saved = getattr(modeling_utils, "safe_save_file", None)
    if saved is None:
        if meta_reader is not None:
            raise RuntimeError("this transformers release does not write through safe_save_file: a streamed model cannot be saved")
        yield
        return
    modeling_utils.safe_save_file = save_file
    token = _META_READER.set(meta_reader)
    try:
        yield
    finally:
        _META_READER.reset(token)
        modeling_utils.safe_save_file = saved
