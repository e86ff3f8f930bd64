"""How strongly each target's output error reaches the loss: E[(∂L/∂y_j)²] per output unit j.

Under a second-order model of the loss, perturbing a layer's outputs by Δy costs about
½·Δyᵀ·F·Δy with F the Fisher information of y. Its diagonal, the mean squared gradient of
each output unit, is what one backward pass over a few calibration windows gives for every
target at once. Weighting a layer's output error by it turns the calibration-weighted error
Σ‖ΔW·x‖² into a predicted loss increase, both between layers (rank allocation) and between
the output units of one layer (the ``fisher`` factorization metric).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from compressor.evaluate import next_token_nll
from compressor.precision import autocast_to
from compressor.progress import track
from compressor.residency import release, return_free_heap
from compressor.targets import Target, find_blocks


def _attention_ops() -> set:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Recompute each transformer block in the backward pass instead of keeping its activations.

    The backward pass then holds one block's activations at a time (plus the blocks' inputs),
    not all of them: for SmolLM2 and one 512-token window, ~0.1 GB instead of ~1.5 GB, for
    one extra forward pass. Attention outputs are kept rather than recomputed (small, and
    the slowest part to redo). The model's own forward methods are restored on exit.
    """
    _, blocks = find_blocks(model)
    saved = [block.__dict__.get("forward") for block in blocks]
    keep = _attention_ops()

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(
                _inner, *args, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, policy), **kwargs
            )

        block.forward = forward
    try:
        yield
    finally:
        for block, original in zip(blocks, saved):
            del block.forward
            if original is not None:
                block.forward = original


HEAD_CHUNK = 128  # positions per slice of the language-model head in the Fisher pass


def split_head(model: nn.Module, probe: torch.Tensor, compute_dtype: torch.dtype | None = None) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, head) when the model's logits are its output embedding applied to its decoder's last
    hidden state, as checked on the first tokens of ``probe``; None otherwise (logit scaling or
    soft-capping after the head, no separable decoder): the loss is then taken on whole logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        decoder = model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    if not isinstance(head, nn.Linear) or decoder is None or decoder is model:
        return None
    ids = probe[:1, :16].to(next(model.parameters()).device)
    try:
        with torch.no_grad(), autocast_to(model, compute_dtype):
            want = model(input_ids=ids, use_cache=False).logits
            got = head(decoder(input_ids=ids, use_cache=False).last_hidden_state)
    except Exception:  # noqa: BLE001 - any failure only means: take the loss on whole logits
        return None
    finally:
        release(model.parameters())  # what the probe read
    if got.shape != want.shape or got.dtype != want.dtype:
        return None
    if not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3):
        return None
    return decoder, head


CAST_ROWS = 4096  # rows of the head's weight cast at a time


def _cast_releasing(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, made a slice of rows at a time, each slice's pages released once cast:
    SmolLM2's head is 113 MB in float32, which would otherwise all be resident beside the copy."""
    weight = weight.detach()
    if weight.dtype == dtype:
        return weight
    cast = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for start in range(0, weight.shape[0], CAST_ROWS):
        part = weight[start : start + CAST_ROWS]
        cast[start : start + CAST_ROWS] = part
        release([part])
    return cast


def _backward_in_head_slices(decoder: nn.Module, head: nn.Linear, batch: torch.Tensor, compute_dtype: torch.dtype | None) -> None:
    """The next-token NLL's backward pass, the head applied HEAD_CHUNK positions at a time: the
    logits of a window ([seq, vocab], 50 MB for SmolLM2 in bfloat16) and the loss's temporaries
    of their size never exist at once. The head's weight is cast once per window (what autocast
    would do on every call) and its float32 pages released meanwhile."""
    with autocast_to(decoder, compute_dtype):
        hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state
    return_free_heap()  # what the forward freed lies between what it keeps for the backward
    dtype = compute_dtype or head.weight.dtype
    weight = _cast_releasing(head.weight, dtype)
    bias = None if head.bias is None else head.bias.to(dtype)
    h = hidden.detach().requires_grad_()
    n = batch.shape[1] - 1
    for s in range(0, n, HEAD_CHUNK):
        e = min(s + HEAD_CHUNK, n)
        # 2-D: a 3-D slice makes F.linear broadcast the weight into a batched product (and copy it)
        logits = F.linear(h[:, s:e].reshape(-1, h.shape[-1]).to(dtype), weight, bias)
        # in the logits' own dtype, as next_token_nll takes it
        nll = F.cross_entropy(logits, batch[:, s + 1 : e + 1].reshape(-1), reduction="sum")
        nll.backward()
    weight = logits = nll = None  # the cast head and the last slice's logits, before the heap is returned
    return_free_heap()
    hidden.backward(h.grad)


def output_fisher(
    model: nn.Module,
    targets: list[Target],
    batches: list[torch.Tensor],
    compute_dtype: torch.dtype | None = None,
    recompute: bool = True,
) -> dict[str, torch.Tensor]:
    """Per target, the float64 vector (out,) of E[(∂L/∂y_j)²] over calibration tokens (L: next-token NLL).

    ``compute_dtype``: autocast the passes to it (bfloat16 is 3x faster on CPUs that have it
    and changes the estimate by well under 1 %); ``recompute``: checkpoint the blocks to save memory.
    Where :func:`split_head` allows, the loss is taken in slices of positions.
    """
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    handles = []
    requires = {name: p.requires_grad for name, p in model.named_parameters()}

    _, blocks = find_blocks(model)
    in_backward: list[int | None] = [None]  # the block the backward pass is in

    def leaving(block: int | None) -> None:
        # The backward pass runs the blocks last to first; once it reaches another block,
        # the weights of the one it left are not read again in this window.
        if block is not None and in_backward[0] not in (None, block):
            release(blocks[in_backward[0]].parameters())
        in_backward[0] = block

    def release_after_forward(module, args, output) -> None:
        release(module.parameters())  # read again when the backward pass recomputes the block

    def hook_for(name: str, block: int | None):
        def accumulate(grad: torch.Tensor) -> None:
            leaving(block)
            # float32 sums of one batch's squares, float64 across batches
            total = grad.detach().reshape(-1, grad.shape[-1]).float().square().sum(0).to("cpu", torch.float64)
            sums[name] = total if name not in sums else sums[name] + total

        def hook(module, args, output):
            # On the output tensor itself: lighter than a module backward hook. The blocks'
            # recomputation (checkpointing) runs this again on copies that no gradient reaches.
            if output.requires_grad:
                output.register_hook(accumulate)

        return hook

    def make_leaf(module, args, output):
        return output.requires_grad_()

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(make_leaf))
        for t in targets:
            handles.append(t.module.register_forward_hook(hook_for(t.name, t.block_index)))
        for block in blocks:
            handles.append(block.register_forward_hook(release_after_forward))
        split = split_head(model, batches[0], compute_dtype) if batches else None  # its forward releases too
        if split is not None and any(t.module is split[1] for t in targets):
            split = None  # the head is a target: its own forward must run, for its output hook
        device = next(model.parameters()).device
        recomputing = checkpointed_blocks(model) if recompute else contextlib.nullcontext()
        with recomputing:
            for batch in track(batches, description="output sensitivities"):
                batch = batch.to(device)
                with torch.enable_grad():
                    if split is not None:
                        _backward_in_head_slices(*split, batch, compute_dtype)
                    else:
                        with autocast_to(model, compute_dtype):
                            logits = model(input_ids=batch, use_cache=False).logits
                        # in the logits' own dtype: under autocast they already are bfloat16, and a float32
                        # copy would double the time for digits the logits no longer hold
                        loss = next_token_nll(logits, batch)
                        del logits
                        loss.backward()
                tokens += batch[:, 1:].numel()
                leaving(None)
                release(model.parameters())
                return_free_heap()
    finally:
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
    return {t.name: sums.get(t.name, torch.zeros(t.shape[0], dtype=torch.float64)) / tokens for t in targets}


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
