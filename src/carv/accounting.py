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

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor

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
    "AutoK",
    "ComponentProbe",
    "within_row_variance",
    "timed_estimate",
    "equal_quality_ecm",
]


class VarianceComponents(NamedTuple):
    between: float
    within: float


def variance_components(y: Tensor, row_mean: Tensor | None = None) -> VarianceComponents:
    """Estimate ``(sigma_b^2, sigma_w^2)`` from one ``[R, K, ...]`` batch of iid inner draws.

    ``within`` is the mean over rows of the unbiased sample variance of the ``K`` values;
    ``between`` is the sample variance of the ``R`` row means minus ``within / K``, clipped at 0.
    Both are unbiased (before clipping) for iid draws. With stratified or antithetic draws the
    ``within`` estimate is conservative (too large): use replicate measurements for headline figures.
    ``row_mean`` (``[R, ...]``), when the caller already holds the row means, saves computing them again.
    """
    if y.ndim < 2:
        raise ValueError(f"y: expected shape [R, K, ...], got {tuple(y.shape)}")
    R, K = y.shape[0], y.shape[1]
    if R < 2 or K < 2:
        raise ValueError(f"y: need R >= 2 and K >= 2 to separate the components, got R={R}, K={K}")
    within, row_mean = within_row_variance(y, row_mean)
    centred = row_mean - row_mean.mean(0)
    total = float(torch.linalg.vecdot(centred.reshape(-1), centred.reshape(-1))) / (R - 1)
    return VarianceComponents(max(total - within / K, 0.0), within)


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
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: expected a finite non-negative number, got {v!r}")


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


class AutoK:
    """Chooses ``K`` online from measured costs and variance components.

    Feed it each step's variance components (from an estimate with ``R >= 2`` and ``K >= 2``) with
    :meth:`observe`; it keeps exponential moving averages and, every ``every`` steps, re-chooses
    ``K = optimal_k(...)`` from the averages and the cost meter's medians of the two stages. Between
    re-choices ``K`` stays fixed, so the estimator of each step is an ordinary fixed-``K`` estimator
    (and unbiased); the choice only moves the cost.

    ``k_min`` defaults to 2 so that the within component can always be measured from the same draws
    the pipeline pays for anyway. With stratified draws the within component is over-estimated, which
    biases the choice towards larger ``K`` (conservatively); say so where figures are reported.
    """

    def __init__(self, k_init: int = 4, k_min: int = 2, k_max: int = 64, every: int = 25, decay: float = 0.9,
                 upstream_stage: str = "upstream", draw_stage: str = "draw"):
        for name, v in (("k_init", k_init), ("k_min", k_min), ("k_max", k_max), ("every", every)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if not k_min <= k_init <= k_max:
            raise ValueError(f"k_init: need k_min <= k_init <= k_max, got {k_min} <= {k_init} <= {k_max}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a number in [0, 1), got {decay}")
        self.k, self.k_min, self.k_max, self.every, self.decay = k_init, k_min, k_max, every, decay
        self.upstream_stage, self.draw_stage = upstream_stage, draw_stage
        self.between: float | None = None
        self.within: float | None = None
        self.steps = 0
        self.history: list[dict] = []

    def observe(self, between: float | None, within: float | None) -> None:
        if between is not None:
            self.between = between if self.between is None else self.decay * self.between + (1 - self.decay) * between
        if within is not None:
            self.within = within if self.within is None else self.decay * self.within + (1 - self.decay) * within
        self.steps += 1

    def step(self, meter: CostMeter) -> int:
        """Call once per optimisation step after :meth:`observe`; returns the ``K`` for the next step."""
        if self.steps % self.every == 0 and self.between is not None and self.within is not None:
            try:
                c_up, c_draw = meter.median(self.upstream_stage), meter.median(self.draw_stage)
            except KeyError:
                return self.k
            self.k = optimal_k(self.between, self.within, c_up, c_draw, k_max=self.k_max, k_min=self.k_min)
            self.history.append({"step": self.steps, "k": self.k, "between": self.between, "within": self.within,
                                 "cost_upstream": c_up, "cost_draw": c_draw})
        return self.k

    def state_dict(self) -> dict:
        return {"k": self.k, "between": self.between, "within": self.within, "steps": self.steps,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.k, self.between, self.within = state["k"], state["between"], state["within"]
        self.steps, self.history = state["steps"], list(state["history"])


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
    - the *half split* ``h_r = mean_A f_r - mean_B f_r`` over a random split of the ``K`` draws into halves
      ``A``, ``B`` (the same for every row): ``E||sum_r J_r^T h_r||^2 = R (1/|A| + 1/|B|) sigma_w^2``.

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
        self.n_a, self.n_b = K // 2, K - K // 2

    def cotangents(self, values: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(u, h)``, each ``[R, ...]`` like the upstream output, from weighted per-draw values ``[R, K, ...]``."""
        if values.ndim < 2 or tuple(values.shape[:2]) != (self.R, self.K):
            raise ValueError(f"values: expected shape [R, K, ...] = [{self.R}, {self.K}, ...], "
                             f"got {tuple(values.shape)}")
        v = values.detach()
        c = self.contrast.to(v.device, v.dtype).reshape(self.R, *([1] * (v.ndim - 2)))
        u = c * v.mean(1)
        perm = torch.randperm(self.K, generator=generator, device="cpu" if generator is None else generator.device)
        perm = perm.to(v.device)
        h = v[:, perm[: self.n_a]].mean(1) - v[:, perm[self.n_a:]].mean(1)
        return u, h

    def components(self, projected_contrast, projected_half) -> VarianceComponents:
        """``(sigma_b^2, sigma_w^2)`` from the projected cotangents (tensors, or sequences of tensors such as
        one gradient per parameter)."""
        total = _sq_norm(projected_contrast) / float(self.contrast.pow(2).sum())  # Var(g_r)
        within = _sq_norm(projected_half) / (self.R * (1.0 / self.n_a + 1.0 / self.n_b))
        return VarianceComponents(max(total - within / self.K, 0.0), within)


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
def equal_quality_ecm(base: list[dict], method: list[dict], key: str = "psnr", window: int = 3) -> dict:
    """Time for the baseline to reach its final quality / time for the method to reach it.

    Curves are evaluation rows (``elapsed_s``, ``key``), smoothed by a trailing moving average over
    ``window`` evaluations (a single evaluation fluctuates by a few tenths of a dB at the plateau); the
    target is the baseline's final smoothed value and "reach" is the first crossing of the smoothed
    curve, linearly interpolated between evaluations. When the method never reaches the target,
    ``ecm`` is None and ``upper_bound`` = ``t_base / t_method_total`` (it would need more than its run).
    """
    if not base or not method:
        raise ValueError("base, method: need at least one evaluation each")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive integer, got {window!r}")
    sb, sm = _smooth(base, key, window), _smooth(method, key, window)
    target = sb[-1][key]
    t_base = _first_crossing(sb, key, target)
    t_method = _first_crossing(sm, key, target)
    res: dict[str, Any] = {"key": key, "window": window, "target": target, "t_base_s": t_base,
                           "t_method_s": t_method, "method_final": sm[-1][key], "ecm": None}
    if t_method is None:
        total = method[-1]["elapsed_s"]
        res["upper_bound"] = t_base / total if total > 0 else None
        res["note"] = f"never reached the baseline's final {key} {target:.3f}"
    elif t_method <= 0 or t_base <= 0:
        res["note"] = "target reached at time 0 (the initial grid already scores it)"
    else:
        res["ecm"] = t_base / t_method
    return res


def _first_crossing(rows: list[dict], key: str, target: float) -> float | None:
    prev = None
    for r in rows:
        if r[key] >= target - 1e-12:
            if prev is None or r[key] == prev[key]:
                return r["elapsed_s"]
            f = (target - prev[key]) / (r[key] - prev[key])
            return prev["elapsed_s"] + f * (r["elapsed_s"] - prev["elapsed_s"])
        prev = r
    return None


def _smooth(rows: list[dict], key: str, window: int) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        vals = [q[key] for q in rows[max(0, i - window + 1):i + 1]]
        out.append({"elapsed_s": r["elapsed_s"], key: sum(vals) / len(vals)})
    return out
