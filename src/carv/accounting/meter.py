"""Stage timing, one mechanism: a :class:`CostMeter` reads its clock (:meth:`CostMeter.now`, synchronised on CUDA)
and keeps per-stage medians; a :class:`Stopwatch` splits one step into named stages on that clock
(:meth:`CostMeter.stage` times one block, :func:`timed_estimate` one estimate's two stages)."""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["CostMeter", "Stopwatch", "timed_estimate", "quantise_ratio", "calibrate_costs"]


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

    def now(self) -> float:
        """The meter's clock, read after a CUDA synchronisation on its device (so that asynchronous kernels are
        charged to the stage that launched them). Every stage time in carv is a difference of two readings."""
        if self._sync:
            torch.cuda.synchronize(self.device)
        return self.clock()

    def stopwatch(self) -> Stopwatch:
        """A :class:`Stopwatch` on this meter, started now."""
        return Stopwatch(self)

    @contextmanager
    def stage(self, name: str, count: int = 1) -> Iterator[None]:
        """Time a block; ``count`` says how many units of work it did (e.g. ``R*K`` teacher draws)."""
        t0 = self.now()
        try:
            yield
        finally:
            self.add(name, self.now() - t0, count)

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


class Stopwatch:
    """Splits one step into named stages on a meter's clock: ``sw = meter.stopwatch()``, then after each part of
    the step ``sw.lap("upstream")`` (the seconds since the previous lap, added to that stage; a stage may be
    lapped several times) and at the end ``sw.record({"upstream": R, "draw": R * K})``, which charges each stage
    to the meter per unit of work. ``sw.seconds`` holds the stages' seconds, :meth:`elapsed` the time since the
    start."""

    def __init__(self, meter: CostMeter):
        self.meter = meter
        self.start = self.last = meter.now()
        self.seconds: dict[str, float] = defaultdict(float)

    def lap(self, stage: str | None = None) -> float:
        """Seconds since the previous lap (or the start), added to ``stage`` (None: to no stage)."""
        now = self.meter.now()
        dt, self.last = now - self.last, now
        if stage is not None:
            self.seconds[stage] += dt
        return dt

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self.meter.now() - self.start

    def record(self, counts: dict[str, int]) -> None:
        """Add each lapped stage named in ``counts`` to the meter, per unit of work (``counts[stage]`` units)."""
        for stage, n in counts.items():
            if stage in self.seconds:
                self.meter.add(stage, self.seconds[stage], count=n)


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
    clock_meter = meter if meter is not None else CostMeter()
    if clock is not None:  # another clock, on the meter's device
        clock_meter = CostMeter(clock_meter.device, clock=clock)
    sw = clock_meter.stopwatch()
    x = upstream()
    sw.lap("upstream")
    out = objective(x)
    sw.lap("draw")
    out.loss.backward(retain_graph=retain_graph)
    sw.lap("upstream")
    secs = {"upstream": sw.seconds["upstream"], "draw": sw.seconds["draw"]}
    if meter is not None:
        R = x.shape[0]
        meter.add("upstream", secs["upstream"], count=R)
        meter.add("draw", secs["draw"], count=R * K)
    return x, out, secs


def quantise_ratio(x: float, per_octave: int = 2) -> float:
    """``x > 0`` rounded to the nearest point of the geometric grid ``2^(j / per_octave)`` (``0`` stays ``0``).

    At 2 points per octave neighbouring values are 41% apart, so the scatter of a median over tens of timings
    (5-10% between fresh runs on an idle machine) moves the result only where the ratio sits next to a cut between
    two grid points; a busy machine slows the stages unequally and can move the ratio further (docs/budget.md:
    10-25% on a 2-core box). The price is small: ``K*`` moves with the square root of
    the cost ratio, and ``Var * C`` is flat near it (a ratio 19% off costs about 0.5% of the efficiency)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise ValueError(f"x: expected a finite non-negative ratio, got {x!r}")
    if isinstance(per_octave, bool) or not isinstance(per_octave, int) or per_octave < 1:
        raise ValueError(f"per_octave: expected a positive integer, got {per_octave!r}")
    if x == 0:
        return 0.0
    return 2.0 ** (round(math.log2(x) * per_octave) / per_octave)


def calibrate_costs(cost_upstream: float, cost_draw: float, cost_probe: float = 0.0, per_octave: int = 2) -> dict:
    """The frozen costs an allocator chooses from (DESIGN.md "Same seed, same result"): the stage medians'
    *ratios* to the draw cost, quantised by :func:`quantise_ratio`, with the medians they came from.

    Returns ``{"cost_ratio", "probe_ratio", "cost_upstream_s", "cost_draw_s", "cost_probe_s", "per_octave"}``
    (JSON-serialisable: recorded in the run folder and reused on resume)."""
    for name, v in (("cost_upstream", cost_upstream), ("cost_draw", cost_draw), ("cost_probe", cost_probe)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite non-negative number of seconds, got {v!r}")
    if cost_draw <= 0:
        raise ValueError(f"cost_draw: expected a positive number of seconds, got {cost_draw!r}")
    return {"cost_ratio": quantise_ratio(cost_upstream / cost_draw, per_octave),
            "probe_ratio": quantise_ratio(cost_probe / cost_draw, per_octave),
            "cost_upstream_s": float(cost_upstream), "cost_draw_s": float(cost_draw),
            "cost_probe_s": float(cost_probe), "per_octave": per_octave}
