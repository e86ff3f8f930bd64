"""``--device``: where a run's models, calibration passes, statistics and decompositions live.

One value per run, resolved once at the edge: ``auto`` is the first CUDA device when torch sees
one (under torchrun, the process's own: ``LOCAL_RANK``), else the CPU. A model loaded whole is
moved there; a streamed one reads each block straight onto it. Every later step asks
:func:`model_device`, so nothing else needs the flag.
"""

from __future__ import annotations

import os
import re

import torch

from compressor.errors import UsageError
from compressor.options import DEVICE_HELP
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The device ``spec`` names, checked: UsageError (exit 2) for an unknown name, for CUDA where
    torch has none, and for a CUDA index beyond the devices present."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    match = _SPEC.match(spec.strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UsageError(f"unknown --device {spec!r}: use {DEVICE_HELP}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: torch sees no CUDA device here (torch {torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    number = _default_cuda_index(count) if index is None else int(index)
    if number >= count:
        raise UsageError(f"--device {spec}: there {'is' if count == 1 else 'are'} only {count} CUDA device{'s' if count != 1 else ''} (0-{count - 1})")
    return torch.device("cuda", number)


def _default_cuda_index(count: int) -> int:
    """The process's own GPU under torchrun (``LOCAL_RANK``), else the current one."""
    from compressor.distributed import launched

    local = os.environ.get("LOCAL_RANK", "")
    if launched() and local.isdigit() and int(local) < count:
        return int(local)
    return torch.cuda.current_device()


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` runs: the device a streamed model's blocks are read onto, else where its
    first parameter lives (the CPU for a model without parameters)."""
    from compressor.streaming import weights_of

    store = weights_of(model)
    if store.streamed:
        return store.device
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device
