"""Nucleus (top-p) sampling of next tokens, for self-generated calibration text."""

from __future__ import annotations

import torch

CANDIDATES = (256, 2048, 16384)  # tokens ranked, in turn, before sorting the whole vocabulary


def sample_top_p(logits: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab], drawn from the smallest set of most likely
    tokens whose probability reaches ``top_p`` (renormalized), as nucleus sampling defines it.

    Only the top k tokens are ranked, for the smallest k in ``CANDIDATES`` whose tokens hold
    ``top_p`` of every row's probability (the nucleus then lies inside them; a full sort is the
    last resort), and the draw inverts the kept tokens' cumulative distribution: together ~20x
    cheaper than sorting a 49k vocabulary and ``torch.multinomial`` over it, every step.
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs = torch.softmax(logits.float(), dim=-1)
    vocab = probs.shape[-1]
    for k in (*[c for c in CANDIDATES if c < vocab], vocab):
        ranked, index = probs.topk(k, dim=-1) if k < vocab else probs.sort(dim=-1, descending=True)
        if k == vocab or bool((ranked.sum(-1) >= top_p).all()):
            break
    mass_before = ranked.cumsum(-1) - ranked
    kept = torch.where(mass_before < top_p, ranked, torch.zeros_like(ranked)).cumsum(-1)
    draw = torch.rand(kept.shape[0], 1, generator=generator, dtype=kept.dtype) * kept[:, -1:]
    choice = torch.searchsorted(kept, draw, right=True).clamp_max(k - 1)
    return index.gather(-1, choice).squeeze(-1)
