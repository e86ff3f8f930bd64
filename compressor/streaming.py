"""Where a model's weights live while it is compressed: in memory, or read from its checkpoint
one module at a time.

A streamed model is a skeleton whose parameters are on the meta device (no memory); buffers
(rotary frequencies, position ids) are real. :class:`StreamedWeights` reads a module's
parameters from the safetensors files when the layer loop reaches it, on the execution device
and in the model's dtype, and puts them back on the meta device when the loop is done with
it. Host and device memory then hold one block (plus the embeddings while they are used),
whatever the model's depth.

The code that walks a model asks :func:`weights_of` for the model's store and brackets its
work with ``store.holding(module)``; for a model loaded whole (:class:`InMemoryWeights`) that
only releases the pages of memory-mapped weights afterwards (:mod:`compressor.residency`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from compressor.errors import InvalidInputError, NumericalError
from compressor.residency import release, return_free_heap

READ_CHUNK_BYTES = 32 << 20  # of a tensor read from a checkpoint at a time

log = logging.getLogger(__name__)


class InMemoryWeights:
    """The weights are all in the model already: loading is nothing, unloading releases the
    pages of memory-mapped weights (they come back from the page cache when read again)."""

    streamed = False

    def load(self, modules: nn.Module | Iterable[nn.Module], matmul_dtype: torch.dtype | None = None) -> list[nn.Parameter]:
        """Make ``modules``' weights present; returns the parameters that were not. ``matmul_dtype``:
        the dtype autocast will multiply in, if any (:class:`StreamedWeights` then may keep linear
        layers' weights in it, where the checkpoint holds them so)."""
        return []

    def dtype_of(self, module: nn.Module) -> torch.dtype:
        """The dtype of the model's weights, as a factor replacing ``module``'s weight should have."""
        return module.weight.dtype

    def unload(self, modules: nn.Module | Iterable[nn.Module]) -> None:
        for module in _as_list(modules):
            release(module.parameters())

    def _let_go(self, modules: list[nn.Module], loaded: list[nn.Parameter]) -> None:
        self.unload(modules)

    @contextlib.contextmanager
    def holding(self, modules: nn.Module | Iterable[nn.Module], matmul_dtype: torch.dtype | None = None) -> Iterator[None]:
        """Within the block, ``modules``' weights are in memory; afterwards what this call read is
        let go (what an enclosing ``holding`` read stays for it)."""
        modules = _as_list(modules)
        loaded: list[nn.Parameter] = []
        try:
            loaded = self.load(modules, matmul_dtype)
            yield
        finally:
            self._let_go(modules, loaded)

    def read_for_writing(self, name: str, tensor: torch.Tensor) -> Iterator[torch.Tensor]:
        raise ValueError(f"{name} is on the meta device: it has no data to write")


def _as_list(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)


class StreamedWeights(InMemoryWeights):
    """Parameters read from safetensors files on demand.

    ``keys``: for each parameter name of the model (tied names included), the file and the key
    it is stored under. Parameters that share one tensor (tied embeddings) are loaded once and
    set on every module that holds them.
    """

    streamed = True

    def __init__(
        self, model: nn.Module, keys: dict[str, tuple[Path, str]], dtype: torch.dtype, device: torch.device, source: str = ""
    ):
        self.dtype = dtype
        self.device = device
        self.source = source
        self._keys = keys
        # Each distinct parameter (by identity) → every (module, attribute) that holds it, and its
        # names; a module's parameters are found through the module's own names.
        self._holders: dict[int, list[tuple[nn.Module, str]]] = {}
        self._name_of: dict[int, str] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for attr, p in module._parameters.items():
                if p is None:
                    continue
                name = f"{module_name}.{attr}" if module_name else attr
                self._holders.setdefault(id(p), []).append((module, attr))
                if name in keys:
                    self._name_of.setdefault(id(p), name)
        self._files: dict[Path, object] = {}

    def _header(self, path: Path):
        header = self._files.get(path)
        if header is None:
            from compressor.formats.safetensors_header import read_safetensors_header

            header = self._files[path] = read_safetensors_header(path)
        return header

    def _chunks(self, name: str, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        """The flattened tensor, read with plain file reads (no mapping of the file, whose pages
        would count against the process once touched) and checked finite, a slice of
        READ_CHUNK_BYTES at a time; floating-point slices cast to ``dtype`` (default: the store's).
        Each slice is only valid until the next is read."""
        from compressor.formats.writer import dtype_of_code
        from compressor.math.spectra import all_finite

        path, key = self._keys[name]
        header = self._header(path)
        entry = header.tensors[key]
        stored = dtype_of_code(entry.dtype)
        total = math.prod(entry.shape)
        step = max(1, READ_CHUNK_BYTES // torch.empty((), dtype=stored).element_size())
        buffer = torch.empty(min(step, max(total, 1)), dtype=stored)
        with open(path, "rb", buffering=0) as f:
            f.seek(header.data_start + entry.begin)
            for start in range(0, total, step):
                part = buffer[: min(step, total - start)]
                view = memoryview(part.view(torch.uint8).numpy())
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise InvalidInputError(f"{path} ends inside tensor {key}")
                    got += n
                if stored.is_floating_point:
                    if not all_finite(part):
                        raise NumericalError(f"{self.source or path.parent} holds NaN or Inf in {key}")
                    yield part.to(dtype or self.dtype)
                else:
                    yield part

    def _read(self, name: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor on ``device`` (default: the store's), in ``dtype`` (default: the store's) if
        floating: the peak is the result plus one slice (:meth:`_chunks`)."""
        from compressor.formats.writer import dtype_of_code

        path, key = self._keys[name]
        entry = self._header(path).tensors[key]
        stored = dtype_of_code(entry.dtype)
        result = torch.empty(entry.shape, dtype=(dtype or self.dtype) if stored.is_floating_point else stored,
                             device=self.device if device is None else device)
        flat = result.view(-1)
        start = 0
        for part in self._chunks(name, dtype):
            flat[start : start + part.numel()].copy_(part)
            start += part.numel()
        return result

    def _set(self, holders: list[tuple[nn.Module, str]], value: nn.Parameter) -> None:
        for module, attr in holders:
            module._parameters[attr] = value
        self._holders[id(value)] = holders

    def load(self, modules: nn.Module | Iterable[nn.Module], matmul_dtype: torch.dtype | None = None) -> list[nn.Parameter]:
        """Read ``modules``' parameters that are on the meta device. A linear layer's weight and bias
        stored in ``matmul_dtype`` (bfloat16 autocast over a bfloat16 checkpoint) stay in it: autocast
        would multiply the very same values, and the block takes half the memory, without autocast's
        own copies of its weights. Everything else is read in the model's dtype."""
        from compressor.targets import is_linear

        loaded = []
        for module in _as_list(modules):
            for sub in module.modules():
                for p in list(sub._parameters.values()):
                    if p is None or p.device.type != "meta":
                        continue
                    name = self._name_of.get(id(p))
                    if name is None:
                        raise RuntimeError(f"a parameter of shape {tuple(p.shape)} has no tensor in the checkpoint")
                    # a tied embedding is held as the output layer it also is
                    as_stored = (
                        matmul_dtype is not None
                        and matmul_dtype != self.dtype
                        and any(is_linear(holder) for holder, _ in self._holders[id(p)])
                    )
                    dtype = matmul_dtype if as_stored and self._stored_dtype(name) == matmul_dtype else None
                    value = nn.Parameter(self._read(name, dtype=dtype), requires_grad=False)
                    holders = self._holders.pop(id(p))
                    self._name_of[id(value)] = self._name_of.pop(id(p))
                    self._set(holders, value)
                    loaded.append(value)
        return loaded

    def _stored_dtype(self, name: str) -> torch.dtype:
        from compressor.formats.writer import dtype_of_code

        path, key = self._keys[name]
        return dtype_of_code(self._header(path).tensors[key].dtype)

    def dtype_of(self, module: nn.Module) -> torch.dtype:
        return self.dtype

    def unload(self, modules: nn.Module | Iterable[nn.Module]) -> None:
        """Back to the meta device: only the parameters this store read (a factor made meanwhile,
        which the checkpoint does not hold, stays)."""
        self._drop([p for module in _as_list(modules) for p in module.parameters()])

    def _let_go(self, modules: list[nn.Module], loaded: list[nn.Parameter]) -> None:
        self._drop(loaded)

    def _drop(self, parameters: list[nn.Parameter]) -> None:
        dropped = 0
        for p in parameters:
            if p.device.type == "meta" or id(p) not in self._name_of or id(p) not in self._holders:
                continue
            holders = self._holders.pop(id(p))
            dtype = self.dtype if p.is_floating_point() else p.dtype  # the model's, whatever it was read in
            empty = nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"), requires_grad=False)
            self._name_of[id(empty)] = self._name_of.pop(id(p))
            self._set(holders, empty)
            dropped += 1
        if dropped:
            return_free_heap()  # the weights' memory back to the system, not kept between live blocks

    def read_for_writing(self, name: str, tensor: torch.Tensor) -> Iterator[torch.Tensor]:
        """The checkpoint's tensor for parameter ``name`` (as a writer names it), flattened, in
        slices of ``tensor``'s dtype: written out without the whole tensor ever in memory."""
        if name not in self._keys:
            raise ValueError(f"{name} is on the meta device and not in {self.source or 'the checkpoint'}")
        return self._chunks(name, tensor.dtype)


_stores: weakref.WeakKeyDictionary[nn.Module, InMemoryWeights] = weakref.WeakKeyDictionary()
_IN_MEMORY = InMemoryWeights()


def weights_of(model: nn.Module) -> InMemoryWeights:
    """The store of ``model``'s weights (in memory unless the model was loaded streamed)."""
    return _stores.get(model, _IN_MEMORY)


def attach(model: nn.Module, store: InMemoryWeights) -> None:
    _stores[model] = store


def is_streamed(model: nn.Module) -> bool:
    return weights_of(model).streamed


@contextlib.contextmanager
def materialized(model: nn.Module) -> Iterator[None]:
    """The whole model in memory for the duration (what a streamed model needs for code that runs
    it whole: text generation, evaluation of two models in lockstep)."""
    with weights_of(model).holding(model):
        yield


def checkpoint_keys(model: nn.Module, folder: Path, headers: dict) -> dict[str, tuple[Path, str]] | None:
    """For each parameter name of ``model``, the (file, key) that holds it in the checkpoint in
    ``folder`` whose tensors ``headers`` lists by key (:class:`TensorHeader`); None when some parameter cannot be found, or has another
    shape there (the checkpoint then needs transformers' own renaming rules: load it whole).
    Keys may carry or lack the model's ``base_model_prefix``, as transformers allows."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: dict[str, tuple[Path, str]] = {}
    by_identity: dict[int, tuple[Path, str]] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    for name, p in named:
        candidates = [name]
        if prefix:
            candidates += [name.removeprefix(prefix + ".")] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
        for key in candidates:
            if key in headers:
                header = headers[key]
                if tuple(header.shape) != tuple(p.shape):
                    return None
                found[name] = by_identity.setdefault(id(p), (Path(folder) / header.file, key))
                break
    for name, p in named:  # a tied parameter stored under another of its names
        if name not in found:
            if id(p) not in by_identity:
                return None
            found[name] = by_identity[id(p)]
    return found
