"""Side-by-side measurement of estimator variance and cost: the one protocol every benchmark uses.

- **Variance by replicates against a reference.** For each configuration (method, R, K) the estimate
  is repeated ``n`` times with independent seeds; ``variance`` is the mean of ``||g_i - ref||^2`` in
  the space the user pays for (the parameter gradient) **minus the reference's own variance**
  (``reference_variance``: ``E||g - ref||^2 = Var(g) + bias^2 + Var(ref)`` for a reference independent
  of the replicates). ``var_replicates`` (the unbiased trace of the replicate covariance, which needs no
  reference) and ``bias2`` (``||mean - ref||^2``) are reported beside it, so a biased peer shows up as
  ``variance >> var_replicates``.
- **Replicate counts for a stated relative error.** ``replicates`` may be a :class:`RelativeError`:
  after ``n_min`` rounds each configuration's count is fixed at ``(CV / target)^2`` (CV of its squared
  errors so far), within ``[n_min, n_max]``; the baseline gets a tighter target (it is the denominator of
  every ECM, and the cheapest row).
- **Pooled cost model.** Every configuration does the same kinds of stage work (``R`` upstream
  passes, ``R K`` teacher draws), so its cost comes from one model: per-stage medians (seconds per unit
  of work) pooled over the replicates of *all* interleaved configurations, times the configuration's
  units, plus the pooled median of the work outside the stages, plus every extra the method pays
  (``charges``: pilots, proposal updates, probes), each listed in the row. The configuration's own
  median seconds per estimate is reported beside it (``cost_wall_s``) as a check only.
- **Error bars that include cost noise.** :func:`pooled_figures` bootstraps over rounds (replicate
  ``r`` of every configuration ran in round ``r``; one resample of rounds serves every row, and the
  stage medians are recomputed from it), giving ``ecm_se`` and a 95% interval.
- **Headline and best-of-N.** :func:`headline` reports one configuration fixed before measuring (with
  who chose it and what it is charged); :func:`best_of_n` reports the maximum over ``n`` rows as an
  upper bound labelled with ``n``. The two are never the same object.
- **Side by side.** Replicates are interleaved round-robin over the configurations, in a shuffled
  order each round, so machine noise (these machines are shared) hits every configuration alike.
- **Resumable.** With ``state_dir`` the accumulators are saved after every round (JSON for scalars,
  safetensors for tensors; nothing is pickled) and a rerun continues where it stopped. A rerun that
  asks for more replicates of the same configurations extends a saved run (replicate ``r`` of a
  configuration always uses the same seed, so the result equals a fresh run with the larger count).
- **Run record.** :func:`run_record` gives the command, the machine and the load average for the JSON.
"""

from __future__ import annotations

import hashlib
import math
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from carv._machine import loadavg, machine_info
from carv._progress import progress_bar
from carv._runfolder import CorruptFileError, atomic_path, atomic_write_json, read_json
from carv.accounting import CostMeter, efficiency_bound, fraction_of_bound, optimal_k, relative_efficiency
from carv.bench.report import SMOKE as SMOKE_NOTE

__all__ = ["Config", "RelativeError", "measure", "pooled_figures", "fit_components",
           "reference_mean", "headline", "best_of_n", "run_record", "SMOKE_NOTE", "replicates_for_rel_error",
           "settings_from_json"]


@dataclass(frozen=True)
class Config:
    method: str
    R: int
    K: int

    @property
    def key(self) -> str:
        return f"{self.method}|R={self.R}|K={self.K}"


@dataclass(frozen=True)
class RelativeError:
    """Replicate counts chosen for a stated relative error of each row's variance.

    Configuration ``c`` needs ``n = ceil((CV_c / target(c))^2)`` replicates, clipped to ``[n_min, n_max]``,
    where ``CV_c`` is the coefficient of variation of its squared errors (the relative standard error of
    a mean of ``n`` of them is ``CV / sqrt(n)``). ``target(c)`` is ``target`` except for ``baseline`` (a
    configuration key), whose target is ``target / baseline_factor ** 0.5`` (about ``baseline_factor``
    times the replicates: the baseline is the denominator of every ECM, and usually the cheapest row).

    ``rule="sequential"`` (default) re-estimates ``CV_c`` from all of ``c``'s replicates after every round
    from ``n_min`` on and stops ``c`` at the first round where it has ``n`` replicates: a heavy-tailed row
    (a ``K = 1`` estimate whose squared errors have CV ~1.4) whose first rounds missed the tail gets more
    replicates as soon as a large value arrives. ``rule="fixed"`` fixes every count once from the first
    ``n_min`` rounds, which under-replicates such rows (their CV from a few values is biased low: tested in
    ``tests/test_harness.py``). Both are deterministic in the seeds (replicate ``r`` of a configuration
    always has the same seed), so a resumed run makes the same decisions.
    """

    target: float = 0.1
    n_min: int = 8
    n_max: int = 400
    baseline: str | None = None
    baseline_factor: float = 10.0
    rule: str = "sequential"

    def __post_init__(self):
        if self.rule not in ("sequential", "fixed"):
            raise ValueError(f"rule: expected 'sequential' or 'fixed', got {self.rule!r}")
        if not (isinstance(self.target, (int, float)) and 0 < self.target < 1):
            raise ValueError(f"target: expected a relative error in (0, 1), got {self.target!r}")
        if not (isinstance(self.n_min, int) and self.n_min >= 2):
            raise ValueError(f"n_min: expected an integer >= 2, got {self.n_min!r}")
        if not (isinstance(self.n_max, int) and self.n_max >= self.n_min):
            raise ValueError(f"n_max: expected an integer >= n_min={self.n_min}, got {self.n_max!r}")
        if not (isinstance(self.baseline_factor, (int, float)) and self.baseline_factor >= 1):
            raise ValueError(f"baseline_factor: expected a number >= 1, got {self.baseline_factor!r}")

    def target_for(self, key: str) -> float:
        return self.target / math.sqrt(self.baseline_factor) if key == self.baseline else self.target

    def count(self, key: str, err2: Sequence[float]) -> int:
        return replicates_for_rel_error(err2, self.target_for(key), self.n_min, self.n_max)


def replicates_for_rel_error(err2: Sequence[float], target: float, n_min: int = 2, n_max: int = 10**6) -> int:
    """Replicates for a relative standard error ``target`` of the mean of ``err2``-like values:
    ``ceil((CV / target)^2)`` with ``CV`` estimated from ``err2`` (at least 2 values), clipped to
    ``[n_min, n_max]``."""
    x = np.asarray(err2, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"err2: need at least 2 values to estimate a coefficient of variation, got {x.size}")
    if not 0 < target < 1:
        raise ValueError(f"target: expected a relative error in (0, 1), got {target!r}")
    mean = float(x.mean())
    cv = float(x.std(ddof=1)) / mean if mean > 0 else 0.0
    return int(min(max(math.ceil((cv / target) ** 2), n_min), n_max))


EstimateFn = Callable[[Config, torch.Generator, CostMeter], Tensor]
# fields every row has (metrics may not reuse them, nor their "_se" forms)
_RESERVED = frozenset({"method", "R", "K", "n", "variance", "variance_se", "var_replicates", "bias2", "cost_s",
                       "c_upstream_s", "c_draw_s", "ecm", "re", "bound_fraction", "err2_mean",
                       "reference_variance", "cost_wall_s", "replicates", "charged", "ecm_se", "ecm_ci",
                       "cost_stages_s", "cost_check", "rel_error"})
MetricsFn = Callable[[Config, Tensor], dict[str, float]]


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:6], "little")


def reference_mean(estimate: EstimateFn, config: Config, n: int, seed: int = 0, progress: bool = True,
                   desc: str = "reference") -> tuple[Tensor, float]:
    """Mean of ``n`` independent estimates (the high-sample reference) and its own variance (trace)."""
    meter = CostMeter()
    total, total_sq = None, 0.0
    for i in progress_bar(range(n), progress, desc=desc, leave=False):
        g = estimate(config, torch.Generator().manual_seed(_seed("ref", seed, i)), meter).detach().double().flatten()
        total = g.clone() if total is None else total + g
        total_sq += float(g.pow(2).sum())
    mean = total / n
    var_single = (total_sq - n * float(mean.pow(2).sum())) / max(n - 1, 1)
    return mean, var_single / n


class _ReplicateMeter(CostMeter):
    """The meter one estimate is handed: records into its configuration's meter and also keeps this
    replicate's totals per stage (``log[name] = [seconds, units]``) for the pooled cost model."""

    def __init__(self, parent: CostMeter):
        super().__init__(device=parent.device, window=parent.window, clock=parent.clock)
        self.times, self.counts = parent.times, parent.counts  # shared: medians read the whole configuration
        self.log: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        super().add(name, seconds, count)
        entry = self.log.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += count


class _Acc:
    def __init__(self, dim: int, clock: Callable[[], float] = time.perf_counter):
        self.n = 0
        self.sum_err2 = 0.0
        self.sum_err4 = 0.0
        self.sum_g = torch.zeros(dim, dtype=torch.float64)
        self.sum_g2 = 0.0
        self.times: list[float] = []
        self.err2: list[float] = []               # per replicate (round r = replicate r)
        self.stages: list[dict[str, list[float]]] = []  # per replicate: stage -> [seconds, units]
        self.meter = CostMeter(window=10_000, clock=clock)
        self.metric_sum: dict[str, float] = {}
        self.metric_sq: dict[str, float] = {}

    def add_metrics(self, values: dict[str, float]) -> None:
        clash = sorted(set(values) & _RESERVED)
        if clash:
            raise ValueError(f"metrics: names {clash} clash with the row's own fields {sorted(_RESERVED)}; "
                             f"rename them")
        for k, v in values.items():
            v = float(v)
            self.metric_sum[k] = self.metric_sum.get(k, 0.0) + v
            self.metric_sq[k] = self.metric_sq.get(k, 0.0) + v * v

    def to_state(self) -> tuple[dict, dict[str, Tensor]]:
        state = {"n": self.n, "sum_err2": self.sum_err2, "sum_err4": self.sum_err4, "sum_g2": self.sum_g2,
                 "times": self.times, "meter": self.meter.state_dict(), "err2": self.err2, "stages": self.stages}
        if self.metric_sum:
            state["metric_sum"], state["metric_sq"] = self.metric_sum, self.metric_sq
        return state, {"sum_g": self.sum_g}

    def load(self, scalars: dict, tensors: dict[str, Tensor]) -> None:
        self.n, self.sum_err2, self.sum_err4 = scalars["n"], scalars["sum_err2"], scalars["sum_err4"]
        self.sum_g2, self.times = scalars["sum_g2"], list(scalars["times"])
        self.err2, self.stages = list(scalars.get("err2", [])), list(scalars.get("stages", []))
        self.meter.load_state_dict(scalars["meter"])
        self.sum_g = tensors["sum_g"].clone()
        self.metric_sum = dict(scalars.get("metric_sum", {}))
        self.metric_sq = dict(scalars.get("metric_sq", {}))


def measure(
    configs: Sequence[Config],
    estimate: EstimateFn,
    reference: Tensor,
    replicates: int | Callable[[Config], int] | RelativeError,
    seed: int = 0,
    state_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "replicates",
    time_budget_s: float | None = None,
    metrics: MetricsFn | None = None,
    clock: Callable[[], float] = time.perf_counter,
    reference_variance: float = 0.0,
    keep_replicates: bool = False,
) -> list[dict]:
    """Measure every configuration by interleaved replicates; returns one row (dict) per configuration.

    ``estimate(config, generator, meter)`` must return the flattened estimate (e.g. the parameter
    gradient) and may time its stages with ``meter.stage(name, count)`` / ``meter.add``; the medians of
    the stages ``"upstream"`` (per upstream sample) and ``"draw"`` (per teacher draw) are reported when
    present, and every replicate's stage totals are kept for :func:`pooled_figures`
    (``keep_replicates=True`` puts them, with the squared errors and times, in ``row["replicates"]``).
    ``replicates`` is a count, a function of the configuration, or a :class:`RelativeError`.
    ``reference_variance`` (the trace of the reference's own variance, from :func:`reference_mean`) is
    subtracted from the mean squared error: ``variance`` estimates ``Var(g) + bias^2``. ``time_budget_s``
    stops early (after a full round) and reports what was measured. ``metrics(config, estimate)``
    (optional) returns named scalars per replicate; rows get their mean (``name``) and standard error
    (``name_se``). ``clock`` times each estimate and the stages: wall-clock by default; on a CPU shared
    with other jobs, ``time.process_time`` (this process's CPU seconds; single-threaded torch) does not
    move with the other jobs' load, while wall-clock medians can differ several-fold between rounds.
    """
    keys = _check_measure_args(configs, reference_variance)
    ref = reference.detach().double().flatten()
    adaptive = replicates if isinstance(replicates, RelativeError) else None
    n_of, spec = _replicate_counts(configs, replicates, adaptive)
    accs = {c.key: _Acc(ref.numel(), clock) for c in configs}
    fingerprint = {"keys": keys, "seed": seed, **spec, "ref": hashlib.sha256(ref.numpy().tobytes()).hexdigest()}
    if metrics is not None:  # only then, so that states saved without metrics still resume
        fingerprint["metrics"] = True
    state_dir = Path(state_dir) if state_dir is not None else None
    start_round, n_of, stopped, fixed = _resume_measure(state_dir, fingerprint, configs, accs, adaptive, n_of)
    rounds = max(n_of.values())
    order_rng = random.Random(_seed("order", seed))
    orders = [order_rng.sample(range(len(configs)), len(configs)) for _ in range(rounds)]
    total = sum(n_of.values())
    done = sum(a.n for a in accs.values())
    bar = progress_bar(None, progress, total=total, initial=done, desc=desc)
    t_start = time.perf_counter()
    r = start_round
    while r < rounds:
        for idx in orders[r]:
            c = configs[idx]
            acc = accs[c.key]
            if r >= n_of[c.key] or r < acc.n:
                continue
            _replicate(c, acc, r, seed, estimate, ref, clock, metrics)
            bar.update(1)
        r += 1
        if not fixed and r >= adaptive.n_min:
            n_of, fixed = _settle_counts(adaptive, accs, keys, n_of, stopped)
            rounds = max(n_of.values())
            bar.total = sum(n_of.values())
            bar.refresh()
        if state_dir is not None:
            seq = adaptive is not None and adaptive.rule == "sequential"
            _save_state(state_dir, fingerprint, r, configs, accs, n_of if (fixed or seq) else None,
                        sorted(stopped) if seq else None)
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s and r >= 2:
            break
    bar.close()
    return _measured_rows(configs, accs, ref, reference_variance, adaptive, keep_replicates)


def _measured_rows(configs: Sequence[Config], accs: dict, ref: Tensor, reference_variance: float,
                   adaptive: RelativeError | None, keep_replicates: bool) -> list[dict]:
    """One row per configuration with at least two replicates."""
    rows = []
    for c in configs:
        a = accs[c.key]
        if a.n < 2:
            continue
        row = _row(c, a, ref, reference_variance)
        if adaptive is not None:
            row["rel_error"] = adaptive.target_for(c.key)
        if keep_replicates:
            row["replicates"] = {"err2": list(a.err2), "time_s": list(a.times), "stages": list(a.stages)}
        rows.append(row)
    return rows


def _check_measure_args(configs: Sequence[Config], reference_variance: float) -> list[str]:
    """The configurations' keys, after checking there are some, none twice, and a valid reference variance."""
    if not configs:
        raise ValueError("configs: expected at least one configuration")
    keys = [c.key for c in configs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"configs: duplicate configurations {sorted(k for k in keys if keys.count(k) > 1)}")
    if not (isinstance(reference_variance, (int, float)) and math.isfinite(reference_variance)
            and reference_variance >= 0):
        raise ValueError(f"reference_variance: expected a finite number >= 0, got {reference_variance!r}")
    return keys


def _replicate_counts(configs: Sequence[Config], replicates, adaptive: RelativeError | None) -> tuple[dict, dict]:
    """``(n_of, spec)``: replicates per configuration (with a :class:`RelativeError`, its upper bound until fixed
    after ``n_min`` rounds) and what the state's fingerprint records of them."""
    if adaptive is not None:
        return {c.key: adaptive.n_max for c in configs}, {"rel_error": asdict(adaptive)}
    n_of = {c.key: (replicates(c) if callable(replicates) else replicates) for c in configs}
    for k, n in n_of.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise ValueError(f"replicates: need an integer >= 2 per configuration, got {n!r} for {k}")
    return n_of, {"n": n_of}


def _resume_measure(state_dir: Path | None, fingerprint: dict, configs: Sequence[Config], accs: dict,
                    adaptive: RelativeError | None, n_of: dict) -> tuple[int, dict, set[str], bool]:
    """``(start_round, n_of, stopped, fixed)``, restoring ``accs`` from a saved state this measurement extends."""
    keys = [c.key for c in configs]
    start_round, fixed = 0, adaptive is None
    stopped: set[str] = set()  # sequential rule: configurations whose count is final
    if state_dir is not None and (state_dir / "measure_state.json").is_file():
        saved = read_json(state_dir / "measure_state.json", "benchmark state")  # a damaged file is named
        if _extends(saved["fingerprint"], fingerprint):
            tensors = _load_state_tensors(state_dir / "measure_state.safetensors")
            for i, c in enumerate(configs):
                accs[c.key].load(saved["accs"][c.key], {"sum_g": tensors[f"sum_g.{i}"]})
            start_round = min(a.n for a in accs.values())  # replicate r of a configuration is its round r
            if adaptive is not None and saved.get("n_of"):
                n_of = {k: int(v) for k, v in saved["n_of"].items()}
                stopped = set(saved.get("stopped", keys))
                fixed = len(stopped) == len(keys)
    return start_round, n_of, stopped, fixed


def _replicate(c: Config, acc: _Acc, r: int, seed: int, estimate: EstimateFn, ref: Tensor,
               clock: Callable[[], float], metrics: MetricsFn | None) -> None:
    """Replicate ``r`` of configuration ``c`` (its own seed), timed, checked and added to ``acc``."""
    gen = torch.Generator().manual_seed(_seed(seed, c.key, r))
    rep_meter = _ReplicateMeter(acc.meter)
    t0 = clock()
    g = estimate(c, gen, rep_meter).detach()
    acc.times.append(clock() - t0)
    g = g.double().flatten()
    if g.numel() != ref.numel():
        raise ValueError(f"estimate: returned {g.numel()} values for {c.key}, the reference has {ref.numel()}")
    if not torch.isfinite(g).all():
        raise FloatingPointError(f"estimate: non-finite values for {c.key} at replicate {r}")
    err2 = float((g - ref).pow(2).sum())
    acc.n += 1
    acc.sum_err2 += err2
    acc.sum_err4 += err2 * err2
    acc.sum_g += g
    acc.sum_g2 += float(g.pow(2).sum())
    acc.err2.append(err2)
    acc.stages.append(rep_meter.log)
    if metrics is not None:
        acc.add_metrics(metrics(c, g))


def _settle_counts(adaptive: RelativeError, accs: dict, keys: list[str], n_of: dict,
                   stopped: set[str]) -> tuple[dict, bool]:
    """After a round at or past ``n_min``: the counts a :class:`RelativeError` asks for; ``(n_of, fixed)``."""
    if adaptive.rule == "fixed":
        return {k: adaptive.count(k, accs[k].err2) for k in keys}, True
    for k in keys:  # sequential: a configuration stops at the first round where it has the count its CV asks
        if k not in stopped and accs[k].n >= adaptive.count(k, accs[k].err2):
            stopped.add(k)
            n_of[k] = accs[k].n
    return n_of, len(stopped) == len(keys)


def _extends(saved: dict, new: dict) -> bool:
    """A saved state continues into ``new`` if only the replicate counts differ and none of them shrinks
    (for :class:`RelativeError` counts: if the specification is the same)."""
    same = {k: v for k, v in saved.items() if k != "n"} == {k: v for k, v in new.items() if k != "n"}
    if "n" not in new:
        return same
    return same and "n" in saved and all(saved["n"].get(k, 0) <= n for k, n in new["n"].items())


def _load_state_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptFileError(f"benchmark state: {str(path)!r} is damaged ({e}); delete it and its "
                               f"measure_state.json to measure again") from None


def _save_state(state_dir: Path, fingerprint: dict, round_: int, configs: Sequence[Config], accs: dict,
                n_of: dict | None = None, stopped: list[str] | None = None) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    scalars, tensors = {}, {}
    for i, c in enumerate(configs):
        s, t = accs[c.key].to_state()
        scalars[c.key] = s
        tensors[f"sum_g.{i}"] = t["sum_g"].contiguous()
    with atomic_path(state_dir / "measure_state.safetensors") as tmp:  # fsynced, then renamed: never half-written
        save_file(tensors, str(tmp))
    doc = {"fingerprint": fingerprint, "round": round_, "accs": scalars, "n_of": n_of}
    if stopped is not None:
        doc["stopped"] = stopped
    atomic_write_json(state_dir / "measure_state.json", doc, indent=None)


def _row(c: Config, a: _Acc, ref: Tensor, reference_variance: float = 0.0) -> dict:
    n = a.n
    mean = a.sum_g / n
    err2_mean = a.sum_err2 / n
    var_err2 = max(a.sum_err4 / n - err2_mean**2, 0.0) * n / max(n - 1, 1)
    var_rep = (a.sum_g2 - n * float(mean.pow(2).sum())) / (n - 1)
    row = {
        "method": c.method, "R": c.R, "K": c.K, "n": n,
        "variance": err2_mean - reference_variance,
        "variance_se": math.sqrt(var_err2 / n),
        "err2_mean": err2_mean,
        "reference_variance": reference_variance,
        "var_replicates": var_rep,
        "bias2": float((mean - ref).pow(2).sum()),
        "cost_s": statistics.median(a.times),
    }
    for stage in ("upstream", "draw"):
        if a.meter.times.get(stage):
            row[f"c_{stage}_s"] = a.meter.median(stage)
    for k, total in a.metric_sum.items():
        m = total / n
        row[k] = m
        row[f"{k}_se"] = math.sqrt(max(a.metric_sq[k] / n - m * m, 0.0) / max(n - 1, 1))
    return row


def fit_components(rows: Sequence[dict], method: str) -> tuple[float, float] | None:
    """Least-squares fit of ``variance = b / R + w / (R K)`` over a method's rows (weights ``1/variance``,
    so every row counts relatively); returns ``(b, w)`` clipped at 0, or None with fewer than 2 rows."""
    rs = [r for r in rows if r["method"] == method]
    if len({(r["R"], r["K"]) for r in rs}) < 2:
        return None
    A = torch.tensor([[1 / r["R"], 1 / (r["R"] * r["K"])] for r in rs], dtype=torch.float64)
    y = torch.tensor([r["variance"] for r in rs], dtype=torch.float64)
    wts = 1.0 / y
    sol = torch.linalg.lstsq(A * wts[:, None], (y * wts)[:, None]).solution.flatten()
    b, w = float(sol[0]), float(sol[1])
    if b < 0 or w < 0:  # constrained fit on the boundary
        cands = []
        for j in (0, 1):  # one component only: ordinary 1-parameter weighted least squares
            col = A[:, j] * wts
            coef = max(float(col @ (y * wts)) / float(col @ col), 0.0)
            resid = float((col * coef - y * wts).pow(2).sum())
            cands.append((resid, (coef, 0.0) if j == 0 else (0.0, coef)))
        b, w = min(cands)[1]
    return max(b, 0.0), max(w, 0.0)


# ------------------------------------------------------------------------------- the pooled protocol
def _stage_units(row: dict) -> dict[str, float]:
    """Median units of work per estimate of each stage, over the row's replicates."""
    stages = row["replicates"]["stages"]
    names = sorted({k for log in stages for k in log})
    return {k: float(statistics.median(log.get(k, [0.0, 0])[1] for log in stages)) for k in names}


def _pooled_stage_costs(rows: Sequence[dict], picks: Sequence[np.ndarray] | None = None) -> dict:
    """The pooled stage model from the (picked) replicates of every row: for each stage and each amount of
    work done in it per estimate (``units``: e.g. ``R`` renders, ``R K`` draws), the median seconds over
    every replicate of every configuration that did that much, so configurations doing the same work get
    the same cost whatever their method; ``"other"`` is the median of each estimate's seconds outside its
    stages. No linearity is assumed (a batched teacher call of 16 draws costs less than 16 of one)."""
    per: dict[str, dict[int, list[float]]] = {}
    other: list[float] = []
    for i, r in enumerate(rows):
        rep = r["replicates"]
        idx = range(len(rep["err2"])) if picks is None else picks[i]
        for j in idx:
            log = rep["stages"][j]
            staged = 0.0
            for k, (sec, units) in log.items():
                per.setdefault(k, {}).setdefault(int(units), []).append(sec)
                staged += sec
            other.append(max(rep["time_s"][j] - staged, 0.0))
    table = {k: {u: float(np.median(v)) for u, v in d.items()} for k, d in per.items()}
    return {"stages": table, "other": float(np.median(other)) if other else 0.0}


def _model_cost(units: dict[str, float], model: dict) -> float:
    total = model["other"]
    for k, n in units.items():
        by_units = model["stages"].get(k, {})
        if n in by_units:
            total += by_units[n]
        elif by_units:  # a resample without this amount of work: scale the nearest amount measured
            near = min(by_units, key=lambda u: abs(u - n))
            total += by_units[near] * (n / near if near else 1.0)
    return total


def _marginal_cost(by_units: dict[int, float]) -> float | None:
    """Seconds per unit of a stage: the least-squares slope of median seconds against units (with an
    intercept) when more than one amount of work was measured, else seconds / units."""
    pts = sorted((u, s) for u, s in by_units.items() if u > 0)
    if not pts:
        return None
    if len(pts) == 1:
        return pts[0][1] / pts[0][0]
    u = np.array([p[0] for p in pts], dtype=np.float64)
    y = np.array([p[1] for p in pts], dtype=np.float64)
    slope = float(np.polyfit(u, y, 1)[0])
    return slope if slope > 0 else float((y / u).min())


def pooled_figures(rows: list[dict], baseline: tuple[str, int, int] = ("uniform", 2, 1), uniform: str = "uniform",
                   charges: Mapping[str, Mapping[str, float]] | None = None, bootstrap: int = 400, seed: int = 0,
                   k_max: int = 64, smoke: bool = False) -> dict:
    """The protocol's figures for rows measured with ``keep_replicates=True`` (consumes ``row["replicates"]``).

    Per row: ``cost_stages_s`` (the pooled stage model of :func:`_pooled_stage_costs`: per stage, the median
    seconds over every configuration's replicates that did this row's amount of work, plus the pooled
    median of the work outside the stages), ``charged`` (the method's
    extras from ``charges[method]``: seconds per estimate by name, e.g. an amortised pilot), ``cost_s`` (the
    two together: the cost ECM uses), ``cost_wall_s`` (the row's own median seconds per estimate, a check)
    and ``cost_check`` (their ratio), ``ecm`` (against ``baseline``) with ``ecm_se`` and ``ecm_ci`` (95%)
    from ``bootstrap`` resamples of the rounds (stage medians and variances recomputed per resample, so
    the error bars include the cost noise), ``re`` against ``uniform`` at the same ``(R, K)`` and, where a
    method's components can be fitted, ``bound_fraction``. ``smoke`` marks the rows and summary as a
    smoke run. Returns a summary (unit costs, fitted components, the accountant's K per method).
    """
    charges = _check_pooled_args(rows, bootstrap, charges)
    by = {(r["method"], r["R"], r["K"]): i for i, r in enumerate(rows)}
    if baseline not in by:
        raise ValueError(f"baseline: no row for {baseline}; rows have {sorted(by)[:10]}...")
    b_i = by[baseline]
    units = [_stage_units(r) for r in rows]
    extra = [sum(charges.get(r["method"], {}).values()) for r in rows]
    err2 = [np.asarray(r["replicates"]["err2"], dtype=np.float64) for r in rows]
    ref_var = [float(r.get("reference_variance", 0.0)) for r in rows]

    def figures(picks):
        uc = _pooled_stage_costs(rows, picks)
        cost = np.array([_model_cost(u, uc) + x for u, x in zip(units, extra, strict=True)])
        var = np.array([float(e[p].mean()) - v for e, p, v in zip(err2, picks, ref_var, strict=True)])
        return var, cost, uc

    full = [np.arange(len(e)) for e in err2]
    var, cost, uc = figures(full)
    e_hat = (var[b_i] * cost[b_i]) / (var * cost)
    boots = []
    rng = np.random.default_rng(_seed("bootstrap", seed))
    n_max = max(len(e) for e in err2)
    for _ in range(bootstrap):
        u = rng.random(n_max)
        picks = [np.floor(u[:len(e)] * len(e)).astype(np.int64) for e in err2]
        bv, bc, _ = figures(picks)
        with np.errstate(divide="ignore", invalid="ignore"):
            boots.append((bv[b_i] * bc[b_i]) / (bv * bc))
    boots_arr = np.array(boots) if boots else None
    for i, r in enumerate(rows):
        rep = r.pop("replicates")
        r["variance"] = float(var[i])
        r["cost_stages_s"] = float(cost[i] - extra[i])
        r["charged"] = dict(charges.get(r["method"], {}))
        r["cost_s"] = float(cost[i])
        r["cost_wall_s"] = float(statistics.median(rep["time_s"]))
        r["cost_check"] = r["cost_wall_s"] / r["cost_stages_s"] if r["cost_stages_s"] > 0 else None
        r["ecm"] = float(e_hat[i])
        if boots_arr is not None:
            col = boots_arr[:, i]
            col = col[np.isfinite(col)]
            r["ecm_se"] = float(col.std(ddof=1)) if col.size > 1 else None
            r["ecm_ci"] = [float(np.quantile(col, 0.025)), float(np.quantile(col, 0.975))] if col.size else None
        u_i = by.get((uniform, r["R"], r["K"]))
        # (a row whose variance minus the reference's is not positive, possible at a handful of replicates, has none)
        r["re"] = (relative_efficiency(float(var[u_i]), float(var[i])) if u_i is not None and var[i] > 0
                   and var[u_i] > 0 else None)
        if smoke:
            r["smoke"] = True
    return _pooled_summary(rows, uc, baseline, bootstrap, k_max, smoke)


def _check_pooled_args(rows: list[dict], bootstrap: int, charges) -> dict[str, dict[str, float]]:
    """:func:`pooled_figures`' input checks; returns the charges as plain dicts."""
    if not rows:
        raise ValueError("rows: expected at least one row")
    missing = [f"{r['method']}|R={r['R']}|K={r['K']}" for r in rows if "replicates" not in r]
    if missing:
        raise ValueError(f"rows: {missing[:3]} have no replicate data; measure them with keep_replicates=True")
    if not isinstance(bootstrap, int) or isinstance(bootstrap, bool) or bootstrap < 0:
        raise ValueError(f"bootstrap: expected a non-negative integer, got {bootstrap!r}")
    charges = {m: dict(v) for m, v in (charges or {}).items()}
    for m, ch in charges.items():
        for name, v in ch.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"charges: {m}/{name} must be seconds >= 0 per estimate, got {v!r}")
    return charges


def _pooled_summary(rows: list[dict], uc: dict, baseline: tuple[str, int, int], bootstrap: int, k_max: int,
                    smoke: bool) -> dict:
    """The pooled figures' summary (unit costs, fitted components, the bound and auto K per method); sets each
    row's ``bound_fraction`` where its method's components can be fitted."""
    c_up = _marginal_cost(uc["stages"].get("upstream", {}))
    c_draw = _marginal_cost(uc["stages"].get("draw", {}))
    summary: dict = {"baseline": list(baseline), "c_upstream_s": c_up, "c_draw_s": c_draw,
                     "stage_seconds_by_units": {k: {str(u): v for u, v in sorted(d.items())}
                                                for k, d in uc["stages"].items()},
                     "other_s": uc["other"],
                     "cost_ratio": (c_up / c_draw) if c_up and c_draw else None, "bootstrap": bootstrap,
                     "cost_model": "per stage, median seconds over every configuration that did the same work "
                                   "(interleaved), + the median outside the stages, + the method's charged extras; "
                                   "c_upstream_s / c_draw_s are marginal seconds per unit (slope over work sizes)",
                     "methods": {}}
    if smoke:
        summary["smoke"] = SMOKE_NOTE
    for m in dict.fromkeys(r["method"] for r in rows):
        comps = fit_components(rows, m)
        if comps is None or not c_up or not c_draw:
            continue
        b, w = comps
        bound = efficiency_bound(b, w, c_up, c_draw)
        info = {"between": b, "within": w, "bound": bound,
                "auto_k": optimal_k(b, w, c_up, c_draw, k_max=k_max) if (b > 0 or w == 0) else k_max}
        summary["methods"][m] = info
        for r in rows:
            if r["method"] == m and r["variance"] > 0:
                r["bound_fraction"] = fraction_of_bound(bound, r["variance"], r["cost_s"])
    return summary


def _config_of(row: dict) -> dict:
    return {"method": row["method"], "R": row["R"], "K": row["K"]}


def headline(rows: Sequence[dict], config: Mapping, chosen_by: str, value: str = "ecm",
             charged: Sequence[str] | None = None) -> dict:
    """The benchmark's headline: the row of ``config`` (``method``, ``R``, ``K``, fixed before measuring),
    its ``value`` with standard error, who chose the configuration, and the costs charged to it by name
    (the pooled stage model's stages and the row's own extras unless ``charged`` lists them)."""
    want = {k: config[k] for k in ("method", "R", "K")}
    hit = [r for r in rows if _config_of(r) == want]
    if not hit:
        raise ValueError(f"config: no row for {want}; rows are {[_config_of(r) for r in rows][:8]}...")
    r = hit[0]
    if charged is None:
        charged = ["stages (pooled per-stage medians)", *sorted(r.get("charged", {}))]
    out = {"config": {**want, **{k: v for k, v in config.items() if k not in want}}, "value": r[value],
           "se": r.get(f"{value}_se"), "ci95": r.get(f"{value}_ci"), "metric": value, "chosen_by": chosen_by,
           "charged": list(charged)}
    if r.get("smoke"):
        out["smoke"] = SMOKE_NOTE
    return out


def best_of_n(rows: Sequence[dict], value: str = "ecm", where: Callable[[dict], bool] | None = None) -> dict:
    """The maximum of ``value`` over the ``n`` rows (matching ``where``): an upper bound, selection-biased
    upwards by the noise of ``n`` rows, labelled with ``n``; never a headline."""
    cand = [r for r in rows if r.get(value) is not None and (where is None or where(r))]
    if not cand:
        raise ValueError(f"rows: none with a value for {value!r}")
    r = max(cand, key=lambda q: q[value])
    return {"n": len(cand), "config": _config_of(r), "value": r[value], "se": r.get(f"{value}_se"), "metric": value,
            "note": f"maximum over {len(cand)} noisy rows: an upper bound, not a measurement of one configuration"}


def settings_from_json(cls, path: str | Path, what: str = "--config", **fixed):
    """A benchmark's settings dataclass ``cls`` from a JSON object of its fields (the rest keep their defaults),
    with ``fixed`` fields (e.g. ``seed``, ``threads`` from flags) on top. Unknown keys and mistyped values are
    refused with a message naming them; JSON lists become tuples where the field is a tuple. The file lets a
    smaller configuration than the default be run, committed and named in the benchmark's command."""
    import dataclasses

    from carv._runfolder import read_json
    from carv._validate import check_field_types

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: no such file {str(p)!r}")
    d = read_json(p, what)
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a JSON object of {cls.__name__} fields, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown} of {cls.__name__}; allowed: {sorted(fields)}")
    def conv(name, v):
        ann = fields[name].type if isinstance(fields[name].type, str) else str(fields[name].type)
        if ann.startswith("tuple") and isinstance(v, list):
            return tuple(tuple(x) if isinstance(x, list) else x for x in v)
        return v
    d = {k: conv(k, v) for k, v in d.items()}
    d.update({k: v for k, v in fixed.items() if v is not None})
    cfg = cls(**d)
    check_field_types(cfg)
    return cfg


def run_record(command: str | None = None, load_start: list[float] | None = None, **extra) -> dict:
    """The JSON's run record: the exact command (default: this process's command line), the machine, the
    load average at the start (``load_start``) and now, and ``extra`` fields."""
    if command is None:
        argv = list(sys.argv)
        if argv and argv[0].endswith(("__main__.py", "/carv")):
            argv[0] = "carv"
        command = shlex.join(argv)
    return {"command": command, "machine": machine_info(loadavg_start=load_start, loadavg_end=loadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **extra}
