"""Nucleus sampling against its definition."""

import pytest
import torch

from compressor.math import sampling
from compressor.math.sampling import sample_top_p


def _nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    order = probs.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(i)
        mass += float(probs[i])
    return kept


@pytest.mark.parametrize("vocab", [7, 300, 5000])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])  # peaked to nearly flat: every candidate stage is used
def test_draws_follow_the_renormalized_nucleus(vocab, temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=g, dtype=torch.float64) * 4 / temperature
    probs = torch.softmax(logits, -1)
    nucleus = _nucleus(probs, 0.9)
    draws = sample_top_p(logits.repeat(4000, 1), 0.9, generator=torch.Generator().manual_seed(1))
    assert set(draws.tolist()) <= nucleus
    mass = float(probs[sorted(nucleus)].sum())
    top = max(nucleus, key=lambda i: float(probs[i]))
    expected = float(probs[top]) / mass
    assert float((draws == top).double().mean()) == pytest.approx(expected, abs=0.03)


def test_candidate_stages_agree_with_a_full_sort(monkeypatch):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 3000, generator=g)
    ranked = sample_top_p(logits, 0.95, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(sampling, "CANDIDATES", ())
    sorted_ = sample_top_p(logits, 0.95, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ranked, sorted_)


def test_top_p_one_keeps_every_token_and_bad_values_are_refused():
    logits = torch.zeros(2000, 5)
    draws = sample_top_p(logits, 1.0, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == set(range(5))
    with pytest.raises(ValueError):
        sample_top_p(logits, 0.0)


def test_masked_tokens_are_never_drawn():
    logits = torch.zeros(3000, 6)
    logits[:, 2] = float("-inf")
    draws = sample_top_p(logits, 0.99, generator=torch.Generator().manual_seed(0))
    assert 2 not in set(draws.tolist())


def test_rows_that_need_more_candidates_go_on_alone(monkeypatch):
    # Peaked rows settle in the first stage, flat ones in later stages or the full sort;
    # every row's draw equals what one full sort of that row gives with the same random number.
    g = torch.Generator().manual_seed(5)
    sharpness = torch.tensor([8.0, 0.05, 3.0, 0.5, 0.01, 6.0])[:, None]
    logits = torch.randn(6, 4000, generator=g) * sharpness
    stages = []
    draw = sampling._draw

    def spy(ranked, *args):
        stages.append((ranked.shape[0], ranked.shape[1]))
        return draw(ranked, *args)

    monkeypatch.setattr(sampling, "_draw", spy)
    monkeypatch.setattr(sampling, "CANDIDATES", (16, 256))
    staged = sample_top_p(logits, 0.95, generator=torch.Generator().manual_seed(2))
    assert len({k for rows, k in stages if rows}) >= 3  # rows settled at different stages
    assert sum(rows for rows, _ in stages) == 6
    monkeypatch.setattr(sampling, "CANDIDATES", ())
    full = sample_top_p(logits, 0.95, generator=torch.Generator().manual_seed(2))
    assert torch.equal(staged, full)
