"""carv.runner: the per-step loop (start, advance, finish), the interleaving of runs at equal steps or equal
compute, and the one timing mechanism (CostMeter.now, Stopwatch) it times stages with."""

import pytest

from carv import runner
from carv.accounting import Allocator, CostMeter, Stopwatch, choose_next, plan_step


class Clock:
    """A hand-advanced clock: every stage time below is known exactly."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class ToyRun:
    """A run whose steps cost ``cost`` seconds each; evaluated every ``eval_every`` steps, checkpointed every
    ``save_every``."""

    def __init__(self, name, cost, steps, log, eval_every=2, save_every=3):
        self.name, self.cost, self.steps, self.log = name, cost, steps, log
        self.eval_every, self.save_every = eval_every, save_every
        self.step_count, self.elapsed, self.evals, self.saved = 0, 0.0, [], []
        self.evaluated_at = None

    @property
    def done(self):
        return self.step_count >= self.steps

    def step(self):
        self.step_count += 1
        self.elapsed += self.cost
        self.log.append(self.name)
        return {"kind": "step", "step": self.step_count}

    def eval_due(self):
        return self.step_count % self.eval_every == 0 and self.evaluated_at != self.step_count

    def evaluate(self):
        row = {"kind": "eval", "step": self.step_count}
        self.evals.append(row)
        return row

    def mark_evaluated(self):
        self.evaluated_at = self.step_count

    def checkpoint_due(self):
        return self.step_count % self.save_every == 0

    def save(self):
        self.saved.append(self.step_count)


def test_run_evaluates_at_the_start_after_due_steps_and_at_the_end_and_checkpoints_when_due():
    log, rows, seen = [], [], []
    r = ToyRun("a", 1.0, 5, log)
    final = runner.run(r, rows, seen.append)
    assert [(x["kind"], x["step"]) for x in rows] == [("eval", 0), ("step", 1), ("step", 2), ("eval", 2),
                                                     ("step", 3), ("step", 4), ("eval", 4), ("step", 5), ("eval", 5)]
    assert seen == rows and final == {"kind": "eval", "step": 5}
    assert r.saved == [3, 5]  # every save_every steps, and at the end


def test_interleave_by_step_keeps_the_runs_level_and_breaks_ties_by_order():
    log = []
    runs = {"base": ToyRun("base", 1.0, 3, log), "carv": ToyRun("carv", 5.0, 2, log)}
    runner.interleave(runs, "step")
    assert log == ["base", "carv", "base", "carv", "base"]
    log.clear()
    runs = {"base": ToyRun("base", 1.0, 2, log), "carv": ToyRun("carv", 5.0, 2, log)}
    runner.interleave(runs, "step", order=["carv", "base"])
    assert log == ["carv", "base", "carv", "base"]


def test_interleave_by_wall_clock_steps_the_run_with_the_least_own_time():
    """Steps of 1 s and 3 s: the cheap run makes three steps for every costly one, and at every moment the two
    runs' times differ by less than one costly step."""
    log = []
    runs = {"cheap": ToyRun("cheap", 1.0, 10**9, log), "costly": ToyRun("costly", 3.0, 10**9, log)}
    gaps = []
    runner.interleave(runs, "wall-clock", done=lambda k, r: r.elapsed >= 12.0,
                      callback=lambda k, r: gaps.append(abs(runs["cheap"].elapsed - runs["costly"].elapsed)))
    assert runs["cheap"].step_count == 12 and runs["costly"].step_count == 4
    assert log[:5] == ["cheap", "costly", "cheap", "cheap", "cheap"] and max(gaps) <= 3.0
    with pytest.raises(ValueError, match="by: expected one of"):
        runner.interleave(runs, "flops")
    with pytest.raises(ValueError, match="order"):
        runner.interleave(runs, "step", order=["cheap"])


def test_stopwatch_splits_a_step_into_stages_on_the_meters_clock():
    clock = Clock()
    meter = CostMeter(clock=clock)
    sw = meter.stopwatch()
    assert isinstance(sw, Stopwatch)
    clock.t = 2.0
    assert sw.lap("upstream") == 2.0
    clock.t = 2.5
    sw.lap("draw")
    clock.t = 3.5
    sw.lap("upstream")  # a stage lapped twice adds up
    clock.t = 4.0
    sw.lap()  # to no stage
    sw.record({"upstream": 2, "draw": 4, "probe": 1})  # a stage never lapped is not recorded
    assert meter.median("upstream") == 1.5 and meter.median("draw") == 0.125 and "probe" not in meter.times
    assert sw.elapsed() == 4.0
    with meter.stage("render", count=2):
        clock.t = 5.0
    assert meter.median("render") == 0.5 and meter.now() == 5.0


def test_plan_step_and_choose_next_follow_the_allocator():
    assert plan_step(None, 3, 5) == (3, 5, False)
    alloc = Allocator(None, r_range=(1, 1), k_range=(1, 8), r_init=1, k_init=4, every=1, warmup=1, probe_every=2)
    assert plan_step(alloc, 9, 9) == (2, 2, True)  # a probe at step 0: R, K >= 2 with the step's draws shared
    meter = CostMeter()
    meter.add("upstream", 0.09)
    meter.add("draw", 0.01)
    R, K = choose_next(alloc, meter, (1.0, 1.0))
    # free budget: K* = sqrt((c_up / c_draw)(within / between)) = 3, at the fixed R
    assert (R, K) == (1, 3) and plan_step(alloc, 9, 9) == (1, 3, False)
