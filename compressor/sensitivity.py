"""How strongly each target's output error reaches the loss: E[(∂L/∂y_j)²] per output unit j.

Under a second-order model of the loss, perturbing a layer's outputs by Δy costs about
½·Δyᵀ·F·Δy with F the Fisher information of y. Its diagonal, the mean squared gradient of
each output unit, is what one backward pass over a few calibration windows gives for every
target at once. Weighting a layer's output error by it turns the calibration-weighted error
Σ‖ΔW·x‖² into a predicted loss increase, both between layers (rank allocation) and between
the output units of one layer (the ``fisher`` factorization metric).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor import distributed
from compressor.attention import chunked_causal_attention
from compressor.device import model_device
from compressor.evaluate import labelled_nll, next_token_labels
from compressor.pipeline import BlockInput, capture_block_inputs, head_modules, hidden_of, hidden_width, logits_after_blocks
from compressor.precision import autocast_to
from compressor.progress import track
from compressor.residency import return_free_heap
from compressor.streaming import weights_of
from compressor.targets import Target, find_blocks


# For a streamed model, the blocks' saved inputs of one group of windows may take as much memory as
# one block's weights (a pass holds those anyway; each group reads every block from disk twice), and
# at least this much. A model in memory takes one window at a time: its blocks cost nothing to rerun.
FISHER_GROUP_BYTES = 64 << 20
HEAD_POSITIONS = 128  # positions of a window whose loss gradient is taken at a time


def _group_budget(model: nn.Module, blocks: nn.ModuleList) -> int:
    if not weights_of(model).streamed:
        return 0
    return max(FISHER_GROUP_BYTES, sum(p.numel() * p.element_size() for p in blocks[0].parameters()))


def _with_grad_allowed(value):
    """``value`` (a block input's arguments) with every tensor a normal one: the inputs were
    captured under inference mode, and autograd may not save inference tensors."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, tuple):
        return tuple(_with_grad_allowed(v) for v in value)
    if isinstance(value, list):
        return [_with_grad_allowed(v) for v in value]
    if isinstance(value, dict):
        return {k: _with_grad_allowed(v) for k, v in value.items()}
    return value


def _groups(batches: list[torch.Tensor], per_batch: int, budget: int) -> list[list[torch.Tensor]]:
    size = max(1, budget // max(per_batch, 1))
    return [batches[i : i + size] for i in range(0, len(batches), size)]


def output_fisher(
    model: nn.Module,
    targets: list[Target],
    batches: list[torch.Tensor],
    compute_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Per target, the float64 vector (out,) of E[(∂L/∂y_j)²] over calibration tokens (L: next-token NLL).

    The backward pass runs block by block, as the layer loop does: a forward pass keeps each
    block's inputs, the loss's gradient is taken at the last block's output (the model's head
    run on it), then each block, last to first, is loaded again, recomputed from its saved input
    and back-propagated. Only one block's weights and activations are held at a time, plus the
    blocks' inputs for a group of windows (:func:`_group_budget`). ``compute_dtype``: autocast the
    passes to it (bfloat16 is 3x faster on CPUs that have it and changes the estimate by well
    under 1 %). Under torchrun each process takes its share of ``batches`` and the sums are added.
    """
    _, blocks = find_blocks(model)
    store = weights_of(model)
    device = model_device(model)
    sums = {t.name: torch.zeros(t.shape[0], dtype=torch.float64) for t in targets}
    tokens = 0
    template: list[object] = [None]  # the form of a block's output

    def accumulate_into(name: str):
        def accumulate(grad: torch.Tensor) -> None:
            # float32 sums of one batch's squares, float64 across batches
            sums[name] += grad.detach().reshape(-1, grad.shape[-1]).float().square().sum(0).to("cpu", torch.float64)

        def hook(module, args, output):
            if output.requires_grad:  # on the output tensor itself: lighter than a module backward hook
                output.register_hook(accumulate)

        return hook

    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    handles = [t.module.register_forward_hook(accumulate_into(t.name)) for t in targets]
    mine = distributed.shard(batches) if batches else []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if mine:
            per_batch = int(mine[0].numel()) * hidden_width(model) * 4 * len(blocks)  # float32 hidden states, every block
            for group in track(_groups(mine, per_batch, _group_budget(model, blocks)), description="output sensitivities"):
                tokens += _fisher_group(model, blocks, store, group, device, compute_dtype, template)
                return_free_heap()
    finally:
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            if name in requires and p.requires_grad != requires[name] and p.device.type != "meta" and not p.is_inference():
                p.requires_grad_(requires[name])
    tokens = distributed.sum_int(tokens)
    return {name: distributed.sum_(total) / tokens for name, total in sums.items()}


def _fisher_group(model, blocks, store, group, device, compute_dtype, template) -> int:
    """The backward passes of one group of windows; returns the number of predicted tokens."""
    inputs = [BlockInput(_with_grad_allowed(inp.args), _with_grad_allowed(inp.kwargs)) for inp in capture_block_inputs(model, group)]
    saved: list[list[torch.Tensor]] = []  # per block, per batch: its input hidden states
    hidden = [inp.hidden for inp in inputs]
    with torch.no_grad():
        for block in blocks:
            saved.append(hidden)
            with store.holding(block, compute_dtype), chunked_causal_attention(), autocast_to(block, compute_dtype):
                outputs = [block(*inp.with_hidden(h).args, **inp.with_hidden(h).kwargs) for inp, h in zip(inputs, hidden)]
            template[0] = outputs[0]
            hidden = [hidden_of(out) for out in outputs]
            outputs = None
            return_free_heap()
    # The loss's gradient at the last block's output, for each batch.
    grads = []
    with store.holding(head_modules(model), compute_dtype):  # the output embedding as stored, under autocast
        for batch, last in zip(group, hidden):
            leaf = last.detach().requires_grad_()
            labels = next_token_labels(batch.to(device))
            # HEAD_POSITIONS positions at a time: the logits over a large vocabulary, their
            # float32 log-probabilities and gradients for a whole window (100 MB each for 512 × 49152)
            # are the pass's largest tensors. Positions are independent after the blocks, so
            # the summed gradients are the same.
            for start in range(0, leaf.shape[1], HEAD_POSITIONS):
                part = slice(start, start + HEAD_POSITIONS)
                with torch.enable_grad():
                    logits = logits_after_blocks(model, leaf[:, part], template[0], compute_dtype)
                    loss = labelled_nll(logits, labels[:, part])
                    del logits
                    loss.backward()
                del loss
            grads.append(leaf.grad)
            del leaf
    hidden = None
    # Each block again, last to first: recomputed from its saved input, then back-propagated.
    for index in range(len(blocks) - 1, -1, -1):
        block = blocks[index]
        with store.holding(block, compute_dtype):
            for b, inp in enumerate(inputs):
                h = saved[index][b].detach().requires_grad_()
                with torch.enable_grad():
                    with chunked_causal_attention(), autocast_to(block, compute_dtype):
                        out = hidden_of(block(*inp.with_hidden(h).args, **inp.with_hidden(h).kwargs))
                    out.backward(grads[b])
                grads[b] = h.grad
                del out, h
            saved[index] = []
        return_free_heap()
    return sum(batch[:, 1:].numel() for batch in group)


def layer_sensitivities(fisher: dict[str, torch.Tensor]) -> dict[str, float]:
    """One factor per layer: E‖∂L/∂y‖² / out, the Fisher diagonal's mean."""
    return {name: float(v.mean()) for name, v in fisher.items()}


def fisher_scale(fisher: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """√(F_jj + damping·mean F): the output weights of the ``fisher`` metric, strictly positive.

    The damping keeps units whose gradient vanished on the calibration set (and the factor
    B = U_r / scale) finite, and the metric close to a multiple of the plain one for them.
    """
    f = fisher.to(torch.float64).clamp_min(0)
    mean = float(f.mean()) if f.numel() else 0.0
    floor = damping * mean if mean > 0 else 1.0
    return (f + floor).sqrt()
