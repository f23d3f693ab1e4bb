"""The cost and variance algebra of the hierarchical estimator (DESIGN.md section 2).

One estimate uses ``R`` upstream samples and ``K`` draws each and costs ``C(R, K) = R (c_up + K c_draw)``. Its
variance is ``sigma_b^2 / R + sigma_w^2 / (R K)``. Work-normalised variance ``Var * C = (sigma_b^2 + sigma_w^2 / K)
(c_up + K c_draw)`` does not depend on ``R`` and is minimised at ``K* = sqrt((c_up / c_draw)(sigma_w^2 / sigma_b^2))``;
the best achievable value is the efficiency bound ``(sigma_b sqrt(c_up) + sigma_w sqrt(c_draw))^2``.
"""

from __future__ import annotations

import math

from carv._validate import check_nonneg, check_share, check_span

__all__ = ["within_at", "predicted_variance", "mixed_step", "work_normalised_variance", "optimal_k", "allocate",
           "largest_r_within", "efficiency_bound", "ecm", "relative_efficiency", "fraction_of_bound"]


def _check_nonneg(**kw: float) -> None:
    for name, v in kw.items():
        check_nonneg(name, v)  # numpy scalars (np.float32(1.0)) are numbers too


def _check_k(K) -> None:
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ValueError(f"K: expected a positive integer, got {K!r}")


def within_at(var_within: float, K: int, strata: float = 0.0) -> float:
    """The per-draw within variance a row of ``K`` draws pays: ``sigma_w^2`` for iid draws and for one draw; with
    ``K >= 2`` per-row strata of ``t`` (:data:`carv.timesteps.STRATIFY_MODES` ``"per_upstream"``, ``"global"``)
    ``sigma_w^2 (1 - strata)``, where ``strata = 1 - sigma_s^2(2) / sigma_w^2`` is the share of the within part
    that two strata remove (a probe's within-half variance ``sigma_s^2(2)``,
    :meth:`carv.accounting.ComponentProbe.measure_halves`).

    Exact at ``K = 2``. At even ``K`` the strata split the two halves, so they remove at least that share and the
    price is conservative; at odd ``K`` a stratum straddles the halves' boundary and can remove less (a mean that
    steps at the median: two strata remove all of its spread, three leave a third of it in the middle stratum).
    The allocator uses it only to decide whether to leave one draw per sample (:meth:`Allocator.plan`;
    docs/budget.md, "Stratified timesteps")."""
    check_share("strata", strata)
    return var_within if K == 1 else var_within * (1.0 - strata)


def predicted_variance(var_between: float, var_within: float, R: int, K: int, strata: float = 0.0) -> float:
    """``sigma_b^2 / R + sigma_w^2 / (R K)`` (the within part at ``K`` strata: :func:`within_at`)."""
    _check_nonneg(var_between=var_between, var_within=var_within)
    _check_k(K)
    if not isinstance(R, int) or R < 1:
        raise ValueError(f"R: expected a positive integer, got {R!r}")
    return var_between / R + within_at(var_within, K, strata) / (R * K)


def mixed_step(var_between: float, var_within: float, cost_upstream: float, cost_draw: float, R: int, K: int,
               mix: tuple[int, int, float] | None = None, strata: float = 0.0) -> tuple[float, float]:
    """``(variance, cost)`` of the mean step of a run at ``(R, K)`` that runs the share ``a`` of its steps at
    ``(R', K')`` instead (``mix = (R', K', a)``, :meth:`carv.accounting.Allocator.mix_for`; None: every step at
    ``(R, K)``). A run's noise is the mean of its steps' variances and its cost the mean of their costs, so a mix
    is scored by the product of the two."""
    var, cost = predicted_variance(var_between, var_within, R, K, strata), R * (cost_upstream + K * cost_draw)
    if mix is not None:
        R2, K2, a = mix
        var += a * (predicted_variance(var_between, var_within, R2, K2, strata) - var)
        cost += a * (R2 * (cost_upstream + K2 * cost_draw) - cost)
    return var, cost


def work_normalised_variance(var_between: float, var_within: float, cost_upstream: float, cost_draw: float,
                             K: int, strata: float = 0.0) -> float:
    """``Var * C`` for any ``R``: ``(sigma_b^2 + sigma_w^2 / K)(c_up + K c_draw)`` (:func:`within_at` for strata)."""
    _check_nonneg(var_between=var_between, var_within=var_within, cost_upstream=cost_upstream,
                  cost_draw=cost_draw)
    _check_k(K)
    return (var_between + within_at(var_within, K, strata) / K) * (cost_upstream + K * cost_draw)


def optimal_k(var_between: float, var_within: float, cost_upstream: float, cost_draw: float,
              k_max: int | None = None, k_min: int = 1, strata: float = 0.0) -> int:
    """The integer ``K`` in ``[k_min, k_max]`` minimising work-normalised variance.

    The continuous optimum ``sqrt((c_up / c_draw)(sigma_w^2 / sigma_b^2))`` is rounded to the better
    of its integer neighbours. When it is unbounded (``sigma_b^2 = 0`` or ``c_draw = 0`` with
    ``sigma_w^2 > 0``) ``k_max`` is returned, and ``k_max`` must then be given.
    """
    _check_nonneg(var_between=var_between, var_within=var_within, cost_upstream=cost_upstream,
                  cost_draw=cost_draw)
    _check_k(k_min)
    if k_max is not None:
        _check_k(k_max)
        if k_max < k_min:
            raise ValueError(f"k_max: must be >= k_min={k_min}, got {k_max}")
    if strata:  # K >= 2 pays sigma_w^2 (1 - strata) per draw (within_at): the iid optimum over K >= 2 against K = 1
        w2 = within_at(var_within, 2, strata)  # (checks the share)
        if k_min >= 2:
            return optimal_k(var_between, w2, cost_upstream, cost_draw, k_max, k_min)
        if k_max == 1:
            return 1
        k = optimal_k(var_between, w2, cost_upstream, cost_draw, k_max, 2)
        one, more = (work_normalised_variance(var_between, var_within, cost_upstream, cost_draw, kk, strata)
                     for kk in (1, k))
        return 1 if one <= more else k
    if var_within == 0 or cost_upstream == 0:
        return k_min
    if var_between == 0 or cost_draw == 0:
        if k_max is None:
            raise ValueError(
                "k_max: the optimal K is unbounded (between-sample variance or per-draw cost is 0); "
                "pass k_max to cap it"
            )
        return k_max
    k_star = math.sqrt((cost_upstream / cost_draw) * (var_within / var_between))
    hi = k_max if k_max is not None else max(k_min, math.ceil(k_star))
    candidates = {min(max(k, k_min), hi) for k in (math.floor(k_star), math.ceil(k_star))}
    return min(sorted(candidates),
               key=lambda k: work_normalised_variance(var_between, var_within, cost_upstream, cost_draw, k))


def _check_range(rng, name: str) -> tuple[int, int]:
    if not (isinstance(rng, (tuple, list)) and len(rng) == 2):
        raise ValueError(f"{name}: expected a pair (lo, hi) of positive integers, got {rng!r}")
    lo, hi = rng
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a pair (lo, hi) of positive integers, got {rng!r}")
    if lo > hi:
        raise ValueError(f"{name}: expected lo <= hi, got {rng!r}")
    return lo, hi


def largest_r_within(budget: float, step_cost: float, r_max: int) -> int:
    """The largest ``R <= r_max`` with ``R * step_cost <= budget`` (0 when none), exact in floating point."""
    if step_cost == 0:
        return r_max
    r = min(r_max, int(budget // step_cost) + 1)
    while r > 0 and r * step_cost > budget:  # floor division can be off by one at the boundary
        r -= 1
    return r


def _smallest_r_reaching(var_one: float, target: float, r_min: int, r_max: int) -> int | None:
    """The smallest ``R`` in ``[r_min, r_max]`` with ``var_one / R <= target`` (None when none does)."""
    if var_one <= target * r_min:
        return r_min
    if target == 0:
        return None
    r = max(r_min, math.ceil(var_one / target) - 1)
    while r <= r_max and var_one / r > target:
        r += 1
    return r if r <= r_max else None


def allocate(between: float, within: float, cost_upstream: float, cost_draw: float, *,
             budget: float | None = None, target_variance: float | None = None,
             r_range: tuple[int, int] = (1, 64), k_range: tuple[int, int] = (1, 256),
             efficiency_tolerance: float | None = None, strata: float = 0.0) -> tuple[int, int]:
    """The integer ``(R, K)`` that spends a per-step budget best, or reaches a variance most cheaply
    (``strata``: the within part at ``K`` strata, :func:`within_at`).

    Pass exactly one of:

    - ``budget`` (seconds per step): the pair minimising ``between / R + within / (R K)`` subject to
      ``R (cost_upstream + K cost_draw) <= budget``. Ties in variance go to the cheaper pair, then to the
      smaller ``R``.

      With ``efficiency_tolerance`` (a fraction, e.g. 0.03) the budget is a cap and efficiency comes first:
      among the affordable pairs those whose work-normalised variance ``Var * C`` is within
      ``1 + efficiency_tolerance`` of the smallest, and of those the one with the smallest variance. ``Var * C``
      does not depend on ``R``, so this is ``K`` near ``K*`` with ``R`` as large as the budget allows (DESIGN.md
      section 2), without the loss of filling a budget that fits one render but not two with draws beyond ``K*``.
    - ``target_variance``: the cheapest pair with ``between / R + within / (R K) <= target_variance``.
      Ties in cost go to the smaller variance, then to the smaller ``R``.

    Exact over the integer grid ``r_range x k_range`` (both inclusive): for each ``K`` the best ``R`` is the
    largest affordable one (budget mode) or the smallest sufficient one (target mode), so the search is one
    pass over ``K``. Raises ``ValueError`` when no pair on the grid is feasible, naming the cheapest cost or
    the smallest variance the grid allows. DESIGN.md section 2 gives the continuous answer: ``K*`` of
    :func:`optimal_k` with ``R = budget / (c_up + K* c_draw)``, and ``R = 1`` with the rest spent on draws when
    even one upstream sample with ``K*`` draws exceeds the budget.
    """
    _check_nonneg(between=between, within=within, cost_upstream=cost_upstream, cost_draw=cost_draw)
    r_min, r_max = _check_range(r_range, "r_range")
    k_min, k_max = _check_range(k_range, "k_range")
    check_span(k_min, k_max, "k_range")  # the search below visits every K: refuse (1, 10**9) at once
    if (budget is None) == (target_variance is None):
        raise ValueError(f"budget, target_variance: pass exactly one of them, got budget={budget!r}, "
                         f"target_variance={target_variance!r}")
    best: tuple | None = None  # (primary, secondary, R, K) compared lexicographically
    if budget is not None:
        _check_nonneg(budget=budget)
        if efficiency_tolerance is not None:
            _check_nonneg(efficiency_tolerance=efficiency_tolerance)
        if between == within == 0 and r_min * (cost_upstream + k_min * cost_draw) <= budget:
            return r_min, k_min  # every pair has variance 0: the cheapest one
        pairs = []  # (variance, cost, R, K) of the largest affordable R at each K
        for K in range(k_min, k_max + 1):
            c = cost_upstream + K * cost_draw
            R = largest_r_within(budget, c, r_max)
            if R < r_min:
                break  # the step cost only grows with K
            pairs.append(((between + within_at(within, K, strata) / K) / R, R * c, R, K))
        if not pairs:
            cheapest = r_min * (cost_upstream + k_min * cost_draw)
            raise ValueError(f"budget: {budget!r} s per step is below the cheapest pair on the grid, "
                             f"R={r_min}, K={k_min} at {cheapest!r} s")
        if efficiency_tolerance is not None:
            wnv = {p: work_normalised_variance(between, within, cost_upstream, cost_draw, p[3], strata) for p in pairs}
            least = min(wnv.values())
            pairs = [p for p in pairs if wnv[p] <= (1.0 + efficiency_tolerance) * least]
        best = min(pairs)
        return best[2], best[3]
    _check_nonneg(target_variance=target_variance)
    for K in range(k_min, k_max + 1):
        one = between + within_at(within, K, strata) / K
        R = _smallest_r_reaching(one, target_variance, r_min, r_max)
        if R is None:
            continue
        v = one / R
        key = (R * (cost_upstream + K * cost_draw), v, R, K)
        if best is None or key < best:
            best = key
    if best is None:
        smallest = (between + within_at(within, k_max, strata) / k_max) / r_max
        raise ValueError(f"target_variance: {target_variance!r} is below the smallest variance on the grid, "
                         f"{smallest!r} at R={r_max}, K={k_max}")
    return best[2], best[3]


def efficiency_bound(var_between: float, var_within: float, cost_upstream: float, cost_draw: float,
                     strata: float = 0.0) -> float:
    """The smallest ``Var * C`` any ``K`` can reach: ``(sigma_b sqrt(c_up) + sigma_w sqrt(c_draw))^2`` (over real
    ``K``). With a strata share (:func:`within_at`) the smaller of the iid curve's minimum over real ``K`` in
    ``[1, 2]`` and the stratified curve's (``sigma_w^2 (1 - strata)`` per draw) over real ``K >= 2``: below
    ``Var * C`` at every integer ``K``, and the iid bound as the share goes to 0 wherever the iid optimum is
    ``K >= 1``."""
    _check_nonneg(var_between=var_between, var_within=var_within, cost_upstream=cost_upstream,
                  cost_draw=cost_draw)
    w2 = within_at(var_within, 2, strata)  # checks the share
    if strata == 0:
        return (math.sqrt(var_between * cost_upstream) + math.sqrt(var_within * cost_draw)) ** 2

    def curve_min(w: float, lo: float, hi: float) -> float:
        """The minimum of ``(b + w / K)(c_up + K c_draw)`` over real ``K`` in ``[lo, hi]`` (convex in ``K``)."""
        num, den = w * cost_upstream, var_between * cost_draw
        k = hi if den == 0 else min(max(math.sqrt(num / den), lo), hi)
        if math.isinf(k):  # no between part or free draws: the infimum as K grows
            return var_between * cost_upstream + w * cost_draw
        return (var_between + w / k) * (cost_upstream + k * cost_draw)

    return min(curve_min(var_within, 1.0, 2.0), curve_min(w2, 2.0, math.inf))


def ecm(var_base: float, cost_base: float, var_method: float, cost_method: float) -> float:
    """Effective compute multiplier ``(Var_B C_B) / (Var_M C_M)``: baseline cost / method cost at equal variance."""
    _check_nonneg(var_base=var_base, cost_base=cost_base, var_method=var_method, cost_method=cost_method)
    denom = var_method * cost_method
    if denom == 0:
        raise ValueError("var_method, cost_method: their product is 0, so the ECM is undefined")
    return var_base * cost_base / denom


def relative_efficiency(var_uniform: float, var_method: float) -> float:
    """``Var_uniform / Var_method`` at matched ``(R, K)``."""
    _check_nonneg(var_uniform=var_uniform, var_method=var_method)
    if var_method == 0:
        raise ValueError("var_method: is 0, so the relative efficiency is undefined")
    return var_uniform / var_method


def fraction_of_bound(bound: float, var_method: float, cost_method: float) -> float:
    """``bound / (Var_M C_M)``: 1 means the method reaches the efficiency bound."""
    _check_nonneg(bound=bound, var_method=var_method, cost_method=cost_method)
    return bound / (var_method * cost_method)
