"""The layer loop shared by analyze, factorize and compensate.

The first block's inputs are captured once (a pre-hook that stops the forward pass), then
the blocks run one at a time on the cached inputs; each block's outputs become the next
block's inputs. A caller may change a block between collecting its statistics and running
it forward, which is what sequential mode does. Each block's weights are held only while the
loop is at it (:mod:`compressor.streaming`: read from the checkpoint for a streamed model; for
one loaded whole, the pages of its memory-mapped weights released afterwards), and the heap's
free pages are returned after each block: a pass holds one block's weights and working set at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from compressor.attention import chunked_causal_attention
from compressor import distributed
from compressor.calibration.grams import Gram, GramCollector
from compressor.device import model_device
from compressor.precision import autocast_to
from compressor.progress import track
from compressor.residency import Spill, release, return_free_heap
from compressor.streaming import weights_of
from compressor.targets import Target, find_blocks


CALIBRATION_BATCH = 2  # calibration windows per forward pass (2 lowered the peak by ~0.03 GiB; 4 ran ~4 % faster in benchmarks/pass_costs.py)


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


def hidden_width(model: nn.Module) -> int:
    """The width of the hidden states between blocks (``hidden_size``, GPT-2's ``n_embd``)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 4096)


def outside_blocks(model: nn.Module, head: bool = False) -> list[nn.Module]:
    """The modules with weights of their own outside the transformer blocks (embeddings, final
    norm; with ``head``, the output embedding too, which the passes before the blocks never read
    unless it is tied to the input embedding)."""
    prefix, _ = find_blocks(model)
    skip = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and not head:
        skip.add(id(output))
    found = []
    for name, module in model.named_modules():
        if name == prefix or name.startswith(prefix + ".") or id(module) in skip:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            found.append(module)
    return found


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
        device = model_device(model)
        with weights_of(model).holding(outside_blocks(model)):
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), **_model_kwargs(model))
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def _spilled(inp: BlockInput, spill: Spill) -> BlockInput:
    """``inp`` with its hidden states in a file of ``spill`` (written through), its pages let go."""
    if inp.hidden.device.type != "cpu":
        return inp
    held = spill.hold(inp.hidden, writable=True)
    release([held])
    return inp.with_hidden(held)


def _advance(inputs: list[BlockInput], i: int, block_output) -> None:
    """Make ``inputs[i]`` the next block's input (:func:`_next_input`), its pages let go again
    once written where it is spilled."""
    inputs[i] = _next_input(inputs[i], block_output)
    _let_go_if_spilled(inputs[i].hidden)


def _let_go_if_spilled(hidden: torch.Tensor) -> None:
    """Drop the resident pages of hidden states that live in a file (:func:`_spilled`)."""
    if hidden.device.type == "cpu" and isinstance(hidden.untyped_storage().filename, str):
        release([hidden])


def _next_input(inp: BlockInput, block_output) -> BlockInput:
    """The next block's input: this one's arguments with the block's hidden states.

    Where they fit (same shape, dtype and device) the hidden states are copied into this input's
    own tensor: the output then dies with the batch's other temporaries, and a pass allocates
    no tensor that outlives its batch. Kept instead, the outputs land between the temporaries
    and the heap grows by fragments (SmolLM2 one-shot: 0.777-0.806 GiB before, 0.758-0.776 after).
    """
    hidden = block_output[0] if isinstance(block_output, (tuple, list)) else block_output
    current = inp.hidden
    if hidden.data_ptr() == current.data_ptr():
        return inp
    if (hidden.shape, hidden.dtype, hidden.device) == (current.shape, current.dtype, current.device) and current.is_contiguous():
        current.copy_(hidden)
        return inp
    return inp.with_hidden(hidden)


@dataclass
class BlockStep:
    """One block of the loop: collect its statistics, optionally change it, then advance."""

    index: int
    block: nn.Module
    targets: list[Target]
    inputs: list[BlockInput]
    compute_dtype: torch.dtype | None = None
    _advanced: bool = False  # ``inputs`` now holds the next block's inputs

    def _run(self, inp: BlockInput):
        with autocast_to(self.block, self.compute_dtype), chunked_causal_attention():
            return self.block(*inp.args, **inp.kwargs)

    def _check_not_advanced(self) -> None:
        if self._advanced:
            raise RuntimeError(f"block {self.index} has already produced the next block's inputs")

    @torch.inference_mode()
    def collect_grams(
        self, block_final: bool = False, only: list[Target] | None = None, outputs_where_narrower: bool = False
    ) -> dict[str, Gram]:
        """The targets' input Grams (``only``: of these targets alone). ``block_final``: the caller
        will not change the block, so the outputs of this very pass become the next block's inputs
        (one forward instead of two). ``outputs_where_narrower``: for a target with fewer outputs
        than inputs, the Gram of its outputs instead (:class:`GramCollector`)."""
        self._check_not_advanced()
        chosen = self.targets if only is None else only
        narrower = [t.name for t in chosen if t.shape[0] < t.shape[1]] if outputs_where_narrower else []
        with GramCollector({t.name: t.module for t in chosen}, outputs_of=narrower) as collector:
            for i, inp in enumerate(self.inputs):
                out = self._run(inp)
                if block_final:
                    _advance(self.inputs, i, out)
                else:
                    _let_go_if_spilled(inp.hidden)
        self._advanced = block_final
        return_free_heap()  # the forward passes' activations, before the caller decomposes
        for gram in collector.unique():
            gram.sum_across_processes()
        return collector.grams

    @torch.inference_mode()
    def outputs(self) -> list[BlockInput]:
        """The next block's inputs, each batch made in place of this block's input for it: one
        set of the calibration set's hidden states is alive at a time, not two."""
        if not self._advanced:
            return_free_heap()  # what the caller's work on the block freed
            for i, inp in enumerate(self.inputs):
                _advance(self.inputs, i, self._run(inp))
            self._advanced = True
        return self.inputs


def iterate_blocks(
    model: nn.Module,
    batches: list[torch.Tensor],
    targets: list[Target],
    description: str = "blocks",
    compute_dtype: torch.dtype | None = None,
    spill: Spill | None = None,
) -> Iterator[BlockStep]:
    """Yield the blocks in order with their calibration inputs.

    After the caller is done with a step, the block is run forward (as it is then) to make
    the next block's inputs. Blocks without targets are run through without being yielded.
    ``compute_dtype``: autocast the blocks' forward passes to it (see :func:`resolve_calib_dtype`).
    Under torchrun each process runs its own share of ``batches`` (:func:`distributed.shard`);
    the statistics a step collects are summed across processes. ``spill``: for a streamed model
    on the CPU, the hidden states live in files there, each batch's pages resident only while
    the batch runs (a LLaMA-1B's 16 × 512 windows: 67 MB; 64 windows of LLaMA-3-8B: 0.5 GB).
    """
    _, blocks = find_blocks(model)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        if t.block_index is None:
            raise ValueError(f"{t.name} is outside the transformer blocks; the layer loop cannot reach it")
        by_block.setdefault(t.block_index, []).append(t)
    inputs = capture_block_inputs(model, distributed.shard(batches))
    if spill is not None and weights_of(model).streamed:
        inputs = [_spilled(inp, spill) for inp in inputs]
    last = max(by_block, default=-1)
    store = weights_of(model)
    for index in track(range(last + 1), description=description):
        with store.holding(blocks[index], compute_dtype):  # read again, if at all, in the next pass
            step = BlockStep(index, blocks[index], by_block.get(index, []), inputs, compute_dtype)
            if step.targets:
                yield step
            if index < last:
                inputs = step.outputs()
        return_free_heap()
    inputs.clear()  # the hidden states, though the caller may still hold the last step
    return_free_heap()


def hidden_of(block_output) -> torch.Tensor:
    """The hidden states a block returns (alone, or first of a tuple)."""
    return block_output[0] if isinstance(block_output, (tuple, list)) else block_output


def _shaped_like(template, hidden: torch.Tensor):
    """A block's output with ``hidden`` as its hidden states, in the form the block returns them."""
    if isinstance(template, tuple):
        return (hidden, *template[1:])
    if isinstance(template, list):
        return [hidden, *template[1:]]
    return hidden


@contextlib.contextmanager
def _blocks_skipped(blocks: nn.ModuleList, last_output: Callable[[], object]) -> Iterator[None]:
    """Run the model with its blocks replaced: each passes its input through unchanged, the last
    returns ``last_output()``."""
    saved = [block.__dict__.get("forward") for block in blocks]
    last = len(blocks) - 1

    def passing(index: int):
        def forward(*args, **kwargs):
            if index == last:
                return last_output()
            return args[0] if args else kwargs["hidden_states"]

        return forward

    for i, block in enumerate(blocks):
        block.forward = passing(i)
    try:
        yield
    finally:
        for block, original in zip(blocks, saved):
            del block.forward
            if original is not None:
                block.forward = original


def head_modules(model: nn.Module) -> list[nn.Module]:
    """What the model runs after its blocks (final norm, output embedding), and before them all but
    the input embedding (position embeddings): :func:`logits_after_blocks` reads these alone."""
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and getattr(output, "weight", None) is getattr(embedding, "weight", False)
    return [m for m in outside_blocks(model, head=True) if m is not embedding or tied]


def logits_after_blocks(model: nn.Module, last_hidden: torch.Tensor, block_output, compute_dtype: torch.dtype | None = None):
    """The model's logits from its last block's hidden states ``last_hidden``: the model run with
    its blocks skipped (``block_output``: any block output, for its form), fed placeholder input
    embeddings, so that the input embedding is never read. Weights: :func:`head_modules`."""
    _, blocks = find_blocks(model)
    placeholder = torch.zeros(last_hidden.shape, dtype=last_hidden.dtype, device=last_hidden.device)
    with _blocks_skipped(blocks, lambda: _shaped_like(block_output, last_hidden)), autocast_to(model, compute_dtype):
        return model(inputs_embeds=placeholder, **_model_kwargs(model)).logits


@torch.inference_mode()
def logits_block_by_block(model: nn.Module, batches: list[torch.Tensor], compute_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """The logits of each batch, computed as the layer loop runs: every batch through one block
    before the next block is read. For a streamed model, the whole forward pass with one block's
    weights in memory at a time."""
    _, blocks = find_blocks(model)
    store = weights_of(model)
    inputs = capture_block_inputs(model, batches)
    form = None  # the form of a block's output, its hidden states left out (they live in ``inputs``)
    for block in blocks:
        with store.holding(block):
            for i, inp in enumerate(inputs):
                with autocast_to(block, compute_dtype), chunked_causal_attention():
                    output = block(*inp.args, **inp.kwargs)
                inputs[i] = _next_input(inp, output)
                form = _shaped_like(output, None)
                output = None
        return_free_heap()
    with store.holding(head_modules(model), compute_dtype):  # the output embedding as stored, under autocast
        for inp in inputs:
            yield logits_after_blocks(model, inp.hidden, form, compute_dtype)


@torch.inference_mode()
def collect_grams_whole_model(
    model: nn.Module, batches: list[torch.Tensor], targets: list[Target], compute_dtype: torch.dtype | None = None
):
    """All targets' Grams in full forward passes: for targets outside the blocks (lm_head). A
    streamed model is held whole meanwhile."""
    device = model_device(model)
    with GramCollector({t.name: t.module for t in targets}) as collector, weights_of(model).holding(model):
        for batch in track(distributed.shard(batches), description="calibrating"):
            with autocast_to(model, compute_dtype), chunked_causal_attention():
                model(input_ids=batch.to(device), **_model_kwargs(model))
    for gram in collector.unique():
        gram.sum_across_processes()
    return collector.grams
