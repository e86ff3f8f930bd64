"""compressor.math: spectra and rank allocation, on hand-made and random inputs."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from compressor.errors import NumericalError, UsageError
from compressor.math import allocate, spectra
from compressor.options import check_target
from compressor.math.factorize import whitened_decomposition


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- spectra


@pytest.mark.parametrize(
    "sv,fraction,expected",
    [
        ([2.0, 1.0, 1.0], 0.5, 1),  # energies 4,1,1: 4/6 ≥ 0.5
        ([2.0, 1.0, 1.0], 0.6, 1),
        ([2.0, 1.0, 1.0], 0.7, 2),  # 5/6
        ([2.0, 1.0, 1.0], 0.9, 3),
        ([2.0, 1.0, 1.0], 1.0, 3),
        ([1.0, 1.0, 1.0, 1.0], 0.5, 2),  # exactly half: two values, not three
        ([1.0, 1.0, 1.0, 1.0], 0.75, 3),
        ([1.0, 1.0, 1.0, 1.0], 0.7500001, 4),
        ([3.0, 0.0, 0.0], 1.0, 1),  # zero values are never needed
        ([2.0, 1.0, 0.0], 1.0, 2),
        ([0.0, 0.0], 0.9, 0),
    ],
)
def test_energy_rank(sv, fraction, expected):
    assert spectra.energy_rank(_t(sv), fraction) == expected


def test_energy_rank_random():
    g = torch.Generator().manual_seed(0)
    sv = torch.rand(50, generator=g, dtype=torch.float64).sort(descending=True).values
    e = sv**2
    for p in (0.1, 0.5, 0.9, 0.99):
        k = spectra.energy_rank(sv, p)
        assert e[:k].sum() >= p * e.sum() - 1e-12
        assert e[: k - 1].sum() < p * e.sum()


@pytest.mark.parametrize(
    "sv,expected",
    [([2.0, 1.0, 1.0], 1.5), ([1.0, 1.0, 1.0, 1.0], 4.0), ([5.0], 1.0), ([3.0, 0.0], 1.0), ([0.0, 0.0], 0.0), ([], 0.0)],
)
def test_stable_rank(sv, expected):
    assert spectra.stable_rank(_t(sv)) == pytest.approx(expected, rel=1e-12)


def test_stable_rank_is_frobenius_over_spectral():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 20, generator=g, dtype=torch.float64)
    sv = spectra.singular_values(w)
    expected = float(torch.linalg.matrix_norm(w, "fro") ** 2 / torch.linalg.matrix_norm(w, 2) ** 2)
    assert spectra.stable_rank(sv) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    "sv,threshold,expected",
    [
        ([4.0, 2.0, 1.0, 0.5], 0.5, 2),  # 1, .5 (equal counts), .25, .125
        ([4.0, 2.0, 1.0, 0.5], 0.51, 1),
        ([4.0, 2.0, 1.0, 0.5], 0.125, 4),
        ([4.0, 2.0, 1.0, 0.5], 0.0, 4),
        ([4.0, 2.0, 1.0, 0.5], 1.0, 1),
        ([0.0, 0.0], 0.5, 0),
    ],
)
def test_welore_rank(sv, threshold, expected):
    assert spectra.welore_rank(_t(sv), threshold) == expected


def test_singular_values_float64_descending():
    w = torch.diag(torch.tensor([1.0, 3.0, 2.0]))
    sv = spectra.singular_values(w)
    assert sv.dtype == torch.float64
    torch.testing.assert_close(sv, _t([3.0, 2.0, 1.0]), rtol=0, atol=1e-12)


def test_singular_values_rejects_nan():
    w = torch.ones(3, 3)
    w[1, 2] = float("nan")
    with pytest.raises(NumericalError):
        spectra.singular_values(w)
    w[1, 2] = float("inf")
    with pytest.raises(NumericalError):
        whitened_decomposition(w, gram=torch.eye(3, dtype=torch.float64), values_only=True)


@pytest.mark.parametrize("tokens", [40, 6])  # full rank, and rank-deficient (6 rows, dim 10)
def test_whitened_spectrum_energy(tokens):
    g = torch.Generator().manual_seed(tokens)
    w = torch.randn(7, 10, generator=g).double()  # exactly representable in float32 too
    x = torch.randn(tokens, 10, generator=g, dtype=torch.float64)
    sv = whitened_decomposition(w.float(), gram=x.T @ x, values_only=True).sv  # a float32 weight: computed in float64
    assert sv.dtype == torch.float64
    expected = (w @ x.T).pow(2).sum()
    assert float((sv**2).sum()) == pytest.approx(float(expected), rel=1e-10)
    # the values themselves: those of W·Xᵀ
    direct = torch.linalg.svdvals(w @ x.T)
    torch.testing.assert_close(sv[: direct.numel()], direct[: sv.numel()], rtol=1e-9, atol=1e-9 * float(direct[0]))


def test_gram_root_rank_deficient():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 12, generator=g, dtype=torch.float64)  # rank 4 in dimension 12
    gram = x.T @ x
    root = spectra.gram_root(gram)
    assert root.shape == (12, 12)
    assert torch.isfinite(root).all()
    torch.testing.assert_close(root @ root.T, gram, rtol=0, atol=1e-10 * float(gram.abs().max()))


def test_gram_root_zero_and_indefinite():
    root = spectra.gram_root(torch.zeros(5, 5, dtype=torch.float64))
    assert torch.isfinite(root).all()
    assert float(root.abs().max()) == 0.0
    # slightly indefinite: a negative eigenvalue from round-off is floored, not a NaN
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    gram = q @ torch.diag(_t([3.0, 1.0, 1e-9, -1e-12])) @ q.T
    root = spectra.gram_root(gram.float())  # float32 in: computed in float64
    assert root.dtype == torch.float64
    assert torch.isfinite(root).all()
    torch.testing.assert_close(root @ root.T, gram, rtol=0, atol=1e-6)


def test_gram_root_rejects_nan():
    g = torch.eye(3, dtype=torch.float64)
    g[0, 1] = float("nan")
    with pytest.raises(NumericalError):
        spectra.gram_root(g)


# ---------------------------------------------------------------- allocation


def _random_problem(seed: int, k: int, low: int, high: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [tuple(int(v) for v in torch.randint(low, high, (2,), generator=g)) for _ in range(k)]
    energies = []
    for m, n in shapes:
        decay = 1 + 3 * float(torch.rand(1, generator=g))
        scale = 0.1 + 10 * float(torch.rand(1, generator=g))
        e = torch.rand(min(m, n), generator=g, dtype=torch.float64).sort(descending=True).values ** decay * scale
        energies.append(e)
    return shapes, energies


def _objective(plan, energies, weights) -> float:
    return sum(w * allocate.discarded_energy(e, r) for w, e, r in zip(weights, energies, plan))


def test_cost_and_plan_cost():
    assert allocate.cost(None, (10, 20)) == 200
    assert allocate.cost(3, (10, 20)) == 90
    assert allocate.cost(0, (10, 20)) == 0
    shapes = [(10, 20), (8, 8), (5, 7)]
    assert allocate.plan_cost([None, 2, 0], shapes) == 200 + 32 + 0
    assert allocate.kept_fraction([None, None, None], shapes) == 1.0
    assert allocate.kept_fraction([None, 2, 0], shapes) == pytest.approx(232 / 299)


@pytest.mark.parametrize("shape,expected", [((10, 20), 6), ((64, 64), 31), ((3, 3), 1), ((1, 100), 0)])
def test_max_factored_rank(shape, expected):
    assert allocate.max_factored_rank(shape) == expected
    m, n = shape
    assert expected * (m + n) < m * n
    assert (expected + 1) * (m + n) >= m * n


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_uniform_plan_formula(target):
    shapes = [(64, 64), (128, 64), (10, 1000), (576, 1536), (192, 576), (7, 9)]
    plan = allocate.uniform_plan(shapes, target)
    for (m, n), r in zip(shapes, plan):
        expected = math.floor(Fraction(str(target)) * m * n / (m + n))
        if target == 1.0 or expected > allocate.max_factored_rank((m, n)):
            assert r is None
        else:
            assert r == expected
    assert allocate.kept_fraction(plan, shapes) <= target + 1e-12


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, 1.0000001])
def test_check_target_rejects(bad):
    with pytest.raises(UsageError):
        check_target(bad)


def test_check_target_accepts():
    for ok in (1e-6, 0.5, 1.0):
        check_target(ok)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_greedy_meets_budget(seed, target):
    shapes, energies = _random_problem(seed, k=10, low=128, high=768)
    for weights in (None, [1.0 / float(e.sum()) for e in energies]):
        plan = allocate.greedy_plan(energies, shapes, target, weights=weights)
        kept = allocate.kept_fraction(plan, shapes)
        assert kept <= target
        assert kept >= target - 0.005
        for r, shape in zip(plan, shapes):
            assert r is None or 0 <= r <= allocate.max_factored_rank(shape)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("target", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_greedy_leaves_no_affordable_step(seed, target):
    """Whatever budget is left is smaller than the next step of every matrix not yet dense."""
    shapes, energies = _random_problem(100 + seed, k=4, low=16, high=200)
    plan = allocate.greedy_plan(energies, shapes, target)
    budget = int(target * sum(m * n for m, n in shapes))
    left = budget - allocate.plan_cost(plan, shapes)
    assert left >= 0
    for r, (m, n) in zip(plan, shapes):
        if r is None:
            continue
        step = m + n if r < allocate.max_factored_rank((m, n)) else m * n - r * (m + n)
        assert step > left


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_greedy_beats_uniform(seed, target):
    shapes, energies = _random_problem(200 + seed, k=6, low=16, high=300)
    for weights in ([1.0] * len(shapes), [1.0 / float(e.sum()) for e in energies]):
        greedy = allocate.greedy_plan(energies, shapes, target, weights=weights)
        uniform = allocate.uniform_plan(shapes, target)
        assert _objective(greedy, energies, weights) <= _objective(uniform, energies, weights) * (1 + 1e-12)


def test_greedy_prefers_concentrated_energy():
    # Matrix 0 has all its energy in one value; matrix 1 spreads it evenly.
    shapes = [(32, 32), (32, 32)]
    energies = [torch.cat([_t([100.0]), torch.zeros(31, dtype=torch.float64)]), torch.full((32,), 100.0 / 32, dtype=torch.float64)]
    plan = allocate.greedy_plan(energies, shapes, 0.25)
    assert plan[0] == 1
    assert plan[1] == int(0.25 * 2048) // 64 - 1


def test_greedy_floors():
    shapes, energies = _random_problem(7, k=3, low=64, high=128)
    energies[0] = energies[0] * 1e-9  # nothing to gain in matrix 0: only its floor keeps it
    plan = allocate.greedy_plan(energies, shapes, 0.3, floors=[5, 0, 0])
    assert plan[0] is not None and plan[0] >= 5
    assert allocate.kept_fraction(plan, shapes) <= 0.3
    with pytest.raises(UsageError, match="floors"):
        allocate.greedy_plan(energies, shapes, 0.05, floors=[40, 40, 40])



# ---------------------------------------------------------------- budget_ranks (compensation)


def _budget_problem(seed: int, shapes):
    """Squared singular values of small random matrices, and positive weights."""
    g = torch.Generator().manual_seed(seed)
    energies = [torch.linalg.svdvals(torch.randn(m, n, generator=g, dtype=torch.float64)) ** 2 for m, n in shapes]
    weights = [0.2 + float(torch.rand(1, generator=g, dtype=torch.float64)) for _ in shapes]
    return energies, weights


def _captured(ranks, energies, weights) -> float:
    return sum(w * float(e[:r].sum()) for r, e, w in zip(ranks, energies, weights))


def _budget_cost(ranks, shapes) -> int:
    return sum(r * (m + n) for r, (m, n) in zip(ranks, shapes))


def _brute_force(energies, shapes, caps, weights, budget) -> float:
    import itertools

    return max(
        _captured(ranks, energies, weights)
        for ranks in itertools.product(*(range(c + 1) for c in caps))
        if _budget_cost(ranks, shapes) <= budget
    )


@pytest.mark.parametrize("seed", range(3))
def test_budget_ranks_stays_within_budget_and_caps(seed):
    shapes = [(12, 8), (6, 10), (9, 5)]
    energies, weights = _budget_problem(seed, shapes)
    caps = [5, 2, 4]
    for budget in range(0, 260, 7):
        ranks = allocate.budget_ranks(energies, shapes, budget, caps, weights)
        spent = _budget_cost(ranks, shapes)
        assert spent <= budget
        assert all(0 <= r <= c for r, c in zip(ranks, caps))
        # the budget is spent: no matrix below its cap has a step that would still fit
        assert all(r == c or m + n > budget - spent for r, c, (m, n) in zip(ranks, caps, shapes))
    # a budget that affords everything stops at the caps
    assert allocate.budget_ranks(energies, shapes, 10**6, caps, weights) == caps


def test_budget_ranks_floors():
    shapes = [(12, 8), (6, 10), (9, 5)]
    energies, _ = _budget_problem(0, shapes)
    energies[0] = energies[0] * 1e-12  # nothing to gain in matrix 0: only its floor gives it rank
    ranks = allocate.budget_ranks(energies, shapes, 100, [5, 5, 5], floors=[3, 0, 0])
    assert ranks[0] == 3 and _budget_cost(ranks, shapes) <= 100
    assert allocate.budget_ranks(energies, shapes, 100, [2, 5, 5], floors=[3, 0, 0])[0] == 2  # a floor is capped
    assert allocate.budget_ranks(energies, shapes, 72, [5, 5, 5], floors=[2, 2, 0])[:2] == [2, 2]  # 2·20 + 2·16 = 72
    with pytest.raises(UsageError, match=r"rank floors alone need 72 parameters, above the budget of 71"):
        allocate.budget_ranks(energies, shapes, 71, [5, 5, 5], floors=[2, 2, 0])


@pytest.mark.parametrize("seed", range(3))
def test_budget_ranks_is_optimal_when_steps_cost_the_same(seed):
    """Equal m + n: every step costs the same, so the best steps first is exactly the optimum."""
    shapes = [(6, 4), (7, 3), (5, 5)]
    energies, weights = _budget_problem(10 + seed, shapes)
    caps = [4, 3, 5]
    for budget in range(0, 130, 5):
        ranks = allocate.budget_ranks(energies, shapes, budget, caps, weights)
        best = _brute_force(energies, shapes, caps, weights, budget)
        assert _captured(ranks, energies, weights) == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_budget_ranks_is_optimal_up_to_one_step(seed):
    """Steps of different costs (a knapsack): the greedy is optimal up to its last step. Precisely,
    (a) optimum − greedy ≤ the largest gain wᵢ·σ²ᵢ[rᵢ] that one more step of any matrix below its
    cap would bring (the fractional knapsack bound), and (b) the greedy captures at least the
    optimum of the budget less one largest step plus one parameter (its steps up to the first
    that did not fit are an optimal plan for what they cost, which is more than that)."""
    shapes = [(6, 4), (3, 2), (10, 6)]  # steps of 10, 5 and 16 parameters
    energies, weights = _budget_problem(20 + seed, shapes)
    caps = [4, 2, 5]
    for budget in range(0, 140, 3):
        ranks = allocate.budget_ranks(energies, shapes, budget, caps, weights)
        greedy = _captured(ranks, energies, weights)
        best = _brute_force(energies, shapes, caps, weights, budget)
        next_gain = max((w * float(e[r]) for r, c, e, w in zip(ranks, caps, energies, weights) if r < c), default=0.0)
        assert greedy <= best * (1 + 1e-12) + 1e-12
        assert best - greedy <= next_gain * (1 + 1e-12) + 1e-12
        smaller = budget - max(m + n for m, n in shapes) + 1
        if smaller >= 0:
            assert greedy >= _brute_force(energies, shapes, caps, weights, smaller) * (1 - 1e-12) - 1e-12


def test_budget_ranks_prefers_gain_per_parameter():
    """One step of 20 parameters gaining 4, or four of 5 gaining 3 each: the cheap steps win."""
    energies = [_t([4.0]), _t([3.0, 3.0, 3.0, 3.0])]
    shapes = [(12, 8), (3, 2)]
    assert allocate.budget_ranks(energies, shapes, 20, [1, 4]) == [0, 4]


def test_budget_ranks_one_step_bound_is_needed():
    """A hand-made knapsack where the best steps first is not optimal: the step of 10 parameters
    gaining 10 goes first, then no step of 6 fits in 12, where two steps of 6 would gain 11. The
    shortfall, 1, stays below the one-step bound (5.5)."""
    energies = [_t([10.0]), _t([5.5, 5.5])]
    shapes, caps, weights = [(5, 5), (3, 3)], [1, 2], [1.0, 1.0]
    ranks = allocate.budget_ranks(energies, shapes, 12, caps)
    assert _brute_force(energies, shapes, caps, weights, 12) == 11.0
    assert _budget_cost(ranks, shapes) <= 12
    assert 11.0 - _captured(ranks, energies, weights) <= 5.5


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.8, 1.0])
def test_welore_plan(seed, target):
    shapes, energies = _random_problem(300 + seed, k=6, low=32, high=256)
    sv = [e.sqrt() for e in energies]
    plan, tau = allocate.welore_plan(sv, shapes, target)
    assert allocate.kept_fraction(plan, shapes) <= target + 1e-12
    assert 0.0 <= tau <= 1.0 + 1e-9
    for s, shape, r in zip(sv, shapes, plan):
        count = spectra.welore_rank(s, tau)
        assert r == (None if count > allocate.max_factored_rank(shape) else count)
    if tau > 0:
        # τ is the smallest feasible threshold: slightly lower would break the budget
        lower = [spectra.welore_rank(s, tau - 1e-6) for s in sv]
        lower_plan = [None if c > allocate.max_factored_rank(sh) else c for c, sh in zip(lower, shapes)]
        assert allocate.kept_fraction(lower_plan, shapes) > target


def test_discarded_energy():
    e = _t([4.0, 2.0, 1.0, 0.5])
    assert allocate.discarded_energy(e, None) == 0.0
    assert allocate.discarded_energy(e, 0) == 7.5
    assert allocate.discarded_energy(e, 2) == 1.5
    assert allocate.discarded_energy(e, 4) == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_all_finite_agrees_with_the_elementwise_test(dtype):
    big = torch.finfo(dtype).max
    cases = [
        torch.randn(50, 40).to(dtype),
        torch.full((8,), big, dtype=dtype),  # finite, but its sum overflows
        torch.tensor([1.0, -big, -big], dtype=dtype),
        torch.empty(0, 3, dtype=dtype),
    ]
    for bad in (math.nan, math.inf, -math.inf):
        t = torch.randn(30, 30).to(dtype)
        t[7, 11] = bad
        cases.append(t)
    pair = torch.tensor([math.inf, -math.inf], dtype=dtype)  # a sum of NaN from two infinities
    cases.append(pair)
    for t in cases:
        assert spectra.all_finite(t) is bool(torch.isfinite(t).all())
