"""Stage timing: :class:`CostMeter` (per-stage medians) and :func:`timed_estimate` (one estimate split into the
two stages the cost model prices)."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["CostMeter", "timed_estimate"]


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
