"""How strongly each target's output error reaches the loss: E‖∂L/∂y‖² per output unit.

Under a second-order model of the loss, perturbing a layer's outputs by Δy costs about
½·Δyᵀ·F·Δy with F the Fisher information of y; taking F ≈ (E‖∂L/∂y‖² / out)·I turns the
layer's calibration-weighted error Σ‖ΔW·x‖² into a predicted loss increase. One backward
pass over a few calibration windows gives the factor for every target.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.progress import track
from compressor.targets import Target


def output_sensitivities(model: nn.Module, targets: list[Target], batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean over calibration tokens of ‖∂L/∂y‖² / out_features, per target (L: next-token NLL)."""
    sums = {t.name: 0.0 for t in targets}
    tokens = 0
    handles = []
    requires = {name: p.requires_grad for name, p in model.named_parameters()}

    def hook_for(name: str):
        def hook(module, grad_input, grad_output):
            g = grad_output[0]
            sums[name] += float(g.detach().to(torch.float64).pow(2).sum())

        return hook

    def make_leaf(module, args, output):
        return output.requires_grad_()

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(make_leaf))
        for t in targets:
            handles.append(t.module.register_full_backward_hook(hook_for(t.name)))
        device = next(model.parameters()).device
        for batch in track(batches, description="sensitivities"):
            batch = batch.to(device)
            with torch.enable_grad():
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
                loss = nn.functional.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="sum")
                loss.backward()
            tokens += batch[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
    return {t.name: sums[t.name] / tokens / t.shape[0] for t in targets}
