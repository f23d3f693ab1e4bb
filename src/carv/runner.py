"""The one per-step run loop every pipeline uses, and the one interleaving of runs compared at equal compute.

k-diffusion's samplers are the model: a loop over steps that does the same few things every step and hands each
step's result to a ``callback``. Here one step of a run is:

1. **plan**: the ``(R, K)`` the allocator chose, or its probe shape when it asks for a probe (:func:`plan_step`);
2. **step**: the pipeline's own step (render or generate, the objective's draws, one backward, the optimiser), its
   stages timed on the run's :class:`~carv.accounting.CostMeter` by a :class:`~carv.accounting.Stopwatch` (the one
   timing mechanism: the meter's clock, synchronised on CUDA);
3. **choose**: the probe's components go to the allocator, which re-chooses ``(R, K)`` from them and the stage
   medians (:func:`choose_next`);
4. **evaluate** when due, **checkpoint** when due, and the ``callback`` with each row (:func:`advance`).

A run is any object with ``step() -> row``, ``done``, ``eval_due()``, ``evaluate() -> row``, ``evals``,
``mark_evaluated()``, ``checkpoint_due()`` and ``save()`` (:class:`Run`): the text-to-3D trainer and the distiller
are such runs. :func:`run` drives one to its end (:func:`start`, :func:`advance` until done, :func:`finish`);
:func:`interleave` drives several side by side, at equal steps (``by="step"``) or equal compute
(``by="wall-clock"``: the run that has used the least of its own step time goes next, so the machine's load hits
every run alike), which every equal-compute comparison uses.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol

from carv.accounting.allocator import choose_next, plan_step

__all__ = ["Run", "plan_step", "choose_next", "start", "advance", "run", "finish", "interleave", "INTERLEAVE_BY"]

INTERLEAVE_BY = ("step", "wall-clock")


class Run(Protocol):
    """What :func:`advance`, :func:`run` and :func:`interleave` need of a run."""

    step_count: int
    elapsed: float  # seconds of the run's own step time (evaluations and checkpoints not counted)

    @property
    def done(self) -> bool: ...

    def step(self) -> dict[str, Any]: ...

    def eval_due(self) -> bool: ...

    def evaluate(self) -> dict[str, Any]: ...  # also appends the row to ``evals``

    @property
    def evals(self) -> Sequence[dict]: ...  # the evaluations so far (rows with ``step``)

    def mark_evaluated(self) -> None: ...

    def checkpoint_due(self) -> bool: ...

    def save(self) -> None: ...


class Rows(Protocol):
    def append(self, row: dict) -> None: ...


def start(run: Run, rows: Rows | None = None, callback: Callable[[dict], None] | None = None) -> None:
    """Before the first step (of a fresh or a resumed run): the evaluation that is due, if any (a fresh run's
    step 0)."""
    if run.eval_due():
        _evaluate(run, rows, callback)


def advance(run: Run, rows: Rows | None = None, callback: Callable[[dict], None] | None = None) -> dict:
    """One step of ``run``, then an evaluation when due, then a checkpoint when due (so a checkpoint holds the
    evaluation of its step); each row goes to ``rows`` (the run's metrics) and to ``callback``. Returns the
    step's row."""
    row = run.step()
    _emit(row, rows, callback)
    if run.eval_due():
        _evaluate(run, rows, callback)
    if run.checkpoint_due():
        run.save()
    return row


def finish(run: Run, rows: Rows | None = None, callback: Callable[[dict], None] | None = None) -> dict:
    """The end of a run: a final evaluation (unless the last step was evaluated) and a checkpoint; returns the
    final evaluation."""
    if not run.evals or run.evals[-1]["step"] != run.step_count:
        _emit(run.evaluate(), rows, callback)
    run.save()
    return run.evals[-1]


def run(run_: Run, rows: Rows | None = None, callback: Callable[[dict], None] | None = None) -> dict:
    """Drive ``run_`` to its end: :func:`start`, :func:`advance` until it is done, :func:`finish`; returns the final
    evaluation."""
    start(run_, rows, callback)
    while not run_.done:
        advance(run_, rows, callback)
    return finish(run_, rows, callback)


def interleave(runs: Mapping[Hashable, Any], by: str = "step", *,
               advance: Callable[[Hashable, Any], Any] | None = None,
               done: Callable[[Hashable, Any], bool] | None = None,
               clock: Callable[[Any], float] | None = None, order: Sequence[Hashable] | None = None,
               callback: Callable[[Hashable, Any], None] | None = None) -> None:
    """Advance several runs side by side until every one is done, one step at a time, always the run that is
    behind: the fewest steps (``by="step"``: equal per-step comparisons) or the least of its own step time
    (``by="wall-clock"``: equal-compute comparisons; a costly-step and a cheap-step run then pass every point of
    their budgets at about the same moment, so a shared machine's load hits them alike).

    ``advance(key, run)`` makes one step (default ``run.step()``), ``done(key, run)`` says a run is finished
    (default ``run.done``), ``clock(run)`` reads its step time (default ``run.elapsed``); ties go to the run that
    comes first in ``order`` (default: the mapping's order); ``callback(key, run)`` follows every step.
    """
    if by not in INTERLEAVE_BY:
        raise ValueError(f"by: expected one of {INTERLEAVE_BY}, got {by!r}")
    order = list(runs) if order is None else list(order)
    if sorted(map(repr, order)) != sorted(map(repr, runs)):
        raise ValueError(f"order: expected the runs' keys {list(runs)}, got {order}")
    rank = {k: i for i, k in enumerate(order)}
    advance = advance if advance is not None else (lambda k, r: r.step())
    done = done if done is not None else (lambda k, r: r.done)
    clock = clock if clock is not None else (lambda r: r.elapsed)
    behind = (lambda k: (runs[k].step_count, rank[k])) if by == "step" else (lambda k: (clock(runs[k]), rank[k]))
    while True:
        active = [k for k in order if not done(k, runs[k])]
        if not active:
            return
        k = min(active, key=behind)
        advance(k, runs[k])
        if callback is not None:
            callback(k, runs[k])


def _evaluate(run: Run, rows: Rows | None, callback: Callable[[dict], None] | None) -> None:
    row = run.evaluate()
    run.mark_evaluated()
    _emit(row, rows, callback)


def _emit(row: dict, rows: Rows | None, callback: Callable[[dict], None] | None) -> None:
    if rows is not None:
        rows.append(row)
    if callback is not None:
        callback(row)
