"""The online choice of ``(R, K)`` during a run: :class:`Allocator` (at a per-step budget) and :class:`AutoK`
(``K`` alone), from measured stage costs and variance components."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence

from scipy.special import erfcx

from carv._validate import check_share, check_span
from carv.accounting.algebra import (
    _check_nonneg,
    _check_range,
    allocate,
    mixed_step,
    optimal_k,
    predicted_variance,
    work_normalised_variance,
)
from carv.accounting.meter import CostMeter, calibrate_costs

__all__ = ["Allocator", "AutoK", "winsorised_mean", "nonnegative_mean", "plan_step", "choose_next"]

_log = logging.getLogger("carv.accounting")
BETWEEN_ESTIMATES = ("posterior", "clipped")
SELECTIONS = ("efficient", "least-variance")


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
    xs = _winsorised(values, c)
    return sum(xs) / len(xs)


def _winsorised(values: Sequence[float], c: float = 10.0) -> list[float]:
    """``values``, each clipped to ``median +- c * 1.4826 * MAD`` (:func:`winsorised_mean`)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("values: need at least one value")
    med = statistics.median(xs)
    s = c * 1.4826 * statistics.median(abs(v - med) for v in xs)
    return [min(max(v, med - s), med + s) for v in xs]


def nonnegative_mean(values: Sequence[float], c: float = 10.0) -> float:
    """The mean of a quantity known to be ``>= 0`` from unbiased signed estimates of it: the posterior mean under a
    flat prior on ``[0, inf)`` with a normal likelihood for the estimates' winsorised mean ``m`` (standard error
    ``s``, the winsorised estimates' standard deviation over ``sqrt(n)``), i.e. the mean of ``N(m, s^2)`` truncated
    at 0: ``m + s phi(m / s) / Phi(m / s)``.

    The allocator's between part. Clipping ``m`` at 0 (the posterior's mode) reads "no between part" whenever the
    signed estimates average below 0, which at ``R = 2`` happens whenever the within part is large, and then spends
    everything on draws: one distillation seed's nine probes averaged -79k +- 184k where its variance curve's
    between part was 263k, and it ran at ``K = 14`` where the best was 3, 0.42 of the bound. Its posterior mean,
    111k, chose ``K = 3``. Since ``Var * C`` is linear in the between part, choosing by its posterior mean minimises
    the posterior expected ``Var * C``. Where ``m`` is many standard errors above 0 this is ``m``; with one estimate
    (no standard error) or identical ones it is ``max(m, 0)``. ``scipy.special.erfcx`` keeps the ratio finite far
    below 0."""
    xs = _winsorised(values, c)
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    if not s > 0:
        return max(m, 0.0)
    # phi(a) / Phi(a) at a = m / s, through the scaled complementary error function: Phi(a) = erfc(-a / sqrt 2) / 2
    return max(m + s * math.sqrt(2.0 / math.pi) / float(erfcx(-m / (s * math.sqrt(2.0)))), 0.0)


def check_cost_pin(name: str, v) -> None:
    """A pinned cost ratio (``name``: ``"cost_ratio"``, an upstream sample's cost in teacher draws, positive; or
    ``"probe_ratio"``, a variance probe's, non-negative) is a finite number of that sign, or None (measured)."""
    if v is None:
        return
    positive = name == "cost_ratio"
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
            or (positive and v == 0)):
        what = ("positive number (an upstream sample's cost, e.g. a render's, in teacher draws)" if positive else
                "non-negative number (a variance probe's cost in teacher draws)")
        raise ValueError(f"{name}: expected a {what} or None (measured), got {v!r}")


class Allocator:
    """Re-chooses ``(R, K)`` during a run from measured stage costs and variance components.

    Use, once per optimisation step::

        alloc = Allocator(budget="baseline")           # or budget=0.12 (s per step), or budget=None
        R, K = alloc.probe_shape() if alloc.probe_due() else (alloc.R, alloc.K)
        ... run the step at (R, K), timing "upstream" / "draw" (and "probe") in a CostMeter ...
        alloc.observe(between, within)                # on steps that measured components (else skip)
        alloc.step(meter)                             # -> the (R, K) of the next ordinary step

    Modes:

    - ``budget`` a number: seconds per step, a cap. Each re-choice is :func:`allocate` at that budget, over
      ``r_range x k_range``, from the current component and cost estimates: the most efficient pair the budget
      allows (``selection="efficient"``, the default: the ``K`` of the least ``Var * C``, which is ``K*`` rounded,
      and ``R`` as large as the budget allows at it). ``selection="least-variance"``: of the pairs within
      ``efficiency_tolerance`` (default 3%) of the best ``Var * C``, the one with the smallest variance; at a fixed
      ``R`` that is the largest ``K`` within the tolerance, which spends up to the tolerance on every choice and,
      since the components' iid model over-values large ``K`` under strata, measured 2-7% more on the saved
      sweep snapshots at render : draw 10-30. ``efficiency_tolerance=None``: the smallest variance the budget allows,
      whatever its efficiency (at a budget that fits one render with many draws but not two, that spends draws
      beyond ``K*``: at render : draw cost 10 about 7% of the efficiency).
    - ``budget="baseline"`` (the default): the cap is what the plain estimator's step costs, measured
      from the same meter: ``R0 (c_up + K0 c_draw)`` with ``(R0, K0) = baseline`` (default ``(2, 1)``), so the
      chosen step is never costlier than the plain one, and the plain pair itself stays a candidate (below).
      A pair in use stays while it is still acceptable (affordable and within ``efficiency_tolerance`` of the
      best efficiency): noise in the components cannot move the run between near-equal neighbours, nor reset
      the probe interval (below) by such a move. No cap on the step's variance: a step cheaper than the plain
      one may be noisier, at a better ``Var * C`` (carv's components cannot predict the plain step's variance,
      whose proposal and strata differ, and a cap read from them bound too tightly).
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
    re-choice that moves the pair halves it (not below ``probe_every``) and restarts the count, but only where
    the move is worth more than the probes: its predicted gain in ``Var * C`` over the pair in use exceeds the
    share of a step the probes take at the interval in use. A move between near-equal neighbours, which noise in
    the components makes, counts as settled, so the probes' share falls until it is below what the moves they
    find are worth (else a run that swaps ``K = 3`` and ``4`` every few re-choices probes at the shortest
    interval for good). The charge of the probes' extra cost follows the interval in use.

    **Mixing two neighbouring pairs.** Integer pairs leave part of a per-step budget unspent, and the probes'
    share makes it worse: at the plain estimator's budget and a render that costs one draw, ``(1, 3)`` costs the
    whole budget, so with any probe charged only ``(1, 2)`` fits. Where ``(R, K + 1)`` does not fit but running a
    share of the ordinary steps at it (the rest at ``(R, K)``) spends the budget on average and has the smaller
    ``Var * C`` (:meth:`mix_for`), the plan carries that mix (``mix=True``, the default): :attr:`base` is the
    chosen pair, :attr:`mix` ``(R, K + 1, share)`` or None, and :attr:`R`, :attr:`K` the coming step's pair, on a
    deterministic schedule that spreads the share evenly (in the state dict, so a resumed run repeats bit for
    bit). Every step stays an ordinary unbiased estimate.

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

    **Same seed, same result.** Measured live on a shared machine the stage costs make runs irreproducible. By
    default (``live_costs=False``) the stage medians are calibrated once, at the first re-choice, into ratios to
    the draw cost quantised to ``per_octave`` points per octave (default 2: neighbours 41% apart, which costs at
    most about 0.5% of the efficiency, since ``K*`` moves with the square root of the ratio), recorded in
    :attr:`calibration` and the state dict: a resumed run reuses them, and a uniform slow-down of every stage
    leaves them unchanged. Two fresh runs can still differ when their measured ratios fall on either side of a
    cut between grid points, which no quantisation of a measured number can rule out (the main job's ratio
    measured 4.8-5.0 idle on a 2-core box and 4.2-6.2 beside busy processes, which slow the stages unequally;
    docs/budget.md); ``cost_ratio`` and
    ``probe_ratio`` pin the ratios (in draws) instead, so a run makes the same choices on any machine: the
    calibration a run used is in its summary. ``live_costs=True`` re-reads the medians at every re-choice.

    **Assumptions.** (1) The components move slowly compared with ``window`` probe periods (they are the components
    of the current iterate's gradient; the median lags a trend by about ``window / 2`` observations). (2) The cost
    model is ``R (c_up + K c_draw)`` with per-render and per-draw medians; a fixed per-step cost (the optimiser
    step) is charged to the renders by the caller. (3) The within part of stratified draws is over-estimated by the
    iid model (conservative: biases ``K`` upwards), with one exception: where the iid model keeps one draw per
    sample, per-row strata decide whether two or more pay, each row of ``K >= 2`` priced at the share of the within
    part that two strata remove (:func:`within_at`; :attr:`strata`, read by the probes' third contrast where the
    caller passes it; :attr:`priced_strata` is the share the pair in use was priced at, 0 for the iid model's
    choice). Beyond that decision the iid model chooses ``K``: on distillation the between part that ``R = 2``
    probes read runs above what the measured variance curves give, and the iid within part's over-estimate offsets
    it, where pricing every ``K`` with strata chose ``K`` too small at render : draw cost ratios 10-30
    (docs/budget.md, "Stratified timesteps"). (4) The choice only moves the cost: each step is an ordinary
    fixed-``(R, K)`` estimate, so the run stays unbiased.

    **Against brute force** (the synthetic problem of tests/test_allocator.py: known components, costs
    32 ms / 4 ms, components measured by R x K probes of 64-dimensional values every 10 steps, every tenth
    measurement, the first included, a thousand times too large; 400 steps): against the brute-force optimum
    (:func:`allocate` with the true components, the same criterion and the same probe-charged budget), the
    final pair's ``Var * C`` was at most 5.0% above it over 5 seeds x 3 within/between ratios (2, 20, 400) x 2
    budgets (the plain estimator's step, where it picks ``R = 1``, and 6 times that, where it picks ``R >= 2``),
    its variance at most 11% (a pair within the tolerance stays); with ``selection="least-variance"`` 14% and 20%.
    Measured pipelines: BENCHMARKS.md.
    """

    def __init__(self, budget: float | str | None = "baseline", *, baseline: tuple[int, int] = (2, 1),
                 r_range: tuple[int, int] = (1, 64), k_range: tuple[int, int] = (1, 256), r_init: int = 2,
                 k_init: int = 1, every: int = 10, warmup: int = 3, window: int = 9, probe_every: int = 10,
                 probe_every_max: int | None = None, settle: int = 3, probe_k_min: int = 2,
                 upstream_stage: str = "upstream", draw_stage: str = "draw", probe_stage: str = "probe",
                 live_costs: bool = False, per_octave: int = 2, efficiency_tolerance: float | None = 0.03,
                 between_estimate: str = "posterior", cost_ratio: float | None = None,
                 probe_ratio: float | None = None, selection: str = "efficient", mix: bool = True,
                 strata_probe: bool = True, strata_window: int | None = None):
        for name, v in (("live_costs", live_costs), ("mix", mix), ("strata_probe", strata_probe)):
            if not isinstance(v, bool):
                raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
        self.mix_on = mix
        self.strata_probe = strata_probe  # probes also read the within-half variance (ComponentProbe.measure_halves)
        self.halves: list[tuple[float, float]] = []  # the last probes' (within-half, within) readings
        self.priced_strata = 0.0  # the strata share the pair in use was priced at (0: the iid model's choice)
        for name, v in (("cost_ratio", cost_ratio), ("probe_ratio", probe_ratio)):
            check_cost_pin(name, v)
            if v is not None and live_costs:
                raise ValueError(f"{name}: a pinned cost ratio and live_costs=True exclude each other "
                                 f"(live costs re-measure every stage at every choice)")
        self.pinned = {k: float(v) for k, v in (("cost_ratio", cost_ratio), ("probe_ratio", probe_ratio))
                       if v is not None}
        if selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {', '.join(SELECTIONS)}, got {selection!r}")
        self.selection = selection
        if between_estimate not in BETWEEN_ESTIMATES:
            raise ValueError(f"between_estimate: expected one of {', '.join(BETWEEN_ESTIMATES)}, "
                             f"got {between_estimate!r}")
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
        if efficiency_tolerance is not None and not (
                isinstance(efficiency_tolerance, (int, float)) and not isinstance(efficiency_tolerance, bool)
                and 0.0 <= efficiency_tolerance < 1.0):
            raise ValueError(f"efficiency_tolerance: expected a fraction in [0, 1) or None, "
                             f"got {efficiency_tolerance!r}")
        self.efficiency_tolerance, self.between_estimate = efficiency_tolerance, between_estimate
        self.budget = budget
        self.R, self.K = r_init, k_init
        self.base = (r_init, k_init)  # the chosen pair; (R, K) is the coming step's (the base or the mix's pair)
        self.mix: tuple[int, int, float] | None = None  # (R, K + 1, share of the ordinary steps run at it)
        self.mix_n = 0  # steps since the mix was chosen (its schedule)
        self.every, self.warmup, self.window, self.probe_every = every, warmup, window, probe_every
        if strata_window is not None and (not isinstance(strata_window, int) or isinstance(strata_window, bool)
                                          or strata_window < 2):
            raise ValueError(f"strata_window: expected an integer >= 2 or None (4 * window), got {strata_window!r}")
        self.strata_window = strata_window if strata_window is not None else 4 * window
        self.probe_every_max, self.settle, self.probe_k_min = probe_every_max, settle, probe_k_min
        self.interval = probe_every  # steps between probes now (doubles while the choice stays put)
        self.next_probe = 0  # the step of the next probe
        self.unchanged = 0  # re-choices in a row that kept the pair
        self.upstream_stage, self.draw_stage, self.probe_stage = upstream_stage, draw_stage, probe_stage
        self.observations: list[tuple[float, float]] = []  # the last `window` (between, within)
        self.n_observed = 0
        self.steps = 0
        self.history: list[dict] = []
        self.live_costs, self.per_octave = live_costs, per_octave
        self.calibration: dict | None = None  # the frozen costs (calibrate_costs), set at the first re-choice

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
        sample (plus the draws that the minimum forces), e.g. ``(1, 8) -> (2, 4)``. Probe steps should draw iid
        timesteps (:class:`~carv.accounting.Accountant` and the apps use ``sampler.iid()``); a caller whose probes
        draw from per-sample strata should pass ``probe_k_min=4``: at ``K = 2`` :class:`ComponentProbe` has no
        contrast free of the mean's drift across the two strata, so its between part comes out too low."""
        return self._probe_pair(self.R, self.K)

    def _probe_pair(self, R: int, K: int) -> tuple[int, int]:
        """The probe shape of the pair ``(R, K)`` (:meth:`probe_shape`; also what :meth:`charged_cost` charges)."""
        R_p = max(R, 2)
        return R_p, max(self.probe_k_min, round(R * K / R_p))

    def probe_interval_for(self, pair: tuple[int, int]) -> int:
        """The probe interval a run settles on at ``pair``: the longest one on the plain pair at its budget (the
        probes there buy nothing until the components move), else the interval in use."""
        if self.budget == "baseline" and tuple(pair) == self.baseline:
            return self.probe_every_max
        return self.interval

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

    def observe_half(self, within_half: float, within: float) -> None:
        """Record one probe's within-half variance ``sigma_s^2(2)`` (:meth:`ComponentProbe.measure_halves`) with
        the iid within variance the same probe read (its draws and its rows)."""
        _check_nonneg(within_half=within_half, within=within)
        self.halves.append((float(within_half), float(within)))
        del self.halves[:-self.strata_window]

    @property
    def reads_halves(self) -> bool:
        """Whether a probe should also read the within-half variance (a third vector-Jacobian product,
        :meth:`ComponentProbe.measure_halves`): with ``strata_probe`` on, while the pair in use draws at most two
        per sample, where the strata decide whether to leave one draw (:meth:`plan`); elsewhere it would buy
        nothing."""
        return self.strata_probe and self.base[1] <= 2

    def probe_reads_halves(self, sampler) -> bool:
        """Whether a probe step should read the within-half variance for a run whose ordinary steps draw from
        ``sampler``: :attr:`reads_halves`, and the sampler stratifies each row's draws
        (:attr:`carv.TimestepSampler.row_strata`; a sampler without the attribute does not). Ask before the probe
        step turns the sampler's strata off (``sampler.iid()``)."""
        return self.reads_halves and bool(getattr(sampler, "row_strata", False))

    @property
    def strata(self) -> float:
        """The share of the within part that two per-row strata of ``t`` remove
        (:func:`~carv.accounting.within_at`): ``1 - sigma_s^2(2) / sigma_w^2`` from the winsorised means of the last
        ``strata_window`` probes' paired readings (both from the same probes' draws), clipped to [0, 1]; 0 (the iid
        model) before two probes of it. The window is longer than the components': a probe sees about ``R / 2``
        pairs of draws in one half, and the share is a property of how the integrand varies in ``t``, which moves
        more slowly than its scale."""
        if len(self.halves) < 2:
            return 0.0
        h, w = (winsorised_mean([p[i] for p in self.halves]) for i in (0, 1))
        return min(max(1.0 - h / w, 0.0), 1.0) if w > 0 else 0.0

    @property
    def between(self) -> float | None:
        """The current between-upstream estimate from the signed observations: their posterior mean given that the
        between part is ``>= 0`` (:func:`nonnegative_mean`; ``between_estimate="posterior"``, the default), or
        their winsorised mean clipped at 0 (``"clipped"``, how runs chose before)."""
        if not self.observations:
            return None
        bs = [b for b, _ in self.observations]
        return nonnegative_mean(bs) if self.between_estimate == "posterior" else max(winsorised_mean(bs), 0.0)

    @property
    def within(self) -> float | None:
        """The current within-upstream estimate: the winsorised mean of the observations."""
        return winsorised_mean([w for _, w in self.observations]) if self.observations else None

    # ---------------------------------------------------------------- the choice
    def step_cost(self, R: int, K: int, cost_upstream: float, cost_draw: float) -> float:
        return R * (cost_upstream + K * cost_draw)

    def charged_cost(self, R: int, K: int, cost_upstream: float, cost_draw: float, cost_probe: float,
                     interval: int) -> float:
        """The average cost of a step at ``(R, K)`` with one probe step every ``interval`` steps charged: the
        step's cost plus the probe step's extra (its shape's cost and the probe's own, ``cost_probe``) over
        ``interval``."""
        step = self.step_cost(R, K, cost_upstream, cost_draw)
        probe = self.step_cost(*self._probe_pair(R, K), cost_upstream, cost_draw) + cost_probe
        return step + max(probe - step, 0.0) / interval

    def _probe_extra(self, pair: tuple[int, int], cost_upstream: float, cost_draw: float, cost_probe: float) -> float:
        """What one probe step costs beyond an ordinary step at ``pair`` (:meth:`charged_cost` at an interval of 1:
        the probe shape's cost and the probe's own, less the step's); what a plan and a move's worth charge."""
        return (self.charged_cost(*pair, cost_upstream, cost_draw, cost_probe, 1)
                - self.step_cost(*pair, cost_upstream, cost_draw))

    def choose(self, cost_upstream: float, cost_draw: float, cost_probe: float = 0.0,
               interval: int | None = None, keep: bool = True) -> tuple[int, int, float | None]:
        """``(R, K, budget_of_ordinary_steps)`` from the current estimates and the given costs, with the probes'
        extra cost charged at one probe every ``interval`` steps (default: the interval in use). ``keep=False``:
        the choice from scratch, without keeping the pair in use where it is still acceptable. The pair of
        :meth:`plan` (without its mix)."""
        return self.plan(cost_upstream, cost_draw, cost_probe, interval, keep)[:3]

    def plan(self, cost_upstream: float, cost_draw: float, cost_probe: float = 0.0, interval: int | None = None,
             keep: bool = True) -> tuple[int, int, float | None, tuple[int, int, float] | None]:
        """``(R, K, budget_of_ordinary_steps, mix)``: :meth:`choose`'s pair and, where the budget leaves room that
        a whole draw more per render does not fit, the mix (:meth:`mix_for`): ``(R, K + 1, share)``, the share of
        ordinary steps run at ``(R, K + 1)`` so that they spend the budget on average; None without one."""
        return self._plan_and_share(cost_upstream, cost_draw, cost_probe, interval, keep)[0]

    def _plan_and_share(self, cost_upstream: float, cost_draw: float, cost_probe: float, interval: int | None,
                        keep: bool) -> tuple[tuple[int, int, float | None, tuple[int, int, float] | None], float]:
        """:meth:`plan` and the strata share it priced its rows at (0: the iid model's plan)."""
        iid = self._plan(cost_upstream, cost_draw, cost_probe, interval, keep, 0.0)
        f = self.strata
        if f > 0 and iid[1] == 1:  # strata decide only whether to leave one draw per sample (see the class doc)
            strat = self._plan(cost_upstream, cost_draw, cost_probe, interval, keep, f)
            if strat[1] >= 2:
                return strat, f
        return iid, 0.0

    def _plan(self, cost_upstream: float, cost_draw: float, cost_probe: float, interval: int | None, keep: bool,
              f: float) -> tuple[int, int, float | None, tuple[int, int, float] | None]:
        """:meth:`plan` with ``K >= 2`` rows priced at the strata share ``f`` (:func:`within_at`)."""
        sb, sw = self.between, self.within
        if self.budget is None:
            k = optimal_k(sb, sw, cost_upstream, cost_draw, k_max=self.k_max, k_min=self.k_min, strata=f)
            return self.base[0], k, None, None
        base = self.baseline
        if self.budget == "baseline":
            B = self.step_cost(*base, cost_upstream, cost_draw)
        else:
            B = float(self.budget)
        P = self.interval if interval is None else interval
        # "efficient": the least Var * C (tolerance 0), R the largest affordable at it; the tolerance then only keeps
        # a pair in use (below)
        select_tol = (0.0 if self.selection == "efficient" and self.efficiency_tolerance is not None
                      else self.efficiency_tolerance)
        b_eff, pair = B, self.base
        cheapest = self.step_cost(self.r_min, self.k_min, cost_upstream, cost_draw)
        for _ in range(3):  # fixed point: the probe's extra cost depends on the pair it probes
            probe_extra = self._probe_extra(pair, cost_upstream, cost_draw, cost_probe)
            # the ordinary steps' budget: P steps, one of them a probe, average B
            b_eff = max(B - probe_extra / P, 0.0) if P > 1 else B
            pair = allocate(sb, sw, cost_upstream, cost_draw, budget=max(b_eff, cheapest),
                            r_range=(self.r_min, self.r_max), k_range=(self.k_min, self.k_max),
                            efficiency_tolerance=select_tol, strata=f)
        # stability: the current pair stays while it is still an acceptable choice (affordable and within the
        # efficiency tolerance of the best), so that noise in the components cannot move the pair
        # between near-equal neighbours (each move also shortens the probe interval)
        tol, cur = self.efficiency_tolerance, self.base
        if (keep and tol is not None and pair != cur
                and self._acceptable(cur, cost_upstream, cost_draw, b_eff)):
            # the most efficient pair at this budget: the selection's own answer when it selects by efficiency
            best = pair if select_tol == 0.0 else allocate(
                sb, sw, cost_upstream, cost_draw, budget=max(b_eff, cheapest), r_range=(self.r_min, self.r_max),
                k_range=(self.k_min, self.k_max), efficiency_tolerance=0.0, strata=f)
            wnv = work_normalised_variance
            if wnv(sb, sw, cost_upstream, cost_draw, cur[1], f) <= (1 + tol) * wnv(sb, sw, cost_upstream, cost_draw,
                                                                                      best[1], f):
                pair = cur
        # at the plain estimator's budget the plain estimator itself (the baseline pair, probed only at the longest
        # interval) stays a candidate, so the choice is never predicted less efficient than it: where probing
        # costs more than reuse gains (cheap renders, costly probes) the run falls back to it and the probes
        # become rare
        mix = self.mix_for(*pair, b_eff, cost_upstream, cost_draw, cost_probe, P, strata=f)
        in_range = self.r_min <= base[0] <= self.r_max and self.k_min <= base[1] <= self.k_max
        if self.budget == "baseline" and pair != base and in_range:
            cost_b = self.charged_cost(*base, cost_upstream, cost_draw, cost_probe, self.probe_interval_for(base))
            if predicted_variance(sb, sw, *base, f) * cost_b < self._charged_wnv(pair, mix, cost_upstream, cost_draw,
                                                                                 cost_probe, P, f):
                return base[0], base[1], B, None
        return pair[0], pair[1], b_eff, mix

    def _charged_wnv(self, pair: tuple[int, int], mix: tuple[int, int, float] | None, cost_upstream: float,
                     cost_draw: float, cost_probe: float, interval: int, strata: float = 0.0) -> float:
        """``Var * C`` of the ordinary steps at ``pair`` (with ``mix``'s share at its pair), probes charged at one
        every ``interval`` steps: the mean variance of a step times the mean cost of a step."""
        var, cost = mixed_step(self.between, self.within, cost_upstream, cost_draw, *pair, mix, strata)
        probes = (self.charged_cost(*pair, cost_upstream, cost_draw, cost_probe, interval)
                  - self.step_cost(*pair, cost_upstream, cost_draw))  # the probes' extra per step
        return var * (cost + probes)

    def mix_for(self, R: int, K: int, budget: float | None, cost_upstream: float, cost_draw: float,
                 cost_probe: float = 0.0, interval: int | None = None, *, strata: float = 0.0
                 ) -> tuple[int, int, float] | None:
        """``(R, K + 1, share)`` (``K >= 2`` rows priced at the strata share ``strata``, :func:`within_at`) where
        the ordinary steps' ``budget`` lies between the costs of ``(R, K)`` and ``(R, K + 1)`` and running the share
        ``(b - C(R, K)) / (C(R, K + 1) - C(R, K))`` of them at ``(R, K + 1)`` (so that they spend ``b`` on average)
        has the smaller ``Var * C`` by the components, the probes charged alike; else None.

        Integer pairs leave part of a per-step budget unspent: at the plain estimator's budget and a render that
        costs one draw, ``(1, 3)`` costs the whole budget, so once a probe's share is charged only ``(1, 2)`` fits,
        75% of it. Each step is an ordinary unbiased estimate whatever its pair, a run's gradient noise is the
        mean of its steps' variances and its cost the mean of their costs, so mixing two neighbouring pairs in a
        fixed share spends the budget exactly: it is the fractional ``K + share``, with the variance of the two
        pairs' chord (``Var`` is convex in ``K``, so the neighbour is the best partner). :meth:`step` spreads the
        share evenly over the steps (a deterministic low-discrepancy schedule, in the state dict), so the same
        run repeats bit for bit. ``mix=False`` at construction turns this off."""
        if not self.mix_on or budget is None or K + 1 > self.k_max:
            return None
        c_lo = self.step_cost(R, K, cost_upstream, cost_draw)
        c_hi = self.step_cost(R, K + 1, cost_upstream, cost_draw)
        if not c_lo < budget < c_hi:
            return None
        mix = (R, K + 1, (budget - c_lo) / (c_hi - c_lo))
        P = self.interval if interval is None else interval
        if (self._charged_wnv((R, K), mix, cost_upstream, cost_draw, cost_probe, P, strata)
                < self._charged_wnv((R, K), None, cost_upstream, cost_draw, cost_probe, P, strata)):
            return mix
        return None

    def _acceptable(self, pair, cost_upstream, cost_draw, budget) -> bool:
        """Whether ``pair`` is on the grid and affordable at ``budget``."""
        R, K = pair
        return (self.r_min <= R <= self.r_max and self.k_min <= K <= self.k_max
                and self.step_cost(R, K, cost_upstream, cost_draw) <= budget)

    def step(self, meter: CostMeter) -> tuple[int, int]:
        """Call once per optimisation step (after :meth:`observe`); returns ``(R, K)`` for the next step."""
        if self.steps >= self.next_probe:  # this step was (due to be) a probe step
            self.next_probe = self.steps + self.interval
        self.steps += 1
        if not (self.n_observed < self.warmup or self.steps % self.every):
            self._rechoose(meter)
        return self._next_pair()

    def _next_pair(self) -> tuple[int, int]:
        """The coming step's pair: the base, or the mix's pair on its share of the steps, spread evenly (the
        ``n``-th step since the mix was chosen takes it when ``floor((n + 1) a)`` exceeds ``floor(n a)``)."""
        if self.mix is None:
            self.R, self.K = self.base
        else:
            R, K, a = self.mix
            n = self.mix_n
            self.mix_n += 1
            self.R, self.K = (R, K) if math.floor((n + 1) * a) > math.floor(n * a) else self.base
        return self.R, self.K

    def costs(self, meter: CostMeter) -> tuple[float, float, float] | None:
        """``(c_up, c_draw, c_probe)`` the choice reads (None before both stages are timed).

        By default (``live_costs=False``) the meter's medians are calibrated once, at the first re-choice, into
        quantised ratios (:func:`~carv.accounting.meter.calibrate_costs`, kept in :attr:`calibration` and in the
        state dict), and every choice reads those: with ``budget="baseline"`` or ``None`` in units of the draw cost
        (the choice then depends only on the calibrated cost *ratios*, which a uniform slow-down of every stage
        leaves unchanged), with a budget in seconds scaled by the calibrated draw cost. ``live_costs=True`` reads
        the meter's current medians at every re-choice."""
        try:
            c_up, c_draw = meter.median(self.upstream_stage), meter.median(self.draw_stage)
        except KeyError:
            return None
        c_probe = meter.median(self.probe_stage) if meter.times.get(self.probe_stage) else 0.0
        if self.live_costs:
            return c_up, c_draw, c_probe
        if self.calibration is None:
            if c_draw <= 0:
                return None
            self.calibration = calibrate_costs(c_up, c_draw, c_probe, self.per_octave) | self.pinned
            self.calibration["pinned"] = sorted(self.pinned)
            _log.info("Allocator: costs calibrated at step %d: render : draw %.3g, probe : draw %.3g%s",
                      self.steps, self.calibration["cost_ratio"], self.calibration["probe_ratio"],
                      f" (pinned: {', '.join(sorted(self.pinned))})" if self.pinned else "")
        cal = self.calibration
        unit = 1.0 if self.budget is None or self.budget == "baseline" else cal["cost_draw_s"]
        return cal["cost_ratio"] * unit, unit, cal["probe_ratio"] * unit

    def _rechoose(self, meter: CostMeter) -> tuple[int, int]:
        costs = self.costs(meter)
        if costs is None:
            return self.R, self.K
        c_up, c_draw, c_probe = costs
        (R, K, b_eff, mix), priced = self._plan_and_share(c_up, c_draw, c_probe, None, True)
        entry = {"step": self.steps, "R": R, "K": K, "previous": list(self.base), "between": self.between,
                 "within": self.within, "cost_upstream": c_up, "cost_draw": c_draw, "cost_probe": c_probe,
                 "budget": b_eff, "mix": list(mix) if mix is not None else None, "strata": self.strata,
                 "priced_strata": priced}
        # "kept": the components have not moved the choice. A pair that moved only because a longer probe
        # interval left more budget for the ordinary steps is kept (else the interval would oscillate).
        kept = (R, K) == self.base
        last = self.history[-1].get("charged_every", self.interval) if self.history else self.interval
        if not kept and last != self.interval:
            kept = self.choose(c_up, c_draw, c_probe, interval=last)[:2] == self.base
        entry["charged_every"] = self.interval  # the probe interval this choice was charged at
        if kept or not self._worth_looking_sooner((R, K), mix, priced, c_up, c_draw, c_probe, b_eff):
            self.unchanged += 1
            if self.unchanged >= self.settle and self.interval < self.probe_every_max:
                self.interval = min(2 * self.interval, self.probe_every_max)
                self.next_probe = min(self.next_probe, self.steps + self.interval)
                self.unchanged = 0
        else:
            self.unchanged, self.interval = 0, max(self.probe_every, self.interval // 2)
            self.next_probe = min(self.next_probe, self.steps + self.interval)
        self.interval = self.probe_interval_for((R, K))  # the longest on the plain pair, as choose charged it
        entry["probe_every"] = self.interval
        self.history.append(entry)
        _log.info("Allocator step %d: (R, K) %s -> (%d, %d); between %.4g within %.4g, c_up %.4g s, "
                  "c_draw %.4g s, ordinary-step budget %s", self.steps, tuple(entry["previous"]), R, K,
                  entry["between"], entry["within"], c_up, c_draw, "free" if b_eff is None else f"{b_eff:.4g} s")
        if (R, K) != self.base or (mix is None) != (self.mix is None) or (mix and mix[:2] != self.mix[:2]):
            self.mix_n = 0  # a new plan starts its mix schedule
        self.base, self.mix, self.priced_strata = (R, K), mix, priced
        self.R, self.K = R, K
        return R, K

    def _worth_looking_sooner(self, pair, mix, strata, cost_upstream, cost_draw, cost_probe, budget) -> bool:
        """Whether a move to ``pair`` (with ``mix``) counts as the components having moved (the probe interval
        halves and the settle count restarts): what the move gains over keeping the pair in use (``1 - Var*C(new)
        / Var*C(old)`` by the current components, each pair's probes charged as the plan charges them, the plain
        pair at its longest interval) exceeds the share of a step the probes take at the interval in use.
        Otherwise the move is one between near-equal neighbours that noise in the components makes, worth less
        than the probes that found it, and counts as settled. A move always counts where the pair in use is off
        the grid or unaffordable at ``budget``, or where the costs or components leave nothing to compare."""
        P = self.interval
        if not self._acceptable(self.base, cost_upstream, cost_draw, budget if budget is not None else math.inf):
            return True
        new = self._charged_wnv(pair, mix, cost_upstream, cost_draw, cost_probe, self.probe_interval_for(pair), strata)
        old = self._charged_wnv(self.base, self.mix, cost_upstream, cost_draw, cost_probe,
                                self.probe_interval_for(self.base), strata)
        step = mixed_step(self.between, self.within, cost_upstream, cost_draw, *pair, mix, strata)[1]
        if not (old > 0 and step > 0):
            return True
        return 1.0 - new / old > self._probe_extra(pair, cost_upstream, cost_draw, cost_probe) / (P * step)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """JSON-serialisable state (no tensors)."""
        return {"R": self.R, "K": self.K, "observations": [list(o) for o in self.observations],
                "n_observed": self.n_observed, "steps": self.steps, "history": [dict(h) for h in self.history],
                "interval": self.interval, "next_probe": self.next_probe, "unchanged": self.unchanged,
                "calibration": dict(self.calibration) if self.calibration is not None else None,
                "base": list(self.base), "mix": list(self.mix) if self.mix is not None else None,
                "mix_n": self.mix_n, "halves": [list(p) for p in self.halves], "priced_strata": self.priced_strata}

    def load_state_dict(self, state: dict) -> None:
        self.R, self.K = int(state["R"]), int(state["K"])
        # states saved before the mix: the pair in use was the base, with no mix
        self.base = tuple(int(v) for v in state.get("base", (self.R, self.K)))
        mix = state.get("mix")
        if mix is not None and not (isinstance(mix, (list, tuple)) and len(mix) == 3 and 0.0 <= mix[2] <= 1.0):
            raise ValueError(f"state['mix']: expected None or [R, K, share] with share in [0, 1], got {mix!r}")
        self.mix = (int(mix[0]), int(mix[1]), float(mix[2])) if mix is not None else None
        self.mix_n = int(state.get("mix_n", 0))
        halves = state.get("halves", [])
        if not isinstance(halves, list) or any(
                not isinstance(p, (list, tuple)) or len(p) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf for v in p)
                for p in halves):
            raise ValueError(f"state['halves']: expected a list of [within_half, within] pairs of finite numbers "
                             f">= 0, got {halves!r}")
        self.halves = [(float(h), float(w)) for h, w in halves][-self.strata_window:]
        priced = state.get("priced_strata", 0.0)
        check_share("state['priced_strata']", priced)
        self.priced_strata = float(priced)
        self.observations = [(float(b), float(w)) for b, w in state["observations"]][-self.window:]
        self.n_observed, self.steps = int(state["n_observed"]), int(state["steps"])
        self.history = [dict(h) for h in state["history"]]
        # states saved before the probe interval adapted: the fixed schedule they ran on
        self.interval = int(state.get("interval", self.probe_every))
        self.next_probe = int(state.get("next_probe", -(-self.steps // self.probe_every) * self.probe_every))
        self.unchanged = int(state.get("unchanged", 0))
        cal = state.get("calibration")
        self.calibration = dict(cal) if cal is not None else None


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
                 upstream_stage: str = "upstream", draw_stage: str = "draw", warmup: int = 3,
                 live_costs: bool = False):
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
                         upstream_stage=upstream_stage, draw_stage=draw_stage, live_costs=live_costs)

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


def plan_step(allocator: Allocator | None, R: int, K: int) -> tuple[int, int, bool]:
    """``(R, K, probe)`` of the coming step: ``(R, K)`` as given without an allocator; else the allocator's pair,
    or its probe shape (``R, K >= 2``) when it asks for a probe."""
    if allocator is None:
        return R, K, False
    probe = allocator.probe_due()
    return (*(allocator.probe_shape() if probe else (allocator.R, allocator.K)), probe)


def choose_next(allocator: Allocator, meter: CostMeter, components: tuple[float, ...] | None) -> tuple[int, int]:
    """After a step: the probe's (signed) components, if it measured any (``(between, within)`` or
    ``(between, within, within_half)``, :class:`~carv.accounting.components.ProbedComponents`), go to the allocator,
    which then chooses the next step's ``(R, K)`` from them and the meter's stage medians."""
    if components is not None:
        allocator.observe(*components[:2])
        if len(components) > 2 and components[2] is not None:
            allocator.observe_half(components[2], components[1])
    return allocator.step(meter)
