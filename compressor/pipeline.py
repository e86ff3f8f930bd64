"""The layer loop shared by analyze, factorize and compensate.

The first block's inputs are captured once (a pre-hook that stops the forward pass), then
the blocks run one at a time on the cached inputs; each block's outputs become the next
block's inputs. A caller may change a block between collecting its statistics and running
it forward, which is what sequential mode does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from compressor.calibration.grams import GramCollector
from compressor.errors import UsageError
from compressor.progress import track
from compressor.targets import Target, find_blocks


CALIBRATION_BATCH = 8  # calibration windows per forward pass
CALIB_DTYPES = ("auto", "float32", "bfloat16")


def _fast_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # private probes of torch.cpu; absent ones count as no
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def check_calib_dtype(name: str) -> None:
    if name not in CALIB_DTYPES:
        raise UsageError(f"unknown --calib-dtype {name!r}; choose one of {', '.join(CALIB_DTYPES)}")


def resolve_calib_dtype(name: str, model: nn.Module) -> torch.dtype | None:
    """The matmul dtype of calibration forward passes; None: the model's own dtype.

    ``auto`` is bfloat16 autocast for a float32 model on hardware with native bfloat16 matmul
    (4-5x the float32 rate on AVX512-BF16 CPUs), else the model's dtype. Weights, Grams and
    decompositions stay in float32/float64 either way; only the activations carry bfloat16
    rounding (relative 2⁻⁹), far below the truncation errors being measured.
    """
    check_calib_dtype(name)
    param = next(model.parameters())
    if name == "float32" or param.dtype != torch.float32:
        return None
    if name == "bfloat16" or _fast_bfloat16(param.device):
        return torch.bfloat16
    return None


def autocast_to(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast context for forward passes of ``model`` in ``dtype`` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


class _StopForward(Exception):
    pass


@dataclass
class BlockInput:
    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInput":
        if self.args:
            return BlockInput((hidden, *self.args[1:]), self.kwargs)
        return BlockInput(self.args, {**self.kwargs, "hidden_states": hidden})


def _model_kwargs(model: nn.Module) -> dict:
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[BlockInput]:
    """Run the model up to its first block, once per batch, and keep what the block receives."""
    _, blocks = find_blocks(model)
    captured: list[BlockInput] = []

    def hook(module, args, kwargs):
        captured.append(BlockInput(tuple(args), dict(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        for batch in batches:
            try:
                model(input_ids=batch.to(device), **_model_kwargs(model))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _next_input(inp: BlockInput, block_output) -> BlockInput:
    """The next block's input: this one's arguments with the block's hidden states."""
    return inp.with_hidden(block_output[0] if isinstance(block_output, (tuple, list)) else block_output)


@dataclass
class BlockStep:
    """One block of the loop: collect its statistics, optionally change it, then advance."""

    index: int
    block: nn.Module
    targets: list[Target]
    inputs: list[BlockInput]
    compute_dtype: torch.dtype | None = None
    _outputs: list[BlockInput] | None = None

    def _run(self, inp: BlockInput):
        with autocast_to(self.block, self.compute_dtype):
            return self.block(*inp.args, **inp.kwargs)

    @torch.inference_mode()
    def collect_grams(self, block_final: bool = False) -> dict[str, "Gram"]:  # noqa: F821
        """The targets' input Grams. ``block_final``: the caller will not change the block, so
        the outputs of this very pass become the next block's inputs (one forward instead of two)."""
        outputs = []
        with GramCollector({t.name: t.module for t in self.targets}) as collector:
            for inp in self.inputs:
                out = self._run(inp)
                if block_final:
                    outputs.append(_next_input(inp, out))
        if block_final:
            self._outputs = outputs
        return collector.grams

    @torch.inference_mode()
    def outputs(self) -> list[BlockInput]:
        if self._outputs is not None:
            return self._outputs
        return [_next_input(inp, self._run(inp)) for inp in self.inputs]


def iterate_blocks(
    model: nn.Module,
    batches: list[torch.Tensor],
    targets: list[Target],
    description: str = "blocks",
    compute_dtype: torch.dtype | None = None,
) -> Iterator[BlockStep]:
    """Yield the blocks in order with their calibration inputs.

    After the caller is done with a step, the block is run forward (as it is then) to make
    the next block's inputs. Blocks without targets are run through without being yielded.
    ``compute_dtype``: autocast the blocks' forward passes to it (see :func:`resolve_calib_dtype`).
    """
    _, blocks = find_blocks(model)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        if t.block_index is None:
            raise ValueError(f"{t.name} is outside the transformer blocks; the layer loop cannot reach it")
        by_block.setdefault(t.block_index, []).append(t)
    inputs = capture_block_inputs(model, batches)
    last = max(by_block, default=-1)
    for index in track(range(last + 1), description=description):
        step = BlockStep(index, blocks[index], by_block.get(index, []), inputs, compute_dtype)
        if step.targets:
            yield step
        if index < last:
            inputs = step.outputs()


@torch.inference_mode()
def collect_grams_whole_model(
    model: nn.Module, batches: list[torch.Tensor], targets: list[Target], compute_dtype: torch.dtype | None = None
):
    """All targets' Grams in full forward passes: for targets outside the blocks (lm_head)."""
    device = next(model.parameters()).device
    with GramCollector({t.name: t.module for t in targets}) as collector:
        for batch in track(batches, description="calibrating"):
            with autocast_to(model, compute_dtype):
                model(input_ids=batch.to(device), **_model_kwargs(model))
    return collector.grams
