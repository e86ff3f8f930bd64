"""Which modules are compression targets, and their weights as (out, in) matrices.

GPT-2's Conv1D stores its weight as (in, out); it is transposed here and nowhere else.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - every supported transformers has it
    Conv1D = ()  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class Target:
    name: str
    module: nn.Module
    block_index: int | None  # None: outside the transformer blocks (e.g. lm_head)
    kind: str  # "linear" | "conv1d" | "factored" (a FactoredLinear: B·A)

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in)"""
        if self.kind == "factored":
            return (self.module.out_features, self.module.in_features)
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.kind == "conv1d" else (w.shape[0], w.shape[1])

    @property
    def params(self) -> int:
        out_features, in_features = self.shape
        return out_features * in_features

    @property
    def layer_type(self) -> str:
        """The name within its block (``self_attn.q_proj``), the same for every layer."""
        if self.block_index is None:
            return self.name
        marker = f".{self.block_index}."
        return self.name.split(marker, 1)[1] if marker in self.name else self.name

    def weight(self) -> torch.Tensor:
        """The weight as (out, in): a view of the module's parameter, or B·A for a factored module
        (a new tensor, in float32 or wider)."""
        if self.kind == "factored":
            b, a = self.module.weight_b.detach(), self.module.weight_a.detach()
            dtype = torch.promote_types(b.dtype, torch.float32)
            return b.to(dtype) @ a.to(dtype)
        w = self.module.weight.detach()
        return w.t() if self.kind == "conv1d" else w


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the ModuleList holding the most parameters."""
    best: tuple[str, nn.ModuleList] | None = None
    best_params = -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            n = sum(p.numel() for p in module.parameters())
            if n > best_params:
                best, best_params = (name, module), n
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks")
    return best


def module_kind(module: nn.Module, factored: bool = False) -> str | None:
    """"linear", "conv1d", "factored" (only when ``factored``) or None for any other module."""
    if isinstance(module, nn.Linear):
        return "linear"
    if bool(Conv1D) and isinstance(module, Conv1D):
        return "conv1d"
    if factored:
        from compressor.formats.factored import FactoredLinear

        if isinstance(module, FactoredLinear):
            return "factored"
    return None


def select_targets(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None, factored: bool = False
) -> list[Target]:
    """Linear/Conv1D modules inside the blocks, or those matching ``include`` globs anywhere.

    ``exclude`` globs are removed last. Embeddings and the LM head are outside the blocks,
    hence excluded unless an ``include`` pattern names them. ``factored``: FactoredLinear modules
    count too (compensation corrects them; factorization cannot factor them again).
    """
    blocks_name, blocks = find_blocks(model)
    prefix = f"{blocks_name}." if blocks_name else ""
    targets = []
    for name, module in model.named_modules():
        kind = module_kind(module, factored)
        if kind is None:
            continue
        block_index = None
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            block_index = int(head) if head.isdigit() else None
        if include:
            chosen = any(fnmatch.fnmatchcase(name, p) for p in include)
        else:
            chosen = block_index is not None
        if chosen and exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            chosen = False
        if chosen:
            targets.append(Target(name, module, block_index, kind))
    return targets
