"""Input Gram matrices XᵀX of target modules, accumulated over calibration batches.

Modules fed the very same input tensor (q/k/v, gate/up) share one Gram. Each batch's
XᵀX is summed into a float64 accumulator (float32 for bfloat16 products: :func:`_sum_dtype`);
activations are never all held in memory. The
product itself runs in the pass's precision: under bfloat16 autocast (active in these hooks)
the batch's rows are cast to bfloat16 once and the product is a bfloat16 product, rounded to
8 significant bits per batch (``benchmarks/gram_precision.py`` measures what that does to the
whitened spectra); outside autocast it is a float32 product.
On the CPU only the upper block triangle is multiplied and kept (GRAM_BLOCKS column blocks,
:class:`compressor.math.symmetric.UpperPanels`: 9/16 of a full product's work and memory for 8
blocks), with torch's own BLAS. SciPy's
``syrk`` does half the work, but its BLAS threads keep spinning after each call and halve
the speed of the forward passes between them on a small machine (measured 2.2x slower).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.math.symmetric import UpperPanels

GRAM_BLOCKS = 8  # column blocks of the CPU accumulator: it holds 9/16 of the matrix


@dataclass
class Gram:
    """XᵀX over ``tokens`` input rows, shared by the modules in ``modules``."""

    modules: list[str]
    dim: int
    tokens: int = 0
    of_outputs: bool = False  # YᵀY of the module's outputs Y = X·Wᵀ, not XᵀX
    _upper: UpperPanels | None = field(default=None, repr=False)  # CPU: the upper block triangle
    _device_sum: torch.Tensor | None = field(default=None, repr=False)
    _matrix: torch.Tensor | None = field(default=None, repr=False)
    _freed: bool = field(default=False, repr=False)

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        # once, rather than by autocast for every block; outputs are few columns: float32 costs little there
        rows = rows.to(torch.float32 if self.of_outputs else _product_dtype(rows.device.type))
        self.tokens += rows.shape[0]
        self._matrix = None
        if rows.device.type != "cpu":
            # On an accelerator a full float32 matmul is cheap; keep the sum there in float64.
            product = (rows.T @ rows).to(torch.float64)
            self._device_sum = product if self._device_sum is None else self._device_sum + product
            return
        if self._upper is None:
            self._upper = UpperPanels(self.dim, GRAM_BLOCKS, _sum_dtype(rows.dtype))
        self._upper.add_gram(rows)

    @property
    def matrix(self) -> torch.Tensor:
        """The full symmetric XᵀX on the CPU, float64 (float32 where the products were 16-bit: :func:`_sum_dtype`) (built once until more rows are added).

        On the CPU this is built from the accumulator's panels, which then become views of it: no
        second dim×dim matrix beside it. So: never modify it, and read it again after adding
        rows (a matrix read before is then out of date, and no longer symmetric).
        """
        if self._freed:
            raise RuntimeError(f"the Gram of {', '.join(self.modules)} was freed")
        if self._matrix is not None:
            return self._matrix
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64) if self._upper is None else self._upper.spread()
        if self._device_sum is not None:
            total = total + self._device_sum.cpu()
        self._matrix = total
        return total

    @property
    def packed(self) -> "torch.Tensor | UpperPanels":
        """XᵀX as it is held: the panels of its upper block triangle (:class:`UpperPanels`, 9/16 of
        the full matrix's memory) where the full matrix has not been built, else :attr:`matrix`.
        :func:`compressor.math.factorize.whitened_decomposition` takes either."""
        if self._freed:
            raise RuntimeError(f"the Gram of {', '.join(self.modules)} was freed")
        if self._matrix is None and self._device_sum is None and self._upper is not None:
            return self._upper
        return self.matrix

    def free(self) -> None:
        """Let the accumulator go (the Gram is done with; reading ``matrix`` afterwards is an error)."""
        self._upper = self._device_sum = self._matrix = None
        self._freed = True

    def sum_across_processes(self) -> None:
        """Under torchrun, make this Gram the sum of every process's (each saw its own windows)."""
        from compressor import distributed

        if not distributed.active():
            return
        self.tokens = distributed.sum_int(self.tokens)
        if self._upper is not None and self._matrix is None and self._device_sum is None:
            for panel in self._upper.panels:  # compact panels: summed as they are held
                distributed.sum_(panel)
            return
        total = distributed.sum_(self.matrix)
        self._upper, self._device_sum, self._matrix = UpperPanels.viewing(total, GRAM_BLOCKS), None, total


def _sum_dtype(product: torch.dtype) -> torch.dtype:
    """The CPU accumulator's dtype: float32 for 16-bit products, whose 2⁻⁹ rounding per batch a
    float32 sum (2⁻²⁴ per addition) cannot make worse, and half the memory of float64 (268 MB
    rather than 537 MB for an 8192-wide input); float64 for float32 products."""
    return torch.float32 if product in (torch.bfloat16, torch.float16) else torch.float64


def _product_dtype(device_type: str) -> torch.dtype:
    """float32, or the autocast dtype where autocast is on: what the products would run in anyway."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


class GramCollector:
    """Forward pre-hooks that accumulate the Gram of each module's input; for the modules named in
    ``outputs_of``, the Gram of its outputs W·x instead (no bias; in float32 from the weight):
    YᵀY = W·XᵀX·Wᵀ, all a whitened decomposition of a matrix with fewer outputs than inputs
    needs, and out² rather than in² values (a LLaMA-3-70B down_proj: 8192² rather than 28672²).

    Use as ``with GramCollector(modules) as collector: run forward passes``; hooks are
    removed on exit whatever happens. ``collector.grams`` maps module name → its Gram.
    """

    def __init__(self, modules: Mapping[str, nn.Module], outputs_of: Iterable[str] = ()):
        self.modules = dict(modules)
        self.outputs_of = set(outputs_of)
        self.grams: dict[str, Gram] = {}
        self._recent: list[tuple[torch.Tensor, Gram]] = []
        self._handles: list = []

    def __enter__(self) -> "GramCollector":
        for name, module in self.modules.items():
            if name in self.outputs_of:
                self._handles.append(module.register_forward_pre_hook(self._output_hook(name)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recent.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            gram = self.grams.get(name)
            if gram is None:
                gram = next((g for seen, g in self._recent if seen is x), None)
                if gram is None:
                    gram = Gram(modules=[name], dim=x.shape[-1])
                else:
                    gram.modules.append(name)
                self.grams[name] = gram
            if gram.modules[0] == name:
                gram.add(x)
                # Keep the tensor alive briefly, so that an identical input seen next is
                # recognized by identity rather than by a reusable id().
                self._recent = [(x, gram), *self._recent[:3]]

        return hook

    def _output_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            # W·x in float32 from the full-precision weight, not the module's own output: under
            # bfloat16 autocast that is the product of the weight rounded to 8 bits, whose Gram
            # misplaces the small directions the factorization drops (+0.7 % perplexity on SmolLM2 at 0.8).
            x = args[0].detach()
            weight = module.weight.detach()
            with torch.autocast(x.device.type, enabled=False):
                x = x.to(torch.float32)
                y = x @ (weight.T if isinstance(module, nn.Linear) else weight).to(torch.float32)
            gram = self.grams.get(name)
            if gram is None:
                gram = self.grams[name] = Gram(modules=[name], dim=y.shape[-1], of_outputs=True)
            gram.add(y)

        return hook

    def unique(self) -> Iterator[Gram]:
        seen: set[int] = set()
        for gram in self.grams.values():
            if id(gram) not in seen:
                seen.add(id(gram))
                yield gram


def gram_roots(grams: Mapping[str, Gram], names: Iterable[str], dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The whitening root S (S·Sᵀ = XᵀX) of each named module, one decomposition per shared Gram,
    computed in ``dtype``."""
    from compressor.math.spectra import gram_root

    by_gram: dict[int, torch.Tensor] = {}
    roots = {}
    for name in names:
        gram = grams[name]
        if id(gram) not in by_gram:
            by_gram[id(gram)] = gram_root(gram.matrix, dtype)
        roots[name] = by_gram[id(gram)]
    return roots
