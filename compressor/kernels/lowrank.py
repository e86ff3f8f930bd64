"""y = x·Aᵀ·Bᵀ (+ bias), with A (r×in) and B (out×r): the factored layer's forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lowrank_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(F.linear(x, a), b, bias)
