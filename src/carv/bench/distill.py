"""Measurement logic of the one-step distillation benchmark (``carv bench distill``).

The driver :func:`bench_distill` wires the app's pipeline (:mod:`carv.apps.distill`) into the
measurement logic, which knows nothing about generators or digits (it takes estimate functions and
training runs):

- :data:`CONFIGS`: the five estimator configurations compared at every checkpoint;
- :func:`checkpoint_variance`: the parameter-gradient variance of each configuration at one fixed
  checkpoint, by interleaved replicates against a high-sample reference (:mod:`carv.bench.harness`),
  with stage costs, ECM against R8K1 and the accountant's diagnostics (variance components of the
  generator gradient between and within generator samples, the K it recommends);
- :func:`interleave_equal_time`: equal wall-clock training; the next step always goes to the run that
  has spent the least compute so far, each run charged only its own step time (so all runs pass each
  point of the budget together, the machine's load hits them alike, and quality is compared at equal
  compute);
- :func:`summarise`, :func:`plot_variance`, :func:`write_outputs` (the quality plot is the app's
  :func:`carv.apps.distill.plot_quality`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from carv import runner
from carv._machine import loadavg, machine_info, torch_threads
from carv._progress import progress_bar
from carv._runfolder import (
    RunFolder,
    RunState,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    save_figure,
    update_json,
)
from carv.accounting import CostMeter, efficiency_bound, optimal_k
from carv.apps.distill import (
    CARV_ESTIMATOR,
    DistillConfig,
    Distiller,
    plot_quality,
    resume_run,
    teacher_from_path,
)
from carv.bench.harness import (
    SMOKE_NOTE,
    Config,
    RelativeError,
    best_of_n,
    fit_components,
    headline,
    measure,
    pooled_figures,
    reference_mean,
    run_record,
)
from carv.bench.report import markdown_table, print_table
from carv.teachers import digits_metrics as dm
from carv.teachers.digits import NUM_CLASSES, load_digits_data, load_digits_teacher
from carv.teachers.unet import UNetTeacher

__all__ = ["CONFIGS", "UPSTREAM_CONFIGS", "checkpoint_variance", "time_marks", "interleave_equal_time", "summarise",
           "plot_variance", "write_outputs", "components_from_rows", "reuse_ceiling", "BenchSettings", "bench_distill",
           "bench_from_cli",
           "bench_upstream_strata"]

# name -> estimator of the generator gradient (proposal "learned": LearnedProposal, see the app)
CONFIGS: dict[str, dict[str, Any]] = {
    "R8K1": {"R": 8, "K": 1, "proposal": "none", "stratify": "none"},
    "R8K4": {"R": 8, "K": 4, "proposal": "none", "stratify": "none"},  # a third K: the components' check
    "R8K16": {"R": 8, "K": 16, "proposal": "none", "stratify": "none"},
    "R8K16+strat": {"R": 8, "K": 16, "proposal": "none", "stratify": "per_upstream"},
    "R8K16+is+strat": {"R": 8, "K": 16, "proposal": "learned", "stratify": "per_upstream"},
    # + upstream strata: balanced labels across the 8 samples and randomised-QMC latents (carv.upstream)
    "R8K16+strat+upstream": {"R": 8, "K": 16, "proposal": "none", "stratify": "per_upstream", "upstream": "strata"},
}
# the upstream-strata benchmark adds a fourth K to the upstream-strata estimator: with the K = 16 row it bounds
# the between-sample part that no K removes (bench_upstream_strata's ``ceiling``)
UPSTREAM_CONFIGS: dict[str, dict[str, Any]] = {
    **CONFIGS,
    "R8K64+strat+upstream": {"R": 8, "K": 64, "proposal": "none", "stratify": "per_upstream", "upstream": "strata"},
}
BASELINE = "R8K1"
# variance reduction against R8K1 the issues ask for (the paper: 982 -> 30.7 at (8, 16) with strata, 32x)
TARGETS = {"R8K16": 16.0, "R8K16+strat": 30.0, "R8K16+strat+upstream": 32.0}

EstimateFn = Callable[[Config, torch.Generator, CostMeter], Tensor]


def reuse_ceiling(v1: dict, v_k: dict, v_4k: dict) -> dict[str, float]:
    """The most any number of draws can reduce the variance of a stratified estimator, from its rows at ``K``
    and ``4 K`` (same ``R``, same upstream and strata) and the ``R``-sample baseline row ``v1`` (K = 1).

    ``Var(K) = B + W(K)`` with ``B`` the between-sample part (no ``K`` touches it) and ``W(K)`` the stratified
    within part. With ``4 K`` strata refining the ``K`` ones (equal-probability strata of one proposal: the
    quantiles at ``K`` are among those at ``4 K``), ``W(4 K)`` is at most ``W(K) / 4`` (4 draws per coarse
    stratum, stratified further), so ``B >= (4 Var(4 K) - Var(K)) / 3`` and no ``K`` reduces the variance below
    ``B``: ``ceiling = Var(v1) / B`` is an upper bound on the reduction against ``v1`` (and the measured
    ``Var(4 K)`` reduction a lower one). Standard errors by the delta method from the rows' SEs (independent
    replicates)."""
    if not (v_k["R"] == v_4k["R"] and v_4k["K"] == 4 * v_k["K"]):
        raise ValueError(f"v_k, v_4k: need rows (R, K) and (R, 4 K), got ({v_k['R']}, {v_k['K']}), "
                         f"({v_4k['R']}, {v_4k['K']})")
    floor = (4 * v_4k["variance"] - v_k["variance"]) / 3
    floor_se = math.hypot(4 * v_4k["variance_se"], v_k["variance_se"]) / 3
    out = {"between_floor": floor, "between_floor_se": floor_se,
           "reduction_at_4k": v1["variance"] / v_4k["variance"], "ceiling": None, "ceiling_se": None}
    if floor > 0:
        c = v1["variance"] / floor
        out["ceiling"] = c
        out["ceiling_se"] = c * math.hypot(v1["variance_se"] / v1["variance"], floor_se / floor)
    return out


def components_from_rows(v1: dict, v16: dict) -> dict[str, float]:
    """Between / within components (traces) of the per-sample gradient from two iid rows at one ``R``:
    ``Var(R, 1) = (b + w) / R`` and ``Var(R, 16) = b / R + w / (16 R)``; with standard errors."""
    R, K = v1["R"], v16["K"]
    if v16["R"] != R or v1["K"] != 1 or K < 2:
        raise ValueError(f"v1, v16: need rows (R, 1) and (R, K>1) at one R, got ({v1['R']}, {v1['K']}), "
                         f"({v16['R']}, {K})")
    c = K / (K - 1)
    w = R * (v1["variance"] - v16["variance"]) * c
    b = R * v1["variance"] - w
    w_se = R * c * math.hypot(v1["variance_se"], v16["variance_se"])
    b_se = R * math.hypot((1 - c) * v1["variance_se"], c * v16["variance_se"])
    return {"between": b, "between_se": b_se, "within": w, "within_se": w_se,
            "between_fraction_of_R8K1": b / (b + w) if b + w > 0 else float("nan")}


def checkpoint_variance(estimate: EstimateFn, label: str, reference: Config, reference_estimates: int,
                        replicates: int | RelativeError, seed: int, state_dir: str | Path, progress: bool = True,
                        c_fake_step_s: float | None = None, k_max: int = 32,
                        charges: Mapping[str, Mapping[str, float]] | None = None,
                        configs: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[list[dict], dict]:
    """Variance of ``configs`` (default :data:`CONFIGS`) at one checkpoint; returns (rows, diagnostics).

    ``estimate(config, generator, meter)`` returns the flat parameter gradient; ``config.method`` is a
    key of ``configs`` or ``reference.method``. The reference mean is cached in ``state_dir``
    (safetensors) and the replicates resume from there. ``c_fake_step_s``: seconds of fake-score
    training per generator step, folded into the upstream cost for the accountant's training K.
    """
    state_dir = Path(state_dir)
    ref, ref_var = _cached_reference(estimate, label, reference, reference_estimates, seed, state_dir, progress)
    measured = [Config(name, spec["R"], spec["K"]) for name, spec in (configs or CONFIGS).items()]
    rows = measure(measured, estimate, ref, replicates, seed=seed + 1, state_dir=state_dir, progress=progress,
                   desc=f"replicates ({label})", reference_variance=ref_var, keep_replicates=True)
    pooled = pooled_figures(rows, baseline=(BASELINE, 8, 1), uniform="R8K16", charges=charges, seed=seed,
                            k_max=k_max)
    by = {r["method"]: r for r in rows}
    out_rows = []
    for r in rows:
        row = {"config": r.pop("method"), "checkpoint": label, **r}
        row["reduction_vs_R8K1"] = by[BASELINE]["variance"] / r["variance"]
        out_rows.append(row)
    diag: dict[str, Any] = {"checkpoint": label, "reference_variance": ref_var,
                            "reference": {"R": reference.R, "K": reference.K, "estimates": reference_estimates}}
    c_up, c_draw = pooled["c_upstream_s"], pooled["c_draw_s"]
    diag.update({"c_upstream_s": c_up, "c_draw_s": c_draw, "cost_ratio": c_up / c_draw,
                 "cost_model": pooled["cost_model"]})
    if BASELINE in by and "R8K16" in by:
        _components_diagnostics(diag, by, out_rows, c_fake_step_s, k_max)
    if c_fake_step_s is not None:  # ECM at the level of a training step (fake-score updates included)
        _add_step_ecm(out_rows, by[BASELINE], c_fake_step_s)
    return out_rows, diag


def _cached_reference(estimate: EstimateFn, label: str, reference: Config, reference_estimates: int, seed: int,
                      state_dir: Path, progress: bool) -> tuple[Tensor, float]:
    """The reference mean and its variance, cached in ``state_dir`` (safetensors) under its key."""
    state_dir.mkdir(parents=True, exist_ok=True)
    ref_path = state_dir / "reference.safetensors"
    key = f"{reference.key}|n={reference_estimates}|seed={seed}"
    if ref_path.is_file():
        t = load_file(str(ref_path))
        meta = json.loads((state_dir / "reference.json").read_text())
        if meta["key"] == key:
            return t["mean"], meta["variance"]
    ref, ref_var = reference_mean(estimate, reference, reference_estimates, seed, progress,
                                  desc=f"reference ({label})")
    with atomic_path(ref_path) as tmp:
        save_file({"mean": ref.contiguous()}, str(tmp))
    atomic_write_json(state_dir / "reference.json", {"key": key, "variance": ref_var}, indent=None)
    return ref, ref_var


def _components_diagnostics(diag: dict, by: dict, out_rows: list[dict], c_fake_step_s: float | None,
                            k_max: int) -> None:
    """The components from the R8K1 and R8K16 rows (checked against R8K4 when measured), the accountant's K (per
    estimate and per training step), the bound and the stratified rows' effective within parts, into ``diag``."""
    c_up, c_draw = diag["c_upstream_s"], diag["c_draw_s"]
    comp = components_from_rows(by[BASELINE], by["R8K16"])
    diag.update(comp)
    if "R8K4" in by:  # the third K: the two-row components predict it; the measurement checks them
        k4 = by["R8K4"]
        pred = comp["between"] / 8 + comp["within"] / 32
        pred_se = math.hypot(comp["between_se"] / 8, comp["within_se"] / 32)
        diag["k4_check"] = {"predicted": pred, "predicted_se": pred_se, "measured": k4["variance"],
                            "measured_se": k4["variance_se"],
                            "z": (k4["variance"] - pred) / math.hypot(pred_se, k4["variance_se"])}
        fit = fit_components([dict(r, method="iid") for r in out_rows if r["config"] in ("R8K1", "R8K4", "R8K16")],
                             "iid")
        if fit is not None:  # least squares over the three iid rows (b / R + w / (R K))
            diag["components_3k_fit"] = {"between": fit[0], "within": fit[1],
                                         "between_fraction_of_R8K1": fit[0] / (fit[0] + fit[1])
                                         if fit[0] + fit[1] > 0 else None}
    b, w = max(comp["between"], 0.0), max(comp["within"], 0.0)
    diag["accountant_k"] = optimal_k(b, w, c_up, c_draw, k_max=k_max)
    diag["bound"] = efficiency_bound(b, w, c_up, c_draw)
    for name in ("R8K16+strat", "R8K16+is+strat"):
        if name in by:  # effective within component of the stratified estimators (at K = 16)
            diag[f"within_eff[{name}]"] = max(128 * (by[name]["variance"] - b / 8), 0.0)
    c_up_train = c_up + (c_fake_step_s or 0.0) / 8
    diag["c_fake_step_s"] = c_fake_step_s
    diag["c_upstream_training_s"] = c_up_train
    # training K: the fake-score update of every step is per-step upstream work (amortised over R = 8);
    # k_min = 2 so that the run can keep measuring the within component from its own draws
    diag["accountant_k_training"] = optimal_k(b, w, c_up_train, c_draw, k_max=k_max, k_min=2)


def _add_step_ecm(out_rows: list[dict], base: dict, c_fake_step_s: float) -> None:
    """ECM at the level of a training step: each row's cost plus the fake-score step's, with its error bar."""
    for row in out_rows:
        row["cost_step_s"] = row["cost_s"] + c_fake_step_s
        row["ecm_step"] = (base["variance"] * (base["cost_s"] + c_fake_step_s)
                           / (row["variance"] * row["cost_step_s"]))
        # its error bar: the bootstrap's relative error of the per-estimate ECM (variances and stage costs
        # resampled by rounds); the fake-score step is one measurement added to both costs, not resampled
        if row.get("ecm_se") is not None and row["ecm"] > 0:
            rel = row["ecm_step"] / row["ecm"]
            row["ecm_step_se"] = row["ecm_se"] * rel
            row["ecm_step_ci"] = [c * rel for c in row["ecm_ci"]] if row.get("ecm_ci") else None


# ---------------------------------------------------------------------------------------------- training
class Steppable(Protocol):
    compute_s: float

    def step(self) -> Any: ...


def time_marks(budget_s: float, every_s: float) -> list[float]:
    """Evaluation marks ``every_s, 2 every_s, ..., budget_s`` (the budget and its half always included)."""
    if not (budget_s > 0 and every_s > 0):
        raise ValueError(f"budget_s, every_s: expected positive seconds, got {budget_s}, {every_s}")
    n = max(1, int(round(budget_s / every_s)))
    marks = {round(budget_s * i / n, 6) for i in range(1, n + 1)} | {budget_s / 2, budget_s}
    return sorted(marks)


def interleave_equal_time(runs: Mapping[Any, Steppable], budget_s: float, marks: Sequence[float],
                          after_step: Callable[[Any, Steppable, list[float]], None], seed: int = 0,
                          progress: bool = True) -> None:
    """Advance all runs together in *compute* time until each has spent ``budget_s`` seconds of its own
    step time (``run.compute_s``): the next step always goes to the run that has spent the least (ties
    broken in a fixed random order). Cheap-step and costly-step runs therefore pass every point of their
    compute budget at about the same wall-clock moment, so the machine's load (shared machines) hits them
    alike. After each step, ``after_step(key, run, crossed)`` gets the marks the step crossed."""
    keys = list(runs)
    done = sum(min(r.compute_s, budget_s) for r in runs.values())
    bar = progress_bar(None, progress, total=round(budget_s * len(runs)), initial=round(done),
                       desc="equal-time training (s of compute)", unit="s")

    def step(k: Any, r: Steppable) -> None:
        before = r.compute_s
        r.step()
        after = r.compute_s
        after_step(k, r, [m for m in marks if before < m <= after])
        bar.update(round(min(after, budget_s)) - round(min(before, budget_s)))

    runner.interleave(runs, "wall-clock", advance=step, done=lambda k, r: r.compute_s >= budget_s,
                      clock=lambda r: r.compute_s, order=random.Random(seed).sample(keys, len(keys)))
    bar.close()


# ---------------------------------------------------------------------------------------------- summary
def _final_by_seed(quality: Sequence[dict], method: str) -> dict[int, dict]:
    """The last evaluation of every seed of ``method``."""
    out: dict[int, dict] = {}
    for q in sorted((q for q in quality if q["method"] == method), key=lambda q: q["time_s"]):
        out[q["seed"]] = q
    return out


def _paired(quality: Sequence[dict], metric: str) -> dict:
    base = _final_by_seed(quality, "baseline")
    carv = _final_by_seed(quality, "carv")
    seeds = sorted(set(base) & set(carv))
    diffs = [carv[s][metric] - base[s][metric] for s in seeds]
    res = {"seeds": seeds, "baseline": [base[s][metric] for s in seeds], "carv": [carv[s][metric] for s in seeds],
           "baseline_steps": [base[s]["step"] for s in seeds], "carv_steps": [carv[s]["step"] for s in seeds]}
    if diffs:
        res["mean_diff_carv_minus_baseline"] = statistics.fmean(diffs)
        res["se_diff"] = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return res


def summarise(rows: Sequence[dict], diagnostics: dict, quality: Sequence[dict], training_costs: dict,
              real_fd: float | None = None) -> dict:
    """Targets met per checkpoint (with standard errors), paired carv-minus-baseline quality at the end."""
    out: dict[str, Any] = {"targets": [], "quality": {}}
    for label in dict.fromkeys(r["checkpoint"] for r in rows):
        by = {r["config"]: r for r in rows if r["checkpoint"] == label}
        b = by.get(BASELINE)
        for name, target in TARGETS.items():
            if b is None or name not in by:
                continue
            m = by[name]
            ratio = b["variance"] / m["variance"]
            rel = math.hypot(b["variance_se"] / b["variance"], m["variance_se"] / m["variance"])
            out["targets"].append({"checkpoint": label, "config": name, "target": target, "reduction": ratio,
                                   "reduction_se": ratio * rel, "met": ratio >= target,
                                   "ecm": m.get("ecm")})
    if quality:
        end = max(q["time_s"] for q in quality)
        for metric in ("fd", "accuracy"):
            out["quality"][metric] = _paired(quality, metric)
        out["quality"]["budget_s"] = end
    if real_fd is not None:
        out["real_fd_floor"] = real_fd
    out["training_costs"] = training_costs
    out["diagnostics"] = diagnostics
    return out


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_variance(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Parameter-gradient variance per configuration (log scale) at each checkpoint, with +-1 SE."""
    plt = _plt()
    labels = list(dict.fromkeys(r["checkpoint"] for r in rows))
    names = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs, ys, es = [], [], []
        for i, label in enumerate(labels):
            r = next((r for r in rows if r["checkpoint"] == label and r["config"] == name), None)
            if r is not None:
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(r["variance"])
                es.append(r["variance_se"])
        ax.bar(xs, ys, width, yerr=es, label=name, capsize=2)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("variance of the generator's parameter gradient (trace)")
    ax.set_title(title or "generator-gradient variance at fixed checkpoints")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


ROW_COLUMNS = ("checkpoint", "config", "R", "K", "n", "variance", "variance_se", "var_replicates", "reduction_vs_R8K1",
               "cost_s", "cost_wall_s", "ecm", "ecm_se", "ecm_step")


def write_outputs(result: dict, out: Path, json_path: str | Path | None, progress: bool) -> None:
    """``results.json``, ``metrics.jsonl``, ``table.md``, ``variance.png``, ``quality.png`` (+ ``json_path``)."""
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in result["rows"]))
    smoke = bool(result.get("smoke"))
    atomic_write_text(out / "table.md", markdown_table(result["rows"], ROW_COLUMNS, smoke=smoke) + "\n")
    plot_variance(result["rows"], out / "variance.png")
    if result["quality"]:
        plot_quality(result["quality"], out / "quality.png", real_fd=result.get("real_fd_floor"),
                     title=f"DMD on digits at equal compute: baseline R8K1 uniform vs carv R8K{result['carv_K']} "
                           f"(learned IS + stratified)")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, result)
    if progress:
        print_table(result["rows"], ROW_COLUMNS, title="carv bench distill: generator-gradient variance", smoke=smoke)
        h, b = result.get("headline"), result.get("best_of_n")
        note = f" ({SMOKE_NOTE})" if smoke else ""
        if h and b:
            print(f"headline (a priori): {h['config']} {h['metric']} {h['value']:.2f}x +- {h['se'] or 0:.2f}{note}; "
                  f"best of {b['n']} rows {b['value']:.2f}x +- {b.get('se') or 0:.2f} (upper bound){note}")
        q = result["summary"]["quality"]
        for metric in ("fd", "accuracy"):
            if metric in q and "mean_diff_carv_minus_baseline" in q[metric]:
                print(f"final {metric}: baseline {q[metric]['baseline']}  carv {q[metric]['carv']}  "
                      f"carv - baseline = {q[metric]['mean_diff_carv_minus_baseline']:+.3f} "
                      f"(SE {q[metric]['se_diff']:.3f}, paired by seed){note}")
        print(f"run folder: {out}")


# ---------------------------------------------------------------------------------------------- benchmark
@dataclass
class BenchSettings:
    """Sizes of :func:`bench_distill` (``quick`` shrinks them to fit about 5 minutes on 2 idle cores)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budget_s: float = 360.0          # step compute per training run (equal wall-clock)
    eval_every_s: float = 30.0
    eval_per_class: int = 50
    replicates: int = 24             # minimum per configuration and checkpoint; then counts for rel_error
    rel_error: float = 0.1           # target relative error of each row's variance ...
    baseline_rel_error: float = 0.05  # ... and of the heavy-tailed K = 1 baseline's
    max_replicates: int = 1000
    amortise_steps: int = 1000       # the proposal pilot is charged per estimate over this many steps
    reference_estimates: int = 24    # of the reference configuration (R = reference_R, K = 16, +is+strat)
    reference_R: int = 64
    pilot_estimates: int = 16        # to learn the proposal at a checkpoint whose run has not learned one
    carv_K: int | None = CARV_ESTIMATOR["K"]  # K of the carv training runs; None: the accountant's choice
    carv_proposal: str = CARV_ESTIMATOR["proposal"]
    carv_stratify: str = CARV_ESTIMATOR["stratify"]
    k_max: int = 32
    train: bool = True               # False: the start checkpoint's variance rows only (no training, no quality)
    fake_warmup: int | None = None   # the app's fake-score warm-up updates (None: DistillConfig's, 100)

    def validate(self) -> None:
        for name in ("replicates", "max_replicates", "reference_estimates", "reference_R", "pilot_estimates",
                     "amortise_steps", "k_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("rel_error", "baseline_rel_error"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ValueError(f"{name}: expected a relative error in (0, 1), got {v!r}")
        if not self.seeds:
            raise ValueError("seeds: need at least one seed")
        if self.fake_warmup is not None and (isinstance(self.fake_warmup, bool) or not isinstance(self.fake_warmup, int)
                                             or self.fake_warmup < 0):
            raise ValueError(f"fake_warmup: expected a non-negative integer or None, got {self.fake_warmup!r}")

    @classmethod
    def quick(cls) -> BenchSettings:
        """The smoke run (``--quick``): about 2.5 CPU-minutes at one thread. Two seeds (the paired quality
        difference has a standard error), 12 s of training per run after a warm-up of 20 fake-score updates
        (the default 100, charged to the run, can take the whole 25 s budget on a loaded machine), 4-12
        replicates per row."""
        return cls(seeds=[0, 1], budget_s=12.0, eval_every_s=6.0, eval_per_class=20, replicates=4,
                   rel_error=0.3, baseline_rel_error=0.15, max_replicates=12, reference_estimates=3, reference_R=16,
                   pilot_estimates=2, fake_warmup=20)

    def replicate_spec(self) -> RelativeError:
        return RelativeError(target=self.rel_error, n_min=max(self.replicates, 2),
                             n_max=max(self.max_replicates, self.replicates, 2),
                             baseline=Config(BASELINE, 8, 1).key,
                             baseline_factor=(self.rel_error / self.baseline_rel_error) ** 2)


def _checkpoint_rows(d: Distiller, label: str, s: BenchSettings, base: DistillConfig, out: Path, seed: int,
                     progress: bool, configs: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> tuple[list[dict], dict]:
    """Parameter-gradient variance of ``configs`` (default :data:`CONFIGS`) at ``d``'s current weights. A checkpoint
    saved after a generator update is first caught up (:meth:`Distiller.fake_catch_up`): the gradient of the run's
    next step is taken against a fake score that has seen the current generator, not one update behind (the start
    checkpoint's fake score was warmed up on its generator)."""
    configs = configs or CONFIGS
    if d.step_count > 0:
        d.fake_catch_up()
    pilot_s = 0.0
    if not d.learned.ready:  # pilot: fill the learned proposal from uniform draws at this checkpoint
        pilot = d.make_objective(d.make_sampler("none", "per_upstream"), 16)
        g = torch.Generator().manual_seed(seed + 7)
        t0 = time.process_time()
        for _ in range(s.pilot_estimates):
            z, c = d.latents(base.R, g)
            with torch.no_grad():
                o = pilot(d.generator(z, c), c, g)
            d.learned.update(o.draws.t, o.estimate.sq_norms)
        pilot_s = time.process_time() - t0
    charges = {name: {"proposal pilot (amortised)": pilot_s / s.amortise_steps}
               for name, spec in configs.items() if spec["proposal"] == "learned"}
    objectives = {name: d.make_objective(d.make_sampler(spec["proposal"], spec["stratify"]), spec["K"])
                  for name, spec in configs.items()}
    ref_obj = d.make_objective(d.make_sampler("learned", "per_upstream"), 16)
    objectives["reference"] = ref_obj

    def estimate(c: Config, gen: torch.Generator, meter: CostMeter) -> Tensor:
        upstream = configs.get(c.method, {}).get("upstream", "iid")  # the reference: iid
        return d.parameter_gradient(objectives[c.method], c.R, gen, meter, upstream)

    c_fake = d.time_fake_step(torch.Generator().manual_seed(seed + 8))
    return checkpoint_variance(estimate, label, Config("reference", s.reference_R, 16), s.reference_estimates,
                               s.replicate_spec(), seed, out / "state" / f"variance_{label}", progress,
                               c_fake_step_s=c_fake, k_max=s.k_max, charges=charges, configs=configs)


def bench_distill(out_dir: str | Path = "runs/bench_distill", quick: bool = False, json_path: str | Path | None = None,
                  progress: bool = True, settings: BenchSettings | None = None, base: DistillConfig | None = None,
                  teacher: UNetTeacher | None = None, config_path: str | Path | None = None) -> dict:
    """The side-by-side distillation benchmark (``carv bench distill``); resumes from ``out_dir``.

    1. At the start checkpoint (the teacher-initialised generator and fake score): parameter-gradient
       variance of R8K1 / R8K16 / R8K16+strat / R8K16+is+strat by interleaved replicates against a
       high-sample reference, stage costs, ECM against R8K1, and the accountant's diagnostics.
    2. Equal wall-clock training, interleaved step by step: baseline (R8K1, uniform) and carv (R8K16 with
       the learned proposal and per-sample stratification, i.e. R8K16+is+strat; ``carv_K=None`` takes the
       accountant's K from step 1 instead), for every seed; each run is charged only its own step time
       (fake-score updates included); FD and accuracy at fixed compute marks. The baseline run of the
       first seed saves its middle and end checkpoints.
    3. The same variance measurement at the middle and end checkpoints.

    ``settings.train=False`` stops after step 1. ``config_path`` (the ``--config`` file the settings came
    from) is named in the run record's command.
    """
    s = settings or (BenchSettings.quick() if quick else BenchSettings())
    s.validate()
    base = base or DistillConfig()
    base = dataclasses.replace(base, eval_per_class=s.eval_per_class,
                               **({"fake_warmup": s.fake_warmup} if s.fake_warmup is not None else {}))
    base.validate()
    with torch_threads(base.threads), RunFolder(out_dir, "carv bench distill", {"quick": quick}):
        return _bench_distill(out_dir, quick, json_path, progress, s, base, teacher, config_path)


def _bench_distill(out_dir: str | Path, quick: bool, json_path: str | Path | None, progress: bool,
                   s: BenchSettings, base: DistillConfig, teacher: UNetTeacher | None,
                   config_path: str | Path | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = teacher if teacher is not None else load_digits_teacher()
    load_start = loadavg()
    t_start = time.perf_counter()
    seed0 = s.seeds[0]

    # 1. start checkpoint
    d0 = Distiller(dataclasses.replace(base, seed=seed0), teacher)
    d0.warmup()  # the start checkpoint: fake score warmed up on the initial generator, no generator update yet
    ck_dir = out / "train" / f"baseline_seed{seed0}" / "checkpoints"
    if not (ck_dir / "start.safetensors").is_file():
        d0.save_checkpoint(ck_dir / "start.safetensors")
    rows, diag = {}, {}
    rows["start"], diag["start"] = _checkpoint_rows(d0, "start", s, base, out, seed0, progress)
    k_carv = s.carv_K if s.carv_K is not None else diag["start"]["accountant_k_training"]
    if s.train:
        quality, train_costs = _train_and_measure(out, s, base, teacher, k_carv, seed0, ck_dir, rows, diag, progress)
    else:  # the start checkpoint only: no training runs, no quality comparison
        quality, train_costs = [], {}
    labels = [k for k in ("start", "middle", "end") if k in rows]

    all_rows = [r for label in labels for r in rows[label]]
    real_fd = _real_fd_floor(s.eval_per_class) if quality else None
    summary = summarise(all_rows, diag, quality, train_costs, real_fd)
    head, best = _headline_and_best(all_rows, k_carv)
    cmd = "carv bench distill" + (" --quick" if quick else "")
    if base.threads:
        cmd += f" --threads {base.threads}"
    if config_path is not None:
        cmd += f" --config {config_path}"
    result = {
        **run_record(cmd, load_start),
        "smoke": SMOKE_NOTE if quick else None,
        "headline": head,
        "best_of_n": best,
        "wall_s": time.perf_counter() - t_start,
        "settings": asdict(s),
        "base_config": asdict(base),
        "carv_K": int(k_carv),
        "checkpoints": labels,
        "rows": all_rows,
        "diagnostics": diag,
        "quality": quality,
        "training_costs": train_costs,
        "real_fd_floor": real_fd,
        "summary": summary,
    }
    write_outputs(result, out, json_path, progress)
    return result


def _headline_and_best(all_rows: list[dict], k_carv: int) -> tuple[dict, dict]:
    """The a-priori headline (the training runs' estimator at the start checkpoint) and the best of N rows."""
    as_method = [dict(r, method=r["config"]) for r in all_rows]
    metric = "ecm_step" if all("ecm_step" in r for r in as_method) else "ecm"
    carv_cfg = f"R8K{int(k_carv)}+is+strat" if f"R8K{int(k_carv)}+is+strat" in CONFIGS else "R8K16+is+strat"
    start_rows = [r for r in as_method if r["checkpoint"] == "start"]
    head = headline(start_rows, {"method": carv_cfg, "R": 8, "K": CONFIGS[carv_cfg]["K"], "checkpoint": "start"},
                    value=metric, chosen_by="a priori: the estimator carv's training runs use (learned proposal + "
                                            "strata at K = 16, BenchSettings.carv_K), at the start checkpoint",
                    charged=["stages (pooled per-stage medians)", "fake-score update per step (every row)",
                             *sorted(next(r for r in start_rows if r["method"] == carv_cfg).get("charged", {}))])
    return head, best_of_n(as_method, value=metric, where=lambda r: r["method"] != BASELINE)


def _train_and_measure(out: Path, s: BenchSettings, base: DistillConfig, teacher: UNetTeacher, k_carv: int,
                       seed0: int, ck_dir: Path, rows: dict, diag: dict, progress: bool) -> tuple[list, dict]:
    """Steps 2 and 3 of :func:`bench_distill`: equal wall-clock training of baseline and carv for every seed,
    then the variance rows at the middle and end checkpoints (into ``rows`` / ``diag``)."""

    # 2. equal wall-clock training
    methods = {"baseline": dataclasses.replace(base, R=8, K=1, proposal="none", stratify="none"),
               "carv": dataclasses.replace(base, R=8, K=int(k_carv), proposal=s.carv_proposal,
                                           stratify=s.carv_stratify)}
    runs: dict[tuple[str, int], Distiller] = {}
    logs: dict[tuple[str, int], RunState] = {}  # each run's checksummed checkpoints and metrics
    for seed in s.seeds:
        for m, mcfg in methods.items():
            rc = dataclasses.replace(mcfg, seed=seed, steps=10**9, time_budget_s=s.budget_s)
            dist = Distiller(rc, teacher)
            runs[(m, seed)], logs[(m, seed)] = dist, resume_run(out / "train" / f"{m}_seed{seed}", dist)
    marks = time_marks(s.budget_s, s.eval_every_s)

    def evaluate(key: tuple[str, int], dist: Distiller) -> None:
        q, x = dist.evaluate()
        logs[key].append({"step": dist.step_count, "compute_s": round(dist.compute_s, 3), **q, **dist.last,
                         **{f"c_{k}_s": v for k, v in dist.meter.summary().items()},
                         "loadavg_1min": round(os.getloadavg()[0], 2)})

    def after_step(key: tuple[str, int], dist: Distiller, crossed: list[float]) -> None:
        if not crossed:
            return
        evaluate(key, dist)
        if key == ("baseline", seed0):
            for mark, label in ((s.budget_s / 2, "middle"), (s.budget_s, "end")):
                if mark in crossed:
                    dist.save_checkpoint(ck_dir / f"{label}.safetensors")
        dist.save_state(logs[key])

    for key, dist in runs.items():
        if dist.step_count == 0 and not logs[key].rows:
            evaluate(key, dist)
    interleave_equal_time(runs, s.budget_s, marks, after_step, seed=seed0, progress=progress)
    for key, dist in runs.items():
        dist.save_grid(logs[key].path / "final.png",
                       f"{key[0]} (R={dist.cfg.R}, K={dist.cfg.K}), seed {key[1]}, {s.budget_s:.0f} s of compute")
    quality = []
    for (m, seed), run in logs.items():
        for r in run.rows:
            quality.append({"method": m, "seed": seed, "step": r["step"], "time_s": r["compute_s"], "fd": r["fd"],
                            "accuracy": r["accuracy"], "K": runs[(m, seed)].cfg.K})
    train_costs = {f"{m}_seed{seed}": {**dist.meter.summary(), "steps": dist.step_count}
                   for (m, seed), dist in runs.items()}

    # 3. middle and end checkpoints; the middle one only when it differs from the end (the step that crossed the
    # middle mark can cross the end too, e.g. when the fake-score warm-up, charged to the run, takes the budget)
    loaded = {}
    for label in ("middle", "end"):
        loaded[label] = Distiller(dataclasses.replace(base, seed=seed0), teacher)
        loaded[label].load_checkpoint(ck_dir / f"{label}.safetensors")
    same = loaded["middle"].step_count == loaded["end"].step_count
    for label in ("end",) if same else ("middle", "end"):
        rows[label], diag[label] = _checkpoint_rows(loaded[label], label, s, base, out, seed0, progress)
    if same:
        diag["end"]["middle_is_end"] = (f"the middle checkpoint is the end one (baseline step "
                                        f"{loaded['end'].step_count}): measured once, as 'end'")
    return quality, train_costs


def bench_upstream_strata(out_dir: str | Path = "runs/bench-distill-upstream", json_path: str | Path | None = None,
                          settings: BenchSettings | None = None, base: DistillConfig | None = None,
                          teacher: UNetTeacher | None = None, progress: bool = True,
                          command: str = "carv bench distill --upstream-only") -> dict:
    """Step 1 of :func:`bench_distill` alone (the start checkpoint, every configuration of
    :data:`UPSTREAM_CONFIGS`, i.e. :data:`CONFIGS` and the upstream-strata estimator at ``K = 64``, side by side
    in one run), plus :func:`reuse_ceiling` (the most any ``K`` could give with these strata) and the
    between-sample component with and without upstream strata: at
    ``K = 16`` with per-sample timestep strata, ``Var = b / 8 + w_eff / 128`` and the two strata rows share
    ``w_eff`` (the same timestep sampler and draws per sample), so ``b`` with upstream strata is
    ``b_iid - 8 (Var[R8K16+strat] - Var[R8K16+strat+upstream])``. With ``json_path`` the result is stored
    under the key ``upstream_strata`` of that JSON file (other keys are kept)."""
    s = settings or BenchSettings()
    base = base or DistillConfig()
    base.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = teacher if teacher is not None else load_digits_teacher()
    t0 = time.perf_counter()
    load_start = loadavg()
    with torch_threads(base.threads):
        machine = machine_info(loadavg_start=load_start)  # inside: the thread count the run uses
        d0 = Distiller(dataclasses.replace(base, seed=s.seeds[0]), teacher)
        d0.warmup()
        rows, diag = _checkpoint_rows(d0, "start", s, base, out, s.seeds[0], progress, UPSTREAM_CONFIGS)
    by = {r["config"]: r for r in rows}
    a, b = by["R8K16+strat"], by["R8K16+strat+upstream"]
    diag["reuse_ceiling_with_upstream_strata"] = reuse_ceiling(by[BASELINE], b, by["R8K64+strat+upstream"])
    if "between" in diag:
        diag["between_with_upstream_strata"] = diag["between"] - 8 * (a["variance"] - b["variance"])
        diag["between_with_upstream_strata_se"] = math.hypot(diag["between_se"],
                                                             8 * math.hypot(a["variance_se"], b["variance_se"]))
    result = {"command": command, "machine": {**machine, "loadavg_end": loadavg()},
              "date": time.strftime("%Y-%m-%d"), "wall_s": time.perf_counter() - t0,
              "settings": {"replicates": s.replicates, "reference_estimates": s.reference_estimates,
                           "reference_R": s.reference_R}, "rows": rows, "diagnostics": diag}
    if json_path is not None:
        update_json(json_path, {"upstream_strata": result}, "benchmark JSON")
    if progress:
        print_table(rows, ROW_COLUMNS, title="carv bench distill --upstream-only: generator-gradient variance")
        c = diag["reuse_ceiling_with_upstream_strata"]
        print(f"strata + upstream strata: {c['reduction_at_4k']:.1f}x at K = 64; no K goes beyond "
              + (f"{c['ceiling']:.1f}x (SE {c['ceiling_se']:.1f}): the between-sample floor "
                 f"{c['between_floor']:.3g} (SE {c['between_floor_se']:.2g})" if c["ceiling"] is not None else
                 "what the rows resolve (the between-sample floor is not above 0)"))
        if "between_with_upstream_strata" in diag:
            print(f"between-sample component: iid {diag['between']:.4g} (SE {diag['between_se']:.2g}), with "
                  f"upstream strata {diag['between_with_upstream_strata']:.4g} "
                  f"(SE {diag['between_with_upstream_strata_se']:.2g})")
    return result


def bench_from_cli(out: str | Path, quick: bool, json_path: str | Path | None, teacher: str | Path | None,
                   threads: int, config: str | Path | None = None) -> dict:
    """``carv bench distill`` (``config``: a JSON file of :class:`BenchSettings` fields)."""
    from carv.bench.harness import settings_from_json

    settings = None
    if config is not None:
        if quick:
            raise ValueError("--config, --quick: give one of them (--quick is its own small configuration)")
        settings = settings_from_json(BenchSettings, config)
        settings.validate()
    return bench_distill(out, quick=quick, json_path=json_path, base=DistillConfig(threads=threads),
                         teacher=teacher_from_path(teacher), settings=settings, config_path=config)


def _real_fd_floor(per_class: int) -> float:
    """FD of ``per_class`` real train images per class against the test split: the floor at this sample size."""
    x, y = load_digits_data("train")
    real = torch.cat([x[y == c][:per_class] for c in range(NUM_CLASSES)])
    return dm.digits_fd(real)
