"""Compute-aware accounting: variance components, the optimal K, the efficiency bound, ECM, cost meters.

Notation (DESIGN.md section 2). One estimate uses ``R`` upstream samples and ``K`` draws each and costs
``C(R, K) = R (c_up + K c_draw)``. Its variance is ``sigma_b^2 / R + sigma_w^2 / (R K)`` with the
between-sample component ``sigma_b^2`` and the within-sample component ``sigma_w^2``. Work-normalised
variance ``Var * C = (sigma_b^2 + sigma_w^2 / K)(c_up + K c_draw)`` does not depend on ``R`` and is
minimised at ``K* = sqrt((c_up / c_draw)(sigma_w^2 / sigma_b^2))``; the best achievable value is the
efficiency bound ``(sigma_b sqrt(c_up) + sigma_w sqrt(c_draw))^2``.

Variances are traces of covariance matrices (sums over every trailing dimension).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from carv._validate import check_nonneg, check_span

__all__ = [
    "VarianceComponents",
    "variance_components",
    "predicted_variance",
    "work_normalised_variance",
    "optimal_k",
    "allocate",
    "efficiency_bound",
    "ecm",
    "relative_efficiency",
    "fraction_of_bound",
    "CostMeter",
    "Allocator",
    "AutoK",
    "winsorised_mean",
    "ComponentProbe",
    "within_row_variance",
    "timed_estimate",
    "equal_quality_ecm",
]


class VarianceComponents(NamedTuple):
    between: float
    within: float


def variance_components(y: Tensor, row_mean: Tensor | None = None, *, clip: bool = True) -> VarianceComponents:
    """Estimate ``(sigma_b^2, sigma_w^2)`` from one ``[R, K, ...]`` batch of iid inner draws.

    ``within`` is the mean over rows of the unbiased sample variance of the ``K`` values;
    ``between`` is the sample variance of the ``R`` row means minus ``within / K``, clipped at 0 unless
    ``clip=False``. Both are unbiased (before clipping) for iid draws. Pass ``clip=False`` when the estimates
    are averaged over many batches (as :class:`Allocator` does): a clipped estimate is biased upwards and its
    median, at small ``R``, is far below the truth (up to half the signed estimates are negative at ``R = 2``).
    With stratified or antithetic draws the ``within`` estimate is conservative (too large): use replicate
    measurements for headline figures.
    ``row_mean`` (``[R, ...]``), when the caller already holds the row means, saves computing them again.
    """
    if y.ndim < 2:
        raise ValueError(f"y: expected shape [R, K, ...], got {tuple(y.shape)}")
    R, K = y.shape[0], y.shape[1]
    if R < 2 or K < 2:
        raise ValueError(f"y: need R >= 2 and K >= 2 to separate the components, got R={R}, K={K}")
    within, row_mean = within_row_variance(y, row_mean)
    return VarianceComponents(between_component(row_mean, within, K, clip), within)


def between_component(row_mean: Tensor, within: float, K: int, clip: bool = True) -> float:
    """``sigma_b^2`` from the ``R`` row means (``[R, ...]``, ``R >= 2``) and the within component: the sample
    variance (trace) of the means minus ``within / K``, clipped at 0 unless ``clip=False``."""
    R = row_mean.shape[0]
    centred = (row_mean - row_mean.mean(0)).reshape(-1)
    total = float(torch.linalg.vecdot(centred, centred)) / (R - 1)
    between = total - within / K
    return max(between, 0.0) if clip else between


def within_row_variance(y: Tensor, row_mean: Tensor | None = None) -> tuple[float, Tensor]:
    """``(within, row_mean)`` of an ``[R, K, ...]`` batch: the mean over rows of the unbiased sample variance
    of the ``K`` values (summed over the trailing dimensions), and the ``[R, D]`` row means.

    Written as centre-then-dot rather than ``Tensor.var(dim=1)``: on CPU the strided variance kernel is
    about 40x slower for ``[R, K, D]`` batches with small ``K`` (1.4 ms vs 0.04 ms at ``[2, 8, 4096]``),
    which alone would break the accountant's 1% budget against a teacher call. ``row_mean`` (``[R, ...]``,
    e.g. the estimator's per-upstream means) is used instead of computing it again (not for half-precision
    ``y``, whose means are recomputed in float32).
    """
    R, K = y.shape[0], y.shape[1]
    if K < 2:
        raise ValueError(f"y: need K >= 2 draws per row for a within-row variance, got K={K}")
    y = y.detach().reshape(R, K, -1)
    if y.dtype not in (torch.float32, torch.float64):
        y, row_mean = y.float(), None  # half precision would lose the small differences between draws
    row_mean = y.mean(dim=1) if row_mean is None else row_mean.detach().reshape(R, -1)
    d = (y - row_mean[:, None]).reshape(R, -1)
    ss = torch.linalg.vecdot(d, d)  # [R] sums of squared deviations
    return float(ss.double().sum()) / (R * (K - 1)), row_mean


def _check_nonneg(**kw: float) -> None:
    for name, v in kw.items():
        check_nonneg(name, v)  # numpy scalars (np.float32(1.0)) are numbers too


def _check_k(K) -> None:
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ValueError(f"K: expected a positive integer, got {K!r}")


def predicted_variance(var_between: float, var_within: float, R: int, K: int) -> float:
    """``sigma_b^2 / R + sigma_w^2 / (R K)``."""
    _check_nonneg(var_between=var_between, var_within=var_within)
    _check_k(K)
    if not isinstance(R, int) or R < 1:
        raise ValueError(f"R: expected a positive integer, got {R!r}")
    return var_between / R + var_within / (R * K)


def work_normalised_variance(var_between: float, var_within: float, cost_upstream: float, cost_draw: float,
                             K: int) -> float:
    """``Var * C`` for any ``R``: ``(sigma_b^2 + sigma_w^2 / K)(c_up + K c_draw)``."""
    _check_nonneg(var_between=var_between, var_within=var_within, cost_upstream=cost_upstream,
                  cost_draw=cost_draw)
    _check_k(K)
    return (var_between + var_within / K) * (cost_upstream + K * cost_draw)


def optimal_k(var_between: float, var_within: float, cost_upstream: float, cost_draw: float,
              k_max: int | None = None, k_min: int = 1) -> int:
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


def _largest_r_within(budget: float, step_cost: float, r_max: int) -> int:
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
             r_range: tuple[int, int] = (1, 64), k_range: tuple[int, int] = (1, 256)) -> tuple[int, int]:
    """The integer ``(R, K)`` that spends a per-step budget best, or reaches a variance most cheaply.

    Pass exactly one of:

    - ``budget`` (seconds per step): the pair minimising ``between / R + within / (R K)`` subject to
      ``R (cost_upstream + K cost_draw) <= budget``. Ties in variance go to the cheaper pair, then to the
      smaller ``R``.
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
        if between == within == 0 and r_min * (cost_upstream + k_min * cost_draw) <= budget:
            return r_min, k_min  # every pair has variance 0: the cheapest one
        for K in range(k_min, k_max + 1):
            c = cost_upstream + K * cost_draw
            R = _largest_r_within(budget, c, r_max)
            if R < r_min:
                break  # the step cost only grows with K
            key = ((between + within / K) / R, R * c, R, K)
            if best is None or key < best:
                best = key
        if best is None:
            cheapest = r_min * (cost_upstream + k_min * cost_draw)
            raise ValueError(f"budget: {budget!r} s per step is below the cheapest pair on the grid, "
                             f"R={r_min}, K={k_min} at {cheapest!r} s")
        return best[2], best[3]
    _check_nonneg(target_variance=target_variance)
    for K in range(k_min, k_max + 1):
        R = _smallest_r_reaching(between + within / K, target_variance, r_min, r_max)
        if R is None:
            continue
        v = (between + within / K) / R
        key = (R * (cost_upstream + K * cost_draw), v, R, K)
        if best is None or key < best:
            best = key
    if best is None:
        smallest = (between + within / k_max) / r_max
        raise ValueError(f"target_variance: {target_variance!r} is below the smallest variance on the grid, "
                         f"{smallest!r} at R={r_max}, K={k_max}")
    return best[2], best[3]


def efficiency_bound(var_between: float, var_within: float, cost_upstream: float, cost_draw: float) -> float:
    """The smallest ``Var * C`` any ``K`` can reach: ``(sigma_b sqrt(c_up) + sigma_w sqrt(c_draw))^2``."""
    _check_nonneg(var_between=var_between, var_within=var_within, cost_upstream=cost_upstream,
                  cost_draw=cost_draw)
    return (math.sqrt(var_between * cost_upstream) + math.sqrt(var_within * cost_draw)) ** 2


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


class CostMeter:
    """Times named stages; reports medians (robust to the noise of shared machines).

    ``with meter.stage("render"): ...``. On CUDA the meter synchronises before reading the clock
    (pass ``device``), otherwise asynchronous kernels would be charged to the wrong stage. Stages may
    nest; each records its own wall time. ``window`` keeps only the most recent timings, so the costs
    track a run whose stages change speed. ``clock`` reads the time (wall-clock by default;
    ``time.process_time`` charges this process's CPU seconds, which other jobs on a shared machine do
    not move).
    """

    def __init__(self, device: torch.device | str | None = None, window: int = 200,
                 clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._sync = self.device.type == "cuda"
        self.window = window
        self.clock = clock
        self.times: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def stage(self, name: str, count: int = 1) -> Iterator[None]:
        """Time a block; ``count`` says how many units of work it did (e.g. ``R*K`` teacher draws)."""
        if self._sync:
            torch.cuda.synchronize(self.device)
        t0 = self.clock()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize(self.device)
            self.add(name, self.clock() - t0, count)

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        if count < 1:
            raise ValueError(f"count: expected a positive integer, got {count}")
        buf = self.times[name]
        buf.append(seconds / count)
        if len(buf) > self.window:
            del buf[0]
        self.counts[name] += count

    def median(self, name: str) -> float:
        """Median seconds per unit of work of a stage."""
        if not self.times.get(name):
            raise KeyError(f"name: no timings recorded for stage {name!r}; known stages: {sorted(self.times)}")
        return statistics.median(self.times[name])

    def summary(self) -> dict[str, float]:
        return {k: self.median(k) for k in self.times if self.times[k]}

    def state_dict(self) -> dict:
        return {"times": {k: list(v) for k, v in self.times.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.times = defaultdict(list, {k: list(v) for k, v in state["times"].items()})
        self.counts = defaultdict(int, state["counts"])


_log = logging.getLogger("carv.accounting")


def winsorised_mean(values: Sequence[float], c: float = 10.0) -> float:
    """Mean of ``values`` after clipping each to ``median +- c * 1.4826 * MAD`` (the median absolute
    deviation, scaled to a normal's standard deviation).

    The allocator's robust average of noisy variance estimates: an outlier (e.g. a first probe at
    initialisation, 1e6 times the later ones) is pulled in to the bulk, while the bulk keeps its mean.
    With ``c = 10`` the bias on chi-square(1)-distributed estimates (one probe at ``R = 2`` in a gradient
    whose variance sits in one direction) is below 1%, against 55% for the median (checked by simulation
    in tests/test_allocator.py). Hand-written: ``scipy.stats.mstats.winsorize`` clips by rank (a fixed
    fraction of the sample), which at a window of 9 clips a bulk value on every call.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("values: need at least one value")
    med = statistics.median(xs)
    s = c * 1.4826 * statistics.median(abs(v - med) for v in xs)
    return sum(min(max(v, med - s), med + s) for v in xs) / len(xs)


class Allocator:
    """Re-chooses ``(R, K)`` during a run from measured stage costs and variance components.

    Use, once per optimisation step::

        alloc = Allocator(budget="baseline")           # or budget=0.12 (s per step), or budget=None
        R, K = alloc.probe_shape() if alloc.probe_due() else (alloc.R, alloc.K)
        ... run the step at (R, K), timing "upstream" / "draw" (and "probe") in a CostMeter ...
        alloc.observe(between, within)                # on steps that measured components (else skip)
        alloc.step(meter)                             # -> the (R, K) of the next ordinary step

    Modes:

    - ``budget`` a number: seconds per step. Each re-choice is :func:`allocate` at that budget, over
      ``r_range x k_range``, from the current component and cost estimates.
    - ``budget="baseline"`` (the default): the budget is what the plain estimator's step costs, measured
      from the same meter: ``R0 (c_up + K0 c_draw)`` with ``(R0, K0) = baseline`` (default ``(2, 1)``), so
      the run spends exactly the baseline's per-step compute differently.
    - ``budget=None`` (free budget, the behaviour of :class:`AutoK`): ``R`` stays at ``r_init`` and ``K`` is
      :func:`optimal_k` (Var * C does not depend on ``R``).

    **What one step cannot measure.** The components need ``R >= 2`` (between) and ``K >= 2`` (within). When the
    run itself uses ``R = 1`` or ``K = 1`` the caller runs a *probe step* when :meth:`probe_due` says so (every
    ``interval`` steps: ``probe_every``, more once settled, see below) at :meth:`probe_shape` (``R`` at least 2,
    ``K`` at least 2) and measures the components there (e.g. with :class:`ComponentProbe`), with the same number
    of draws shared over the renders; the probe step's estimate is still an ordinary unbiased estimate and is used
    for the step. Its extra cost is *charged*: in budget mode the ordinary steps get the budget ``(P B - C_probe) /
    (P - 1)`` (``P`` the interval in use, ``C_probe`` the probe step's cost including the meter's ``probe_stage``
    median), so the average step over a probe period costs ``B``.

    **Probing less once settled.** A probe step costs more than an ordinary one, and at a budget where the
    choice no longer moves its cost buys nothing (at the plain estimator's budget the choice is one render
    with as many draws as fit, whatever the components). After ``settle`` re-choices in a row that keep the
    pair, the interval between probes doubles, up to ``probe_every_max`` (default ``8 * probe_every``); a
    re-choice that moves the pair resets it to ``probe_every``. The charge of the probes' extra cost
    follows the interval in use.

    **Robust start.** No re-choice before ``warmup`` observations; the estimates are winsorised means of the
    last ``window`` observations (:func:`winsorised_mean`: each clipped to the median +- 10 robust standard
    deviations, then averaged), so one outlier cannot pin ``K`` for a run (unlike an average that the first
    observation sets). Not medians: one probe's estimates are chi-square-like with few degrees of freedom
    (the parameter gradient's variance sits in a few directions), whose median is far below their mean;
    and the between part must be passed *signed* (``clip=False`` in :meth:`ComponentProbe.components`):
    at ``R = 2`` about half the signed estimates are negative, so the median of clipped estimates reads
    about 0 and the allocator spends everything on draws (what text-to-3D's R = 1 runs did). The aggregate
    is clipped at 0 once, after averaging. Re-choices happen every ``every`` calls of :meth:`step`; each is appended to
    :attr:`history` and logged on the ``carv.accounting`` logger (INFO).

    **Assumptions.** (1) The components move slowly compared with ``window`` probe periods (they are the
    components of the current iterate's gradient; the median lags a trend by about ``window / 2``
    observations). (2) The cost model is ``R (c_up + K c_draw)`` with per-render and per-draw medians; a fixed
    per-step cost (the optimiser step) is charged to the renders by the caller. (3) The within component
    of stratified draws is over-estimated (conservative: biases ``K`` upwards). (4) The choice only moves
    the cost: each step is an ordinary fixed-``(R, K)`` estimate, so the run stays unbiased.

    **Against brute force** (the synthetic problem of tests/test_allocator.py: known components, costs
    32 ms / 4 ms, components measured by R x K probes of 64-dimensional values every 10 steps, every tenth
    measurement, the first included, a thousand times too large; 400 steps): the final pair's variance
    against the brute-force optimum (:func:`allocate` with the true components at the same probe-charged
    budget) was at most 1.9% above it over 5 seeds x 3 within/between ratios (2, 20, 400) x 2 budgets (the
    plain estimator's step, where it picks ``R = 1``, and 6 times that, where it picks ``R >= 2``).
    Measured pipelines: BENCHMARKS.md.
    """

    def __init__(self, budget: float | str | None = "baseline", *, baseline: tuple[int, int] = (2, 1),
                 r_range: tuple[int, int] = (1, 64), k_range: tuple[int, int] = (1, 256), r_init: int = 2,
                 k_init: int = 1, every: int = 10, warmup: int = 3, window: int = 9, probe_every: int = 10,
                 probe_every_max: int | None = None, settle: int = 3, probe_k_min: int = 2,
                 upstream_stage: str = "upstream", draw_stage: str = "draw", probe_stage: str = "probe"):
        if not (budget is None or budget == "baseline"):
            _check_nonneg(budget=budget)
            if budget == 0:
                raise ValueError(f"budget: expected a positive number of seconds, 'baseline' or None, got {budget!r}")
        self.r_min, self.r_max = _check_range(r_range, "r_range")
        self.k_min, self.k_max = _check_range(k_range, "k_range")
        check_span(self.k_min, self.k_max, "k_range")
        if not (isinstance(baseline, (tuple, list)) and len(baseline) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in baseline)):
            raise ValueError(f"baseline: expected a pair (R, K) of positive integers, got {baseline!r}")
        self.baseline = (int(baseline[0]), int(baseline[1]))
        for name, v in (("r_init", r_init), ("k_init", k_init), ("every", every), ("warmup", warmup),
                        ("window", window), ("probe_every", probe_every), ("settle", settle)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if isinstance(probe_k_min, bool) or not isinstance(probe_k_min, int) or probe_k_min < 2:
            raise ValueError(f"probe_k_min: expected an integer >= 2 (the within part needs 2 draws), "
                             f"got {probe_k_min!r}")
        if not self.r_min <= r_init <= self.r_max:
            raise ValueError(f"r_init: need r_range[0] <= r_init <= r_range[1], got {r_init} for {r_range}")
        if not self.k_min <= k_init <= self.k_max:
            raise ValueError(f"k_init: need k_range[0] <= k_init <= k_range[1], got {k_init} for {k_range}")
        if budget is not None and probe_every < 2:
            raise ValueError(f"probe_every: a budget needs ordinary steps between probes (>= 2), got {probe_every}")
        if probe_every_max is None:
            probe_every_max = 8 * probe_every
        if isinstance(probe_every_max, bool) or not isinstance(probe_every_max, int) or probe_every_max < probe_every:
            raise ValueError(f"probe_every_max: expected an integer >= probe_every ({probe_every}), "
                             f"got {probe_every_max!r}")
        self.budget = budget
        self.R, self.K = r_init, k_init
        self.every, self.warmup, self.window, self.probe_every = every, warmup, window, probe_every
        self.probe_every_max, self.settle, self.probe_k_min = probe_every_max, settle, probe_k_min
        self.interval = probe_every  # steps between probes now (doubles while the choice stays put)
        self.next_probe = 0  # the step of the next probe
        self.unchanged = 0  # re-choices in a row that kept the pair
        self.upstream_stage, self.draw_stage, self.probe_stage = upstream_stage, draw_stage, probe_stage
        self.observations: list[tuple[float, float]] = []  # the last `window` (between, within)
        self.n_observed = 0
        self.steps = 0
        self.history: list[dict] = []

    # ---------------------------------------------------------------- inputs
    @property
    def needs_probe(self) -> bool:
        """Whether the ordinary step cannot measure both components itself (``R < 2`` or ``K < 2``)."""
        return self.R < 2 or self.K < 2

    def probe_due(self) -> bool:
        """Whether the coming step should measure the components (from step 0, every ``interval`` steps:
        ``probe_every``, doubling up to ``probe_every_max`` while the choice stays put)."""
        return self.steps >= self.next_probe

    def probe_shape(self) -> tuple[int, int]:
        """``(R, K)`` of a probe step: ``R`` raised to 2 where needed and the step's ``R K`` draws shared out
        over the renders (``K >= probe_k_min``, default 2), so that a probe costs at most one extra upstream
        sample (plus the draws that the minimum forces), e.g. ``(1, 8) -> (2, 4)``. With stratified draws pass
        ``probe_k_min=4``: at ``K = 2`` :class:`ComponentProbe` has no contrast free of the mean's drift across
        the two strata, so its within part reads the iid value and its between part comes out too low."""
        R = max(self.R, 2)
        return R, max(self.probe_k_min, round(self.R * self.K / R))

    def observe(self, between: float | None, within: float | None) -> None:
        """Record one measurement of the components (``None`` for one not measured: the other is kept).

        ``between`` may be negative: pass the signed, unbiased estimate (``clip=False``), not one clipped at 0."""
        if between is None and within is None:
            return
        last = self.observations[-1] if self.observations else (None, None)
        b = between if between is not None else last[0]
        w = within if within is not None else last[1]
        if b is None or w is None:
            raise ValueError("between, within: the first observation must give both components")
        if not math.isfinite(b):
            raise ValueError(f"between: expected a finite number, got {b!r}")
        _check_nonneg(within=w)
        self.observations.append((float(b), float(w)))
        del self.observations[:-self.window]
        self.n_observed += 1

    @property
    def between(self) -> float | None:
        """The current between-upstream estimate: the winsorised mean of the signed observations, clipped at 0."""
        return max(winsorised_mean([b for b, _ in self.observations]), 0.0) if self.observations else None

    @property
    def within(self) -> float | None:
        """The current within-upstream estimate: the winsorised mean of the observations."""
        return winsorised_mean([w for _, w in self.observations]) if self.observations else None

    # ---------------------------------------------------------------- the choice
    def step_cost(self, R: int, K: int, cost_upstream: float, cost_draw: float) -> float:
        return R * (cost_upstream + K * cost_draw)

    def choose(self, cost_upstream: float, cost_draw: float, cost_probe: float = 0.0,
               interval: int | None = None) -> tuple[int, int, float | None]:
        """``(R, K, budget_of_ordinary_steps)`` from the current estimates and the given costs, with the probes'
        extra cost charged at one probe every ``interval`` steps (default: the interval in use)."""
        sb, sw = self.between, self.within
        if self.budget is None:
            k = optimal_k(sb, sw, cost_upstream, cost_draw, k_max=self.k_max, k_min=self.k_min)
            return self.R, k, None
        if self.budget == "baseline":
            B = self.step_cost(*self.baseline, cost_upstream, cost_draw)
        else:
            B = float(self.budget)
        P = self.interval if interval is None else interval
        b_eff, pair = B, (self.R, self.K)
        for _ in range(3):  # fixed point: the probe's extra cost depends on the pair it probes
            R_p = max(pair[0], 2)
            probe_cost = self.step_cost(R_p, max(2, round(pair[0] * pair[1] / R_p)), cost_upstream,
                                        cost_draw) + cost_probe
            b_eff = max((P * B - probe_cost) / (P - 1), 0.0)
            cheapest = self.step_cost(self.r_min, self.k_min, cost_upstream, cost_draw)
            pair = allocate(sb, sw, cost_upstream, cost_draw, budget=max(b_eff, cheapest),
                            r_range=(self.r_min, self.r_max), k_range=(self.k_min, self.k_max))
        return pair[0], pair[1], b_eff

    def step(self, meter: CostMeter) -> tuple[int, int]:
        """Call once per optimisation step (after :meth:`observe`); returns ``(R, K)`` for the next step."""
        if self.steps >= self.next_probe:  # this step was (due to be) a probe step
            self.next_probe = self.steps + self.interval
        self.steps += 1
        if self.n_observed < self.warmup or self.steps % self.every:
            return self.R, self.K
        return self._rechoose(meter)

    def _rechoose(self, meter: CostMeter) -> tuple[int, int]:
        try:
            c_up, c_draw = meter.median(self.upstream_stage), meter.median(self.draw_stage)
        except KeyError:
            return self.R, self.K
        c_probe = meter.median(self.probe_stage) if meter.times.get(self.probe_stage) else 0.0
        R, K, b_eff = self.choose(c_up, c_draw, c_probe)
        entry = {"step": self.steps, "R": R, "K": K, "previous": [self.R, self.K], "between": self.between,
                 "within": self.within, "cost_upstream": c_up, "cost_draw": c_draw, "cost_probe": c_probe,
                 "budget": b_eff}
        # "kept": the components have not moved the choice. A pair that moved only because a longer probe
        # interval left more budget for the ordinary steps is kept (else the interval would oscillate).
        kept = (R, K) == (self.R, self.K)
        last = self.history[-1].get("charged_every", self.interval) if self.history else self.interval
        if not kept and last != self.interval:
            kept = self.choose(c_up, c_draw, c_probe, interval=last)[:2] == (self.R, self.K)
        entry["charged_every"] = self.interval  # the probe interval this choice was charged at
        if kept:
            self.unchanged += 1
            if self.unchanged >= self.settle and self.interval < self.probe_every_max:
                self.interval = min(2 * self.interval, self.probe_every_max)
                self.next_probe = min(self.next_probe, self.steps + self.interval)
                self.unchanged = 0
        else:
            self.unchanged, self.interval = 0, self.probe_every
            self.next_probe = min(self.next_probe, self.steps + self.interval)
        entry["probe_every"] = self.interval
        self.history.append(entry)
        _log.info("Allocator step %d: (R, K) %s -> (%d, %d); between %.4g within %.4g, c_up %.4g s, "
                  "c_draw %.4g s, ordinary-step budget %s", self.steps, tuple(entry["previous"]), R, K,
                  entry["between"], entry["within"], c_up, c_draw, "free" if b_eff is None else f"{b_eff:.4g} s")
        self.R, self.K = R, K
        return R, K

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """JSON-serialisable state (no tensors)."""
        return {"R": self.R, "K": self.K, "observations": [list(o) for o in self.observations],
                "n_observed": self.n_observed, "steps": self.steps, "history": [dict(h) for h in self.history],
                "interval": self.interval, "next_probe": self.next_probe, "unchanged": self.unchanged}

    def load_state_dict(self, state: dict) -> None:
        self.R, self.K = int(state["R"]), int(state["K"])
        self.observations = [(float(b), float(w)) for b, w in state["observations"]][-self.window:]
        self.n_observed, self.steps = int(state["n_observed"]), int(state["steps"])
        self.history = [dict(h) for h in state["history"]]
        # states saved before the probe interval adapted: the fixed schedule they ran on
        self.interval = int(state.get("interval", self.probe_every))
        self.next_probe = int(state.get("next_probe", -(-self.steps // self.probe_every) * self.probe_every))
        self.unchanged = int(state.get("unchanged", 0))


class AutoK(Allocator):
    """Chooses ``K`` online at a fixed ``R``: :class:`Allocator` at free budget (a thin wrapper).

    Feed it each step's variance components (from an estimate with ``R >= 2`` and ``K >= 2``) with
    :meth:`observe`; every ``every`` observations it re-chooses ``K = optimal_k(...)`` from robust
    estimates of the components (after ``warmup`` observations; medians of the last ``window``
    observations, ``window`` the span of an exponential average with ``decay``:
    ``(1 + decay) / (1 - decay)``, 19 at the default 0.9) and the
    cost meter's medians of the two stages. Between re-choices ``K`` stays fixed, so each step is an ordinary
    fixed-``K`` estimator (and unbiased); the choice only moves the cost. For a per-step budget, or a run
    at ``R = 1`` or ``K = 1``, use :class:`Allocator`.

    ``k_min`` defaults to 2 so that the within component can always be measured from the same draws
    the pipeline pays for anyway. With stratified draws the within component is over-estimated, which
    biases the choice towards larger ``K`` (conservatively); say so where figures are reported.
    """

    def __init__(self, k_init: int = 4, k_min: int = 2, k_max: int = 64, every: int = 25, decay: float = 0.9,
                 upstream_stage: str = "upstream", draw_stage: str = "draw", warmup: int = 3):
        for name, v in (("k_init", k_init), ("k_min", k_min), ("k_max", k_max), ("every", every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if not k_min <= k_init <= k_max:
            raise ValueError(f"k_init: need k_min <= k_init <= k_max, got {k_min} <= {k_init} <= {k_max}")
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ValueError(f"decay: expected a number in [0, 1), got {decay}")
        self.decay = decay
        super().__init__(budget=None, r_range=(1, 1 << 30), k_range=(k_min, k_max), r_init=2, k_init=k_init,
                         every=every, warmup=warmup, window=max(1, round((1 + decay) / (1 - decay))),
                         upstream_stage=upstream_stage, draw_stage=draw_stage)

    @property
    def k(self) -> int:
        return self.K

    @k.setter
    def k(self, value: int) -> None:
        self.K = value

    def step(self, meter: CostMeter) -> int:
        """Call after :meth:`observe`; returns the ``K`` for the next step. Re-chooses when the number of
        observations is a multiple of ``every`` (and at least ``warmup``), as AutoK always did."""
        self.steps = self.n_observed
        if self.n_observed >= self.warmup and self.n_observed % self.every == 0:
            self._rechoose(meter)
        return self.K


class ComponentProbe:
    """Variance components of the *projected* estimate (e.g. the parameter gradient) from one ``R x K``
    batch, with two extra vector-Jacobian products.

    :func:`variance_components` splits the variance of the per-draw values ``f`` (e.g. render-space
    residuals). The user pays for their image under the upstream's Jacobian, ``g_r = J_r^T fbar_r``, and
    the two spaces can split the variance very differently between the between- and the within-sample
    parts (so the accountant's ``K`` can be far off when it reads the cheap proxy). With ``values`` the
    weighted per-draw values ``[R, K, ...]`` of one batch, :meth:`cotangents` returns two ``[R, ...]``
    cotangents for the upstream output ``x``:

    - the *contrast* ``u_r = c_r fbar_r`` with fixed centred signs ``c`` (``sum c = 0``):
      ``E||sum_r c_r g_r||^2 = (sum c^2) Var(g_r)`` and ``Var(g_r) = sigma_b^2 + sigma_w^2 / K``;
    - the *within contrast* ``h_r = s_r sum_k a_k f_rk`` with fixed column weights ``a`` (``sum a = 0``) and an
      independent random sign ``s_r`` per row: ``E||sum_r J_r^T h_r||^2 = R (sum a^2) sigma_w^2``. For iid draws
      any such weights are exchangeable with a random split. Under carv's per-row (and global) strata a row's
      columns are in stratum order, and the weights are blocks ``(+1, -1, -1, +1)`` (``(1, -2, 1)`` where
      ``K`` leaves 3 or 6 columns) of neighbouring strata, which cancel the mean's constant and linear drift
      across the block: the contrast then measures the *within-stratum* variance, the ``sigma_w^2`` a stratified
      row mean pays (``Var(row mean) = sigma_w^2 / K``), up to the drift's curvature. A random split of the
      draws measures the spread across strata too (the iid ``sigma_w^2``, several times larger for a strongly
      ``t``-dependent residual); a split shared by every row adds cross-row terms (``E[h_r] != 0`` under
      strata), which the signs remove. Measured on distillation's start checkpoint (per-row strata, ``K = 8``,
      40 probes each, SE about 30%): the random shared split read ``sigma_w^2`` 1.9e6 (``R = 2``) and 4.1e6
      (``R = 4``) against about 9e5 for iid draws, which drove ``sigma_b^2`` to 0; these weights read
      ``sigma_b^2`` in line with iid draws'. ``K = 2`` has no drift-free contrast: ``(+1, -1)``.

    Push each through the upstream (``torch.autograd.grad(x, params, u, retain_graph=True)``) and pass
    the results to :meth:`components`, which returns ``(sigma_b^2, sigma_w^2)`` of the projected estimate:
    unbiased (before clipping ``sigma_b^2`` at 0) for iid draws; with stratified draws the within part is
    conservative, as for :func:`variance_components`.
    """

    def __init__(self, R: int, K: int):
        if not isinstance(R, int) or isinstance(R, bool) or R < 2:
            raise ValueError(f"R: the between-sample part needs R >= 2 upstream samples, got {R!r}")
        if not isinstance(K, int) or isinstance(K, bool) or K < 2:
            raise ValueError(f"K: the within-sample part needs K >= 2 draws per upstream sample, got {K!r}")
        self.R, self.K = R, K
        s = torch.tensor([1.0 if r % 2 == 0 else -1.0 for r in range(R)], dtype=torch.float64)
        self.contrast = s - s.mean()
        self.weights = _within_weights(K)

    def cotangents(self, values: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(u, h)``, each ``[R, ...]`` like the upstream output, from weighted per-draw values ``[R, K, ...]``."""
        if values.ndim < 2 or tuple(values.shape[:2]) != (self.R, self.K):
            raise ValueError(f"values: expected shape [R, K, ...] = [{self.R}, {self.K}, ...], "
                             f"got {tuple(values.shape)}")
        v = values.detach()
        c = self.contrast.to(v.device, v.dtype).reshape(self.R, *([1] * (v.ndim - 2)))
        u = c * v.mean(1)
        dev = "cpu" if generator is None else generator.device
        sign = torch.randint(0, 2, (self.R,), generator=generator, device=dev).to(v.device, v.dtype).mul_(2).sub_(1)
        a = self.weights.to(v.device, v.dtype).reshape(1, self.K, *([1] * (v.ndim - 2)))
        h = sign.reshape(c.shape) * (a * v).sum(1)
        return u, h

    def measure(self, x: Tensor, params, values: Tensor, generator: torch.Generator | None = None, *,
                retain_graph: bool = False, clip: bool = False) -> VarianceComponents:
        """The whole probe on one batch: :meth:`cotangents` of ``values`` (``[R, K, ...]``), each pushed through the
        upstream output ``x`` to ``params`` by a vector-Jacobian product, then :meth:`components` (signed by
        default, for :meth:`Allocator.observe`). ``retain_graph=True`` keeps ``x``'s graph for a backward pass
        still to come; parameters ``x`` does not depend on are skipped."""
        u, h = self.cotangents(values, generator)
        params = list(params)
        ju = torch.autograd.grad(x, params, u, retain_graph=True, allow_unused=True)
        jh = torch.autograd.grad(x, params, h, retain_graph=retain_graph, allow_unused=True)
        return self.components(ju, jh, clip=clip)

    def components(self, projected_contrast, projected_half, *, clip: bool = True) -> VarianceComponents:
        """``(sigma_b^2, sigma_w^2)`` from the projected cotangents (tensors, or sequences of tensors such as
        one gradient per parameter). ``clip=False`` keeps the signed (unbiased) between estimate: pass that to
        :meth:`Allocator.observe`, which averages many probes (see :func:`variance_components`)."""
        total = _sq_norm(projected_contrast) / float(self.contrast.pow(2).sum())  # Var(g_r)
        within = _sq_norm(projected_half) / (self.R * float(self.weights.pow(2).sum()))
        between = total - within / self.K
        return VarianceComponents(max(between, 0.0) if clip else between, within)


def _within_weights(K: int) -> Tensor:
    """Column weights of :class:`ComponentProbe`'s within contrast: consecutive blocks ``(+1, -1, -1, +1)``, the
    last one or two blocks ``(1, -2, 1)`` when ``K mod 4`` is 3 or 2 (a leftover column gets 0), each block
    summing to 0 with no linear drift (``sum_k a_k k = 0``); ``K = 2``: ``(+1, -1)``."""
    if K == 2:
        return torch.tensor([1.0, -1.0], dtype=torch.float64)
    sizes = {0: [4] * (K // 4), 1: [4] * (K // 4), 2: [4] * (K // 4 - 1) + [3, 3], 3: [4] * (K // 4) + [3]}[K % 4]
    blocks = [[1.0, -1.0, -1.0, 1.0] if n == 4 else [1.0, -2.0, 1.0] for n in sizes]
    w = [x for b in blocks for x in b]
    return torch.tensor(w + [0.0] * (K - len(w)), dtype=torch.float64)


def _sq_norm(v) -> float:
    if isinstance(v, Tensor):
        return float(v.detach().double().pow(2).sum())
    return sum(float(t.detach().double().pow(2).sum()) for t in v if t is not None)


def timed_estimate(upstream: Callable[[], Tensor], objective: Callable[[Tensor], Any], K: int,
                   meter: CostMeter | None = None, clock: Callable[[], float] | None = None,
                   retain_graph: bool = False) -> tuple[Tensor, Any, dict[str, float]]:
    """One estimate's worth of work, split into the two stages the accountant prices.

    ``x = upstream()`` (``R`` upstream samples, e.g. renders), ``out = objective(x)`` (the ``R K`` teacher
    draws; ``out.loss`` is the surrogate) and ``out.loss.backward()`` (the upstream's backward pass). The
    ``"upstream"`` stage is the forward plus the backward (per upstream sample), ``"draw"`` the objective
    (per draw). With ``meter`` both are recorded there; the seconds are also returned, as
    ``(x, out, {"upstream": ..., "draw": ...})``, for callers that add per-step costs of their own. On
    CUDA pass a ``meter`` built with ``device``: every clock read is then preceded by a synchronisation,
    so asynchronous kernels are charged to the stage that launched them. ``clock`` defaults to the
    meter's clock (wall-clock without a meter).
    """
    if clock is None:
        clock = meter.clock if meter is not None else time.perf_counter

    def now() -> float:
        if meter is not None and meter._sync:
            torch.cuda.synchronize(meter.device)
        return clock()

    t0 = now()
    x = upstream()
    t1 = now()
    out = objective(x)
    t2 = now()
    out.loss.backward(retain_graph=retain_graph)
    t3 = now()
    secs = {"upstream": (t1 - t0) + (t3 - t2), "draw": t2 - t1}
    if meter is not None:
        R = x.shape[0]
        meter.add("upstream", secs["upstream"], count=R)
        meter.add("draw", secs["draw"], count=R * K)
    return x, out, secs


# ----------------------------------------------------------------------------- ECM at equal quality
def equal_quality_ecm(base: list[dict], method: list[dict], key: str = "psnr", window: int = 3,
                      x: str = "elapsed_s", align: str = "center") -> dict:
    """Time for the baseline to reach its final quality / time for the method to reach it (``x="step"``:
    optimisation steps instead of seconds; the result keys keep their ``_s`` names).

    Curves are evaluation rows (``elapsed_s``, ``key``), smoothed by a moving average over ``window``
    evaluations (a single evaluation fluctuates by a few tenths of a dB at the plateau); the target is the
    baseline's final smoothed value and "reach" is the first crossing of the smoothed curve, linearly
    interpolated between evaluations.

    ``align="center"`` (the default) places each average at the mean ``x`` of the evaluations it averages;
    ``"trailing"`` at the last of them (what this function did before 2026-12-02's seventh session). On a rising
    curve a trailing average is the curve delayed by about ``(window - 1) / 2`` evaluation intervals, and that
    delay is not symmetric here: the baseline's crossing of its own smoothed final is its last evaluation
    whatever the delay, while the method's crossing is delayed by it, so the ratio is pulled towards 1 (for two
    straight lines, one twice as steep, evaluated every 50 steps to step 400, window 3: 2.00x centred, 1.78x
    trailing; ``tests/test_text_to_3d.py``). Centred, both crossings are read at the times the averaged
    quality was had. When the method never reaches the target,
    ``ecm`` is None and ``upper_bound`` = ``t_base / t_method_total`` (it would need more than its run).
    """
    if not base or not method:
        raise ValueError("base, method: need at least one evaluation each")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive integer, got {window!r}")
    if align not in ("center", "trailing"):
        raise ValueError(f"align: expected 'center' or 'trailing', got {align!r}")
    sb, sm = _smooth(base, key, window, align), _smooth(method, key, window, align)
    target = sb[-1][key]
    t_base = _first_crossing(sb, key, target, x)
    t_method = _first_crossing(sm, key, target, x)
    res: dict[str, Any] = {"key": key, "window": window, "align": align, "target": target, "t_base_s": t_base,
                           "t_method_s": t_method, "method_final": sm[-1][key], "ecm": None}
    if t_method is None:
        total = method[-1][x]
        res["upper_bound"] = t_base / total if total > 0 else None
        res["note"] = f"never reached the baseline's final {key} {target:.3f}"
    elif t_method <= 0 or t_base <= 0:
        res["note"] = "target reached at time 0 (the initial grid already scores it)"
    else:
        res["ecm"] = t_base / t_method
    return res


def _first_crossing(rows: list[dict], key: str, target: float, x: str = "elapsed_s") -> float | None:
    prev = None
    for r in rows:
        if r[key] >= target - 1e-12:
            if prev is None or r[key] == prev[key]:
                return r[x]
            f = (target - prev[key]) / (r[key] - prev[key])
            return prev[x] + f * (r[x] - prev[x])
        prev = r
    return None


def _smooth(rows: list[dict], key: str, window: int, align: str = "center") -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        win = rows[max(0, i - window + 1):i + 1]
        vals = [q[key] for q in win]
        if align == "center":  # at the mean position of the averaged evaluations (no delay on a straight line)
            pos = {"elapsed_s": sum(q["elapsed_s"] for q in win) / len(win),
                   "step": (sum(q["step"] for q in win) / len(win)) if all("step" in q for q in win) else None}
        else:
            pos = {"elapsed_s": r["elapsed_s"], "step": r.get("step")}
        out.append({**pos, key: sum(vals) / len(vals)})
    return out
