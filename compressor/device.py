"""``--device``: where a run's models, calibration passes, statistics and decompositions live.

One value per run, resolved once at the edge: ``auto`` is the first CUDA device when torch sees
one, else the CPU. The model is moved there after loading; every later step follows the model's
parameters (``next(model.parameters()).device``), so nothing else needs the flag.
"""

from __future__ import annotations

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
    if kind == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: torch sees no CUDA device here (torch {torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    number = torch.cuda.current_device() if index is None else int(index)
    if number >= count:
        raise UsageError(f"--device {spec}: there {'is' if count == 1 else 'are'} only {count} CUDA device{'s' if count != 1 else ''} (0-{count - 1})")
    return torch.device("cuda", number)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (the CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device
