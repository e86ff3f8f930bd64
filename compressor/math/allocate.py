"""Rank allocation under a parameter budget.

A rank-r factorization of an (m, n) matrix costs r·(m + n) parameters; a matrix whose
factorization would not save parameters stays dense and costs m·n. A plan holds one
rank per matrix, ``None`` meaning dense.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from compressor.errors import UsageError

Shape = tuple[int, int]
Plan = list[int | None]


def max_factored_rank(shape: Shape) -> int:
    """The largest rank whose factors hold fewer parameters than the dense matrix."""
    m, n = shape
    return (m * n - 1) // (m + n)


def cost(rank: int | None, shape: Shape) -> int:
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def plan_cost(plan: Plan, shapes: Sequence[Shape]) -> int:
    return sum(cost(r, s) for r, s in zip(plan, shapes))


def kept_fraction(plan: Plan, shapes: Sequence[Shape]) -> float:
    return plan_cost(plan, shapes) / sum(m * n for m, n in shapes)


def uniform_plan(shapes: Sequence[Shape], target: float) -> Plan:
    """Every matrix keeps the same fraction: r = ⌊R·mn/(m+n)⌋ (R = 1 keeps everything dense)."""
    if target == 1:
        return [None] * len(shapes)
    plan: Plan = []
    for m, n in shapes:
        r = int(target * m * n // (m + n))
        plan.append(None if r > max_factored_rank((m, n)) else r)
    return plan


def welore_plan(spectra: Sequence[torch.Tensor], shapes: Sequence[Shape], target: float) -> tuple[Plan, float]:
    """WeLore: one global threshold τ on the spectra normalized by their largest value.

    Each matrix keeps the singular values with σ/σ₁ ≥ τ; τ is the smallest threshold whose
    plan fits the budget. Returns the plan and τ.
    """
    budget = target * sum(m * n for m, n in shapes)
    normalized = [s.to(torch.float64) / s[0] if s.numel() and s[0] > 0 else s.to(torch.float64) for s in spectra]

    def plan_at(tau: float) -> Plan:
        plan: Plan = []
        for s, shape in zip(normalized, shapes):
            r = int((s >= tau).sum().item())
            plan.append(None if r > max_factored_rank(shape) else r)
        return plan

    lo, hi = 0.0, 1.0 + 1e-9  # plan_at(hi) keeps at most one value per matrix
    if plan_cost(plan_at(lo), shapes) <= budget:
        return plan_at(lo), lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if plan_cost(plan_at(mid), shapes) <= budget:
            hi = mid
        else:
            lo = mid
    return plan_at(hi), hi


def greedy_plan(
    energies: Sequence[torch.Tensor],
    shapes: Sequence[Shape],
    target: float,
    weights: Sequence[float] | None = None,
    floors: Sequence[int] | None = None,
) -> Plan:
    """Minimize Σᵢ wᵢ·(energy discarded from matrix i) under the budget, by water-filling.

    ``energies[i]`` are the squared (whitened) singular values of matrix i, descending. Each
    rank step of matrix i gains wᵢ·σ²ₖ for (m+n) parameters; making the matrix dense gains the
    rest of its energy for the remaining m·n − r·(m+n). Steps are taken best gain per parameter
    first, each matrix's in order, then the leftover budget is filled with whatever still fits.
    ``floors`` are minimum ranks, paid for first.
    """
    total = sum(m * n for m, n in shapes)
    budget = int(target * total)
    weights = [1.0] * len(shapes) if weights is None else list(weights)
    ranks = [0] * len(shapes) if floors is None else [min(f, max_factored_rank(s)) for f, s in zip(floors, shapes)]
    spent = sum(r * (m + n) for r, (m, n) in zip(ranks, shapes))
    if spent > budget:
        raise UsageError(f"the rank floors alone need {spent / total:.3f} of the parameters, above the target {target}")
    dense = [False] * len(shapes)

    def next_step(i: int) -> tuple[float, int] | None:
        """(gain per parameter, parameter cost) of matrix i's next step, or None if it is dense."""
        if dense[i]:
            return None
        m, n = shapes[i]
        e = energies[i]
        r = ranks[i]
        if r < max_factored_rank((m, n)):
            gain = float(e[r]) if r < e.numel() else 0.0
            return weights[i] * gain / (m + n), m + n
        rest = float(e[r:].sum()) if r < e.numel() else 0.0
        step_cost = m * n - r * (m + n)
        return weights[i] * rest / step_cost, step_cost

    heap: list[tuple[float, int, int]] = []
    for i in range(len(shapes)):
        step = next_step(i)
        if step is not None:
            heapq.heappush(heap, (-step[0], i, step[1]))
    blocked: list[tuple[float, int, int]] = []
    while heap:
        neg_ratio, i, step_cost = heapq.heappop(heap)
        if spent + step_cost > budget:
            blocked.append((neg_ratio, i, step_cost))
            continue
        spent += step_cost
        if ranks[i] < max_factored_rank(shapes[i]):
            ranks[i] += 1
        else:
            dense[i] = True
        step = next_step(i)
        if step is not None:
            # A later step never outranks an earlier one of the same matrix.
            heapq.heappush(heap, (max(-step[0], neg_ratio), i, step[1]))
    return [None if d else r for r, d in zip(ranks, dense)]


def fill_budget(
    plan: Plan,
    energies: Sequence[torch.Tensor],
    shapes: Sequence[Shape],
    target: float,
    weights: Sequence[float] | None = None,
) -> Plan:
    """Spend what a plan leaves of the budget on single rank steps, best weighted gain first.

    Rounding each matrix's rank down can leave up to one step per matrix unspent; this makes
    every allocation reach the target within one step of the smallest matrix.
    """
    budget = int(target * sum(m * n for m, n in shapes))
    spent = plan_cost(plan, shapes)
    weights = [1.0] * len(shapes) if weights is None else list(weights)
    ranks = list(plan)

    def gain(i: int) -> float:
        r = ranks[i]
        return weights[i] * float(energies[i][r]) if r < energies[i].numel() else 0.0

    heap = [(-gain(i), i) for i, r in enumerate(ranks) if r is not None and r < max_factored_rank(shapes[i])]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        m, n = shapes[i]
        if spent + m + n > budget:
            continue
        ranks[i] += 1
        spent += m + n
        if ranks[i] < max_factored_rank(shapes[i]):
            heapq.heappush(heap, (-gain(i), i))
    return ranks


def discarded_energy(energy: torch.Tensor, rank: int | None) -> float:
    """Σ of the squared singular values a plan entry drops (0 for dense)."""
    if rank is None:
        return 0.0
    return float(energy[rank:].sum())


def budget_ranks(
    energies: Sequence[torch.Tensor],
    shapes: Sequence[Shape],
    budget: int,
    caps: Sequence[int],
    weights: Sequence[float] | None = None,
    floors: Sequence[int] | None = None,
) -> list[int]:
    """Ranks of additive rank-r terms (corrections) under a parameter budget: maximize
    Σᵢ wᵢ·(energy captured by matrix i's first rᵢ components) with Σ rᵢ·(mᵢ + nᵢ) ≤ ``budget``.

    Each rank step costs m + n and gains wᵢ·σ²ₖ; since every spectrum descends, taking the
    steps best gain per parameter first is optimal up to the last step. No matrix goes dense
    and no rank exceeds its cap (``caps``); ``floors`` are paid first.
    """
    weights = [1.0] * len(shapes) if weights is None else list(weights)
    ranks = [0] * len(shapes) if floors is None else [min(f, c) for f, c in zip(floors, caps)]
    spent = sum(r * (m + n) for r, (m, n) in zip(ranks, shapes))
    if spent > budget:
        raise UsageError(f"the rank floors alone need {spent} parameters, above the budget of {budget}")

    def gain(i: int) -> float:
        r = ranks[i]
        return weights[i] * float(energies[i][r]) / sum(shapes[i]) if r < energies[i].numel() else 0.0

    heap = [(-gain(i), i) for i in range(len(shapes)) if ranks[i] < caps[i]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        step = sum(shapes[i])
        if spent + step > budget:
            continue
        ranks[i] += 1
        spent += step
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-gain(i), i))
    return ranks
