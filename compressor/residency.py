"""Hand back the memory of weights that are only read from a memory-mapped file.

transformers loads a safetensors checkpoint without copying it: the parameters are views
of the file, mapped into the process, and each page counts as resident memory from the
first time it is read until the mapping goes away. A pass that reads the whole model once
therefore ends up holding all of it, although it needs one block at a time. :func:`release`
drops the pages behind tensors once a pass is done with them (``madvise(MADV_DONTNEED)``);
the next read maps them again from the page cache, which costs microseconds per block.

Dropping a page is harmless only when the kernel can bring the same bytes back: a page of
a file, or of shared memory. A page that was written after mapping (a private copy), or any
page of ordinary anonymous memory, would come back as zeros or as the file's old bytes,
so every page in the range is checked in ``/proc/self/pagemap`` first and a range that
holds one such page is left alone. Off Linux, or where pagemap cannot be read or does not tell
anonymous pages from file pages (checked on a page of our own), nothing happens. The check and
the release are not atomic: no other thread may write the tensors meanwhile (weights are only
read while a model is compressed).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

_MADV_DONTNEED = 4
_PRESENT = np.uint64(1 << 63)
_SWAPPED = np.uint64(1 << 62)
_FILE_OR_SHARED = np.uint64(1 << 61)


_opened: dict[int, int] = {}  # pid -> pagemap descriptor


@lru_cache(maxsize=1)
def _system(pid: int) -> tuple[int, int, object] | None:
    """(page size, pagemap descriptor, libc madvise) or None where release cannot work.

    Keyed by the process id: a forked child must read its own pagemap, not its parent's."""
    for old in [p for p in _opened if p != pid]:
        os.close(_opened.pop(old))
    if not sys.platform.startswith("linux"):
        return None
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    _opened[pid] = fd
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        # Fail closed: a pagemap that does not show a page we just wrote as present and
        # anonymous (a restricted or emulated /proc) cannot vouch for any other page.
        probe = torch.ones(3 * page // 4, dtype=torch.float32)  # three pages of bytes
        entries = _entries(fd, probe.data_ptr() // page, 2)
        if entries.size != 2 or not bool((entries & _PRESENT).all()) or bool((entries & _FILE_OR_SHARED).any()):
            return None
    except (OSError, AttributeError):
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return page, fd, madvise


def _entries(fd: int, first: int, count: int) -> np.ndarray:
    return np.frombuffer(os.pread(fd, 8 * count, 8 * first), dtype=np.uint64)


def _only_file_pages(fd: int, first: int, count: int) -> bool:
    entries = _entries(fd, first, count)
    if entries.size != count:
        return False
    if bool((entries & _SWAPPED).any()):
        return False
    present = (entries & _PRESENT) != 0
    return bool(((entries[present] & _FILE_OR_SHARED) != 0).all())


def _ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The byte ranges the CPU tensors span (a view: its own elements, not its whole storage),
    merged where they touch."""
    found = set()
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        try:
            t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # sparse tensors, tensor subclasses
            continue
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        found.add((t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()))
    spans = sorted(found)
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _page_spans(tensors: Iterable[torch.Tensor], page: int) -> Iterator[tuple[int, int]]:
    """(first page, number of pages) of each of :func:`_ranges`."""
    for start, end in _ranges(tensors):
        first = start // page
        yield first, (end + page - 1) // page - first


def release(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages behind ``tensors`` where that loses nothing; returns the bytes of the
    ranges given back (resident or not).

    Only file-backed (or shared) pages are dropped, so the tensors keep their values: reading
    them again brings the pages back. Pages at a range's edges may be shared with neighbouring
    tensors of the same file; they come back the same way.
    """
    system = _system(os.getpid())
    if system is None:
        return 0
    page, fd, madvise = system
    dropped = 0
    for first, count in _page_spans(tensors, page):
        try:
            if not _only_file_pages(fd, first, count):
                continue
        except OSError:
            return dropped
        if madvise(first * page, count * page, _MADV_DONTNEED) == 0:
            dropped += count * page
    return dropped


@lru_cache(maxsize=None)
def _glibc(name: str):
    """glibc's function ``name`` (``malloc_trim``, ``mallopt``), or None elsewhere."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def return_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Memory a block step frees stays with the allocator, scattered between live blocks, and a
    pass ends up holding the high-water mark of every step before it; returned after each
    block, the next block faults in what it needs afresh (~2 % of a factorize run's time).
    """
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


MMAP_THRESHOLD = 4 << 20  # bytes: larger allocations get pages of their own, returned when freed
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with pages of its own (glibc's
    ``M_MMAP_THRESHOLD``), unless the environment sets ``MALLOC_MMAP_THRESHOLD_``. Returns whether
    it was set.

    glibc raises the threshold by itself, up to 32 MB, each time such a block is freed; the
    activations and products of a block step (4-33 MB each) then come from the heap, where the
    freed ones stay between live ones and the step's peak grows by what is scattered there. Fixed
    at 4 MB, a LLaMA-1B block's forward pass with its Grams took 0.18 GB above its starting state
    instead of 0.37 GB (docs/scale.md).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = _glibc("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


KERNEL_CACHE_CAPACITY = 64  # compiled matmul kernels kept, per cache


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Bound the caches of compiled CPU matmul kernels (oneDNN's primitives and ideep's, 1,024
    entries each by default), unless the environment already sets them.

    Each new matrix shape in a bfloat16 product compiles a kernel that stays cached. A
    sequential factorization runs a new shape for nearly every factored matrix (their ranks
    differ), so its resident set grew block after block: SmolLM2's default run peaked at
    0.833 GiB with 1,024 entries and 0.759-0.784 GiB with 64, in the same time (docs/performance.md,
    step 7 of *What brought the peak down*). The libraries read these variables when they first
    compile a kernel, so this must run before the process's first bfloat16 product.
    """
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int | None:
    """How much of the pages behind ``tensors`` is resident now (None where pagemap cannot be read)."""
    system = _system(os.getpid())
    if system is None:
        return None
    page, fd, _ = system
    total = 0
    for first, count in _page_spans(tensors, page):
        total += int(((_entries(fd, first, count) & _PRESENT) != 0).sum()) * page
    return total


class Spill:
    """Move tensors out of anonymous memory into files of ``folder``, mapped back in their place.

    A factorization makes its factors one block at a time and holds them all until it writes the
    checkpoint; spilled, they live in the page cache instead, read back when used and dropped
    again by :func:`release`. Each tensor gets a file of its own (safetensors refuses tensors
    that share a storage). The folder must be on a disk: on a RAM file system (tmpfs) spilling
    only moves the memory elsewhere.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self._count = 0

    def hold(self, tensor: torch.Tensor, writable: bool = False) -> torch.Tensor:
        """A file-backed tensor equal to ``tensor`` (same dtype and shape); a tensor on an accelerator
        is returned as it is (its memory is not the host's). ``writable``: what is written into it
        goes to its file (a shared mapping), so :func:`release` can drop it again after each write;
        otherwise writing gives it private pages."""
        if tensor.device.type != "cpu":
            return tensor
        source = tensor.detach().contiguous()
        if source.numel() == 0:
            return source.clone()
        path = self.folder / f"{self._count:06d}.bin"
        self._count += 1
        with open(path, "wb") as f:
            f.write(source.view(-1).view(torch.uint8).numpy().data)
        mapped = torch.from_file(str(path), shared=writable, size=source.numel(), dtype=source.dtype)
        return mapped.view(source.shape)
