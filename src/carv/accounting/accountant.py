"""One object for the per-step accounting loop: time the stages, probe the variance when due, set the next
``(R, K)``.

Without it a user wires five things by hand each step (stage timers, a variance probe, ``AutoK.observe``,
``AutoK.step``, ``sds.K = ...``). With it::

    acc = carv.Accountant(sds, params=list(model.parameters()))
    for step in range(n_steps):
        with acc.step() as st:                 # times the whole step
            x = render(model, cameras(acc.R))  # acc.R upstream samples (2 on a probe step when R would be 1)
            out = st.objective(x, cond)        # the objective call is the "draw" stage
            st.backward(out, x)                # out.loss.backward(), plus the probe's two extra VJPs when due
            optimizer.step()
        # here sds.K (and acc.R) hold the next step's choice

Probe steps draw iid timesteps (the objective's ``sampler.iid()``, when it has one), so the probe reads the
components unbiasedly whatever stratification the other steps use.

Costs. The ``"draw"`` stage is the objective call (its ``R K`` teacher draws, per draw); everything else
inside the step (render, encode, backward, optimiser) is ``"upstream"`` (per upstream sample), the two stages
of the cost model ``C = R (c_up + K c_draw)``. The probe's extra backward passes are timed apart
(``"probe"``) and not charged to either stage; they are reported so that a benchmark can charge them.

Variance. On the steps the :class:`~carv.accounting.Allocator` marks as probe steps (every ``probe_every``
steps) the step's own draws are split into between- and within-sample components in the space of
``params`` (the gradient the optimiser consumes) by :class:`~carv.accounting.ComponentProbe`; without
``params`` the objective's free components of the upstream output (a cheaper, often poor proxy) are used.
A probe needs ``R >= 2`` and ``K >= 2``: on a probe step :attr:`R` and ``K`` follow the allocator's
``probe_shape()`` (e.g. ``(1, 8) -> (2, 4)``), and its extra cost is charged by the allocator.

Choice. The :class:`~carv.accounting.Allocator` (issue 12's online allocator: winsorised means of the
signed observed components, re-choices every ``choose_every`` steps after a warm-up) sets the next
``(R, K)`` from them and the stage medians: with ``budget="baseline"`` (default) at the plain estimator's
measured step cost (equal per-step compute), with a number of seconds per step, or with ``budget=None``
``K`` alone at fixed ``R``. Every step's estimator is an ordinary fixed-``(R, K)`` estimator, so each step
stays unbiased.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from carv.accounting.allocator import Allocator, choose_next, plan_step
from carv.accounting.meter import CostMeter
from carv.accounting.probe import ComponentProbe
from carv.accounting.report import accounting_summary

__all__ = ["Accountant", "AccountantStep"]


class AccountantStep:
    """The handle of one step (from :meth:`Accountant.step`): call the objective and the backward through it."""

    def __init__(self, acc: Accountant):
        self.acc = acc
        self.draw_s = 0.0
        self.probe_s = 0.0
        self.R: int | None = None
        self.K: int | None = None
        self.out: Any = None
        self.components: tuple[float, ...] | None = None
        self._probe = False
        self._sampler = None

    def objective(self, x: Tensor, *args, **kwargs) -> Any:
        """``objective(x, *args, **kwargs)`` timed as the draw stage (with ``keep_draws`` on a probe step)."""
        acc = self.acc
        self.R, self.K = int(x.shape[0]), acc.objective.K
        probe = acc.probe_due and self.R >= 2 and self.K >= 2
        if probe and acc.params is not None:
            kwargs["keep_draws"] = True
        obj = acc.objective
        sampler = getattr(obj, "sampler", None) or getattr(getattr(obj, "estimator", None), "sampler", None)
        iid = sampler.iid() if probe and hasattr(sampler, "iid") else nullcontext()
        t0 = acc.meter.now()
        with iid:  # a probe step draws iid timesteps: the probe is unbiased for iid components
            self.out = acc.objective(x, *args, **kwargs)
        self.draw_s += acc.meter.now() - t0
        self._probe = probe
        self._sampler = sampler
        est = getattr(self.out, "estimate", None)
        if probe and acc.params is None and est is not None and est.between is not None:
            self.components = (est.between, est.within)  # the free proxy: components of the upstream output
        return self.out

    def backward(self, out: Any, x: Tensor | None = None) -> None:
        """``out.loss.backward()``; on a probe step first the two extra vector-Jacobian products through ``x``
        (the upstream output passed to :meth:`objective`) that give the parameter-space components."""
        acc = self.acc
        if getattr(out, "skipped", None) is not None:
            out.loss.backward()
            return
        if self._probe and acc.params is not None:
            if x is None:
                raise ValueError("x: a probe step needs the upstream output passed to objective(x, ...)")
            t0 = acc.meter.now()
            draws = getattr(out, "draws", None)
            # the third contrast (the within-half variance, what per-row strata leave of the within part) where
            # the allocator reads it and the ordinary steps stratify rows
            halves = (self._sampler.half(draws.t) if acc.allocator.probe_reads_halves(self._sampler)
                      and getattr(draws, "t", None) is not None else None)
            comps = ComponentProbe(self.R, self.K).measure_halves(x, acc.params, out.estimate.draws, halves,
                                                                  acc.generator, retain_graph=True)  # backward follows
            self.components = tuple(comps)  # signed: averaged by the allocator
            out.estimate.draws = None
            self.probe_s += acc.meter.now() - t0
        out.loss.backward()


class Accountant:
    """The per-step accounting loop around a user's own upstream and objective (see the module doc).

    Args:
        objective: a carv objective with a settable ``K`` (``ScoreDistillation``, ``DistributionMatching``), or
            anything callable with ``K`` that returns an output with ``loss`` and ``estimate``.
        params: the parameters whose gradient the optimiser consumes (for the probe); None: the objective's
            own components of the upstream output.
        R: upstream samples per step to start with (``K`` starts at the objective's).
        budget: the :class:`~carv.accounting.Allocator`'s: ``"baseline"`` (default), seconds per step, or None.
        probe_every, choose_every: steps between probes and between re-choices of ``(R, K)``.
        k_range, r_range: the allowed ``K`` and ``R`` (both inclusive).
        allocator: an :class:`~carv.accounting.Allocator` to use instead of building one from the above.
        device: synchronise CUDA before reading the clock.
        generator: for the probe's random split of the draws.
        live_costs: re-read the stage medians at every re-choice instead of calibrating the cost ratios once
            (:meth:`~carv.accounting.Allocator.costs`; the default keeps a resumed run's choices).
        cost_ratio, probe_ratio: pin the upstream : draw and probe : draw cost ratios the choice reads (default:
            measured; pinned, a run makes the same choices on any machine).
    """

    def __init__(self, objective: Any, params: Sequence[Tensor] | None = None, R: int = 2,
                 budget: float | str | None = "baseline", probe_every: int = 10, choose_every: int = 10,
                 k_range: tuple[int, int] = (1, 64), r_range: tuple[int, int] = (1, 64),
                 allocator: Allocator | None = None, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None, clock: Callable[[], float] = time.perf_counter,
                 warmup: int = 3, live_costs: bool = False, cost_ratio: float | None = None,
                 probe_ratio: float | None = None):
        for name, v in (("R", R), ("probe_every", probe_every), ("choose_every", choose_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if not hasattr(objective, "K"):
            raise TypeError(f"objective: expected a carv objective with a settable K, got {type(objective).__name__}")
        self.objective = objective
        self.params = list(params) if params is not None else None
        self.allocator = allocator if allocator is not None else Allocator(
            budget, r_range=r_range, k_range=k_range, r_init=R, k_init=min(max(objective.K, k_range[0]), k_range[1]),
            every=choose_every, probe_every=probe_every, warmup=warmup, live_costs=live_costs, cost_ratio=cost_ratio,
            probe_ratio=probe_ratio)
        self.meter = CostMeter(device, clock=clock)  # its clock times every stage of a step
        self.generator = generator
        self.clock = clock
        self.steps = 0
        self.probes = 0
        self.probe_seconds = 0.0
        self.history: list[dict] = []
        self._open: tuple[AccountantStep, float] | None = None

    @property
    def probe_due(self) -> bool:
        return self.allocator.probe_due()

    def _shape(self) -> tuple[int, int]:
        return plan_step(self.allocator, self.allocator.R, self.allocator.K)[:2]

    @property
    def shape(self) -> tuple[int, int]:
        """``(R, K)`` of the coming step (the allocator's probe shape on a probe step); :meth:`begin` sets ``K``."""
        return self._shape()

    @property
    def R(self) -> int:
        """Upstream samples for the coming step (the allocator's probe shape on a probe step)."""
        return self._shape()[0]

    @property
    def K(self) -> int:
        return self.objective.K

    @contextmanager
    def step(self) -> Iterator[AccountantStep]:
        """One optimisation step: ``with acc.step() as st: ...`` (:meth:`begin` and :meth:`end` around the body)."""
        st = self.begin()
        yield st
        self.end()

    @property
    def current(self) -> AccountantStep | None:
        """The open step (between :meth:`begin` and :meth:`end`), or None."""
        return self._open[0] if self._open is not None else None

    def begin(self) -> AccountantStep:
        """Open a step (for loops that cannot use ``with``, e.g. framework hooks); close it with :meth:`end`."""
        if self._open is not None:
            raise ValueError("begin: a step is already open; call end() first")
        self.objective.K = self._shape()[1]
        st = AccountantStep(self)
        self._open = (st, self.meter.now())
        return st

    def end(self) -> None:
        """Close the open step: record its stage costs and components, and let the allocator choose the next
        ``(R, K)``."""
        if self._open is None:
            raise ValueError("end: no step is open; call begin() first")
        st, t0 = self._open
        self._open = None
        total = self.meter.now() - t0
        if st.R is None:
            raise ValueError("step: call st.objective(x, ...) inside the step")
        self.meter.add("upstream", max(total - st.draw_s - st.probe_s, 0.0), count=st.R)
        self.meter.add("draw", st.draw_s, count=st.R * st.K)
        if st.probe_s > 0:
            self.meter.add("probe", st.probe_s)
        self.probe_seconds += st.probe_s
        self.steps += 1
        self.probes += st.components is not None
        n_choices = len(self.allocator.history)
        R, K = choose_next(self.allocator, self.meter, st.components)
        self.objective.K = K
        row = {"step": self.steps, "R": st.R, "K": st.K, "upstream_s": total - st.draw_s - st.probe_s,
               "draw_s": st.draw_s, "probe_s": st.probe_s, "components": st.components, "next_R": R, "next_K": K,
               "rechosen": len(self.allocator.history) > n_choices}
        self.history.append(row)

    def summary(self, proposal: str | None = None) -> dict:
        """:func:`~carv.accounting.accounting_summary` of the run so far: the allocator's components, the meter's
        stage medians, the chosen ``(R, K)`` and its mix (``summary.json["accounting"]``)."""
        a, m = self.allocator, self.meter
        med = {s: (m.median(s) if m.times.get(s) else None) for s in (a.upstream_stage, a.draw_stage)}
        return accounting_summary(a.between, a.within, med[a.upstream_stage], med[a.draw_stage], *a.base,
                                  proposal, k_max=a.k_max, mix=a.mix, strata=a.priced_strata)

    def state_dict(self) -> dict:
        return {"K": self.objective.K, "steps": self.steps, "probes": self.probes,
                "probe_seconds": self.probe_seconds, "allocator": self.allocator.state_dict(),
                "meter": self.meter.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.probes = state["steps"], state["probes"]
        self.probe_seconds = state["probe_seconds"]
        self.objective.K = state["K"]
        self.allocator.load_state_dict(state["allocator"])
        self.meter.load_state_dict(state["meter"])
