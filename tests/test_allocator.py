"""accounting.allocate against brute force over the integer grid (both modes); bad input named."""

import math
import random

import pytest

from carv.accounting import allocate, optimal_k


def _grid(r_range, k_range):
    return [(R, K) for R in range(r_range[0], r_range[1] + 1) for K in range(k_range[0], k_range[1] + 1)]


def _brute_budget(sb, sw, cu, cd, budget, r_range, k_range):
    feasible = [(R, K) for R, K in _grid(r_range, k_range) if R * (cu + K * cd) <= budget]
    return min(feasible, key=lambda p: ((sb + sw / p[1]) / p[0], p[0] * (cu + p[1] * cd), p[0], p[1]))


def _brute_target(sb, sw, cu, cd, target, r_range, k_range):
    feasible = [(R, K) for R, K in _grid(r_range, k_range) if (sb + sw / K) / R <= target]
    return min(feasible, key=lambda p: (p[0] * (cu + p[1] * cd), (sb + sw / p[1]) / p[0], p[0], p[1]))


def _cases(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        sb = rng.choice([0.0, 10 ** rng.uniform(-3, 3)])
        sw = rng.choice([0.0, 10 ** rng.uniform(-3, 4)])
        cu = 10 ** rng.uniform(-3, -1)
        cd = rng.choice([0.0, 10 ** rng.uniform(-4, -1)])
        r_range = (rng.randint(1, 3), rng.randint(3, 12))
        k_range = (rng.randint(1, 3), rng.randint(3, 40))
        yield sb, sw, cu, cd, r_range, k_range, rng


def test_allocate_budget_mode_is_the_brute_force_optimum():
    for sb, sw, cu, cd, r_range, k_range, rng in _cases(300, 0):
        cheapest = r_range[0] * (cu + k_range[0] * cd)
        budget = cheapest * rng.uniform(1.0, 30.0)
        assert allocate(sb, sw, cu, cd, budget=budget, r_range=r_range, k_range=k_range) == \
            _brute_budget(sb, sw, cu, cd, budget, r_range, k_range)


def test_allocate_target_mode_is_the_brute_force_optimum():
    for sb, sw, cu, cd, r_range, k_range, rng in _cases(300, 1):
        smallest = (sb + sw / k_range[1]) / r_range[1]
        largest = (sb + sw / k_range[0]) / r_range[0]
        target = smallest + rng.random() ** 2 * (largest - smallest) * 1.2
        assert allocate(sb, sw, cu, cd, target_variance=target, r_range=r_range, k_range=k_range) == \
            _brute_target(sb, sw, cu, cd, target, r_range, k_range)


def test_allocate_exact_at_budget_boundaries():
    """Budgets that are exact multiples of a step cost (where floating-point floor division can slip)."""
    cu, cd = 0.1, 0.01  # neither is exact in binary
    for R in range(1, 10):
        for K in range(1, 20):
            budget = R * (cu + K * cd)
            got = allocate(1.0, 5.0, cu, cd, budget=budget, r_range=(1, 10), k_range=(1, 20))
            assert got == _brute_budget(1.0, 5.0, cu, cd, budget, (1, 10), (1, 20))


def test_allocate_at_the_plain_estimators_budget_matches_design_notes():
    """DESIGN.md section 2: against R = 2, K = 1 with within dominating, R = 1 and K = c_up / c_draw + 2."""
    cu, cd = 0.032, 0.004  # ratio 8
    budget = 2 * (cu + cd)
    assert allocate(1e-6, 1.0, cu, cd, budget=budget) == (1, 10)
    # a large budget only sets R: K is K* up to the integer effects of R (one either side)
    sb, sw = 1.0, 50.0
    R, K = allocate(sb, sw, cu, cd, budget=100.0, r_range=(1, 10 ** 5))
    k_star = optimal_k(sb, sw, cu, cd, k_max=256)
    assert abs(K - k_star) <= 1
    assert R == math.floor(100.0 / (cu + K * cd))


@pytest.mark.parametrize("kwargs, name", [
    (dict(budget=None), "budget, target_variance"),
    (dict(budget=1.0, target_variance=1.0), "budget, target_variance"),
    (dict(budget=-1.0), "budget"),
    (dict(budget=float("nan")), "budget"),
    (dict(budget=1e-6), "budget"),  # below the cheapest pair
    (dict(target_variance=-1.0), "target_variance"),
    (dict(target_variance=1e-9), "target_variance"),  # below the smallest variance on the grid
    (dict(budget=1.0, r_range=(0, 4)), "r_range"),
    (dict(budget=1.0, r_range=(4, 2)), "r_range"),
    (dict(budget=1.0, r_range=4), "r_range"),
    (dict(budget=1.0, k_range=(1.5, 4)), "k_range"),
    (dict(budget=1.0, between=-1.0), "between"),
    (dict(budget=1.0, cost_draw=float("inf")), "cost_draw"),
])
def test_allocate_bad_input_is_named(kwargs, name):
    args = dict(between=1.0, within=1.0, cost_upstream=0.01, cost_draw=0.001)
    args.update(kwargs)
    pos = [args.pop(k) for k in ("between", "within", "cost_upstream", "cost_draw")]
    with pytest.raises(ValueError, match=name):
        allocate(*pos, **args)
