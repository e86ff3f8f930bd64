"""Several processes on one run (``torchrun --nproc-per-node N compress factorize …``).

Each process runs the layer loop on its own share of the calibration windows; the statistics
(input Grams, loss-gradient sums, token counts) are summed across processes before any math,
so every process holds the same statistics a single process would. The decompositions are
then split by module and their results shared; process 0 alone writes outputs and prints.
Outside torchrun (no ``WORLD_SIZE`` above 1) every function here is a no-op.

Backends: NCCL when the run's device is CUDA, gloo on the CPU.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from compressor.errors import UsageError

T = TypeVar("T")


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def start(device: torch.device) -> None:
    """Join the process group torchrun describes (once; nothing outside torchrun)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; run without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    atexit.register(_stop)


def _stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This process's contiguous share of ``items`` (all of them outside torchrun). Every process
    must get at least one: fewer items than processes is a usage error."""
    n, count = world_size(), len(items)
    if n == 1:
        return list(items)
    if count < n:
        raise UsageError(f"{count} calibration batch{'es' if count != 1 else ''} cannot be shared by {n} processes: "
                         "give more calibration windows or start fewer processes")
    r = rank()
    return list(items[r * count // n : (r + 1) * count // n])


def _reduction_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed across processes, in place where it already lives on the backend's device."""
    if not active():
        return tensor
    device = _reduction_device()
    if tensor.device == device:
        dist.all_reduce(tensor)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved)
    tensor.copy_(moved.to(tensor.device))
    return tensor


def sum_int(value: int) -> int:
    if not active():
        return value
    return int(sum_(torch.tensor([value], dtype=torch.int64)).item())


def split_work(names: Sequence[str], make: Callable[[list[str]], dict[str, T]]) -> dict[str, T]:
    """``make(names)`` with the names split across processes (each makes every n-th), the
    results then shared so that every process returns all of them, in ``names``' order."""
    if not active():
        return make(list(names))
    mine = make([name for i, name in enumerate(names) if i % world_size() == rank()])
    gathered: list[dict[str, T] | None] = [None] * world_size()
    dist.all_gather_object(gathered, mine)
    merged: dict[str, T] = {}
    for part in gathered:
        merged.update(part or {})
    return {name: merged[name] for name in names}
