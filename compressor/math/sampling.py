"""Nucleus (top-p) sampling of next tokens, for self-generated calibration text."""

from __future__ import annotations

import torch

CANDIDATES = (256, 2048, 16384)  # tokens ranked, in turn, before sorting the whole vocabulary


def sample_top_p(logits: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab], drawn from the smallest set of most likely
    tokens whose probability reaches ``top_p`` (renormalized), as nucleus sampling defines it.

    Each row ranks only its top k tokens, for the smallest k in ``CANDIDATES`` whose tokens hold
    ``top_p`` of its probability (the nucleus then lies inside them; a full sort is the last
    resort), and the draw inverts the kept tokens' cumulative distribution: ~20x cheaper than
    sorting a 49k vocabulary and ``torch.multinomial`` over it, every step. Rows go on to a
    larger k alone, so one flat row does not make the whole batch rank 16k tokens.
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs = torch.softmax(logits.float(), dim=-1)
    rows, vocab = probs.shape
    uniform = torch.rand(rows, 1, generator=generator, dtype=probs.dtype).to(probs.device)
    choice = torch.empty(rows, dtype=torch.long, device=probs.device)
    pending = torch.arange(rows, device=probs.device)
    for k in (*[c for c in CANDIDATES if c < vocab], vocab):
        candidates = probs[pending]
        ranked, index = candidates.topk(k, dim=-1) if k < vocab else candidates.sort(dim=-1, descending=True)
        done = ranked.sum(-1) >= top_p if k < vocab else torch.ones(len(pending), dtype=torch.bool, device=probs.device)
        choice[pending[done]] = _draw(ranked[done], index[done], top_p, uniform[pending[done]])
        pending = pending[~done]
        if not len(pending):
            break
    return choice


def _draw(ranked: torch.Tensor, index: torch.Tensor, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Invert the cumulative distribution of the nucleus within descending ``ranked`` probabilities."""
    mass_before = ranked.cumsum(-1) - ranked
    kept = torch.where(mass_before < top_p, ranked, torch.zeros_like(ranked)).cumsum(-1)
    choice = torch.searchsorted(kept, uniform * kept[:, -1:], right=True).clamp_max(ranked.shape[-1] - 1)
    return index.gather(-1, choice).squeeze(-1)
