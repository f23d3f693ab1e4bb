"""Side-by-side benchmark of carv on text-to-3D score distillation (``carv bench text-to-3d``).

What is measured (every ratio side by side, in one run, with the harness of :mod:`carv.bench.harness`):

1. **Gradient variance in parameter space** (the voxel grid's density + colour gradient, the vector
   Adam consumes) at three snapshots of a baseline run (early / middle / late), by interleaved
   replicates against a high-sample reference, for uniform / importance / stratified / importance +
   stratified timesteps at every ``(R, K)`` of ``Rs x Ks``, with the stage costs measured in the same
   run: ECM against uniform ``(R=2, K=1)``, RE at matched ``(R, K)``, the fraction of the efficiency
   bound, ``c_up / c_draw``, and the ``K`` the online accountant picks (from the parameter-space variance
   components of :class:`carv.accounting.ComponentProbe` and the measured costs of a short pilot, exactly
   as the app does; the ``K`` the free render-space components would give is reported beside it), checked
   against the best fixed ``K`` in hindsight by measuring the accountant's ``K`` like any other row.
2. **Peers' timestep samplers** at their own defaults (one draw per render, ``K = 1``):
   threestudio / DMD2 (uniform ``t`` over the objective's own range: on the same objective threestudio's
   sampler *is* plain uniform sampling, the baseline's estimator; its default range ``[0.02, 0.98] T`` would
   estimate another expectation, whose "ECM" against carv's reference would carry a bias), VDM's
   low-discrepancy "antithetic time" (``stratify="lattice"`` over the batch) and
   improved-diffusion's loss-second-moment resampler (:class:`carv.SecondMomentResampler`, warmed up
   on pilot draws; its per-timestep table would need 10 losses at each of 1000 timesteps, so it runs
   on 50 bins of 20 timesteps and is fed the per-draw mean squared residual as its "loss").
3. **Quality versus compute**: PSNR and mask IoU on 16 held-out views, baseline and carv trained at
   equal training wall-clock (steps interleaved in one process), several prompts x seeds; ECM at equal
   quality = time for the baseline to reach its final quality / time for carv to reach it.
4. **Plots**: variance vs compute labelled ``(R, K)``; ECM vs ``K``; predicted vs measured ECM as the
   render-to-teacher cost ratio varies (renders of different size / samples per ray; the prediction
   uses the variance components fitted at the default setting and each setting's measured costs).

Costs: on these shared 2-core machines the wall-clock of one estimate moved three-fold within a run as
other jobs started and stopped (and configurations measured with more replicates ran partly in
different periods), so by default every cost and training budget is this process's CPU time
(``time.process_time``) with one torch thread, which is the compute actually spent and does not move
with the other jobs' load (``BenchSettings.clock = "wall"`` measures wall-clock instead, for a dedicated
machine or a GPU). The quality comparison interleaves the two runs' steps as well.

The pipeline (renderer, teacher, trainer) is the app's (:mod:`carv.apps.text_to_3d`, wired in by
:class:`TextTo3DPipeline`); :func:`run_bench` takes any :class:`Pipeline`, so tests can drive it with a
small one. Everything is resumable:
each stage writes its results into the run folder and a rerun skips what is done (the replicate
loops resume mid-way through :func:`~carv.bench.harness.measure`'s state).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from carv import runner
from carv._machine import loadavg, set_threads
from carv._progress import progress_bar
from carv._runfolder import RunFolder, atomic_path, atomic_write_json, atomic_write_text, save_figure
from carv._validate import check_seed
from carv.accounting import AutoK, CostMeter, work_normalised_variance
from carv.apps.text_to_3d import SceneProblem, TextTo3DConfig, Trainer, grid_grad, problem_for
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
from carv.bench.quality import equal_quality_ecm
from carv.bench.report import markdown_table, plot_ecm_vs_k, plot_variance_vs_cost, print_table
from carv.render import VoxelGrid, get_scene
from carv.teachers.scenes import load_scenes_teacher
from carv.teachers.unet import UNetTeacher
from carv.timesteps import LearnedProposal, SecondMomentResampler, TimestepSampler

__all__ = [
    "equal_step_compute", "equal_step_budget_sweep", "geomean", "log_spread",
    "BenchSettings", "Pipeline", "run_bench", "CARV_METHODS", "PEER_METHODS", "TextTo3DPipeline",
           "bench_text_to_3d"]

# method -> (proposal, stratify); "importance" is the app's default proposal (see BenchSettings.proposal)
CARV_METHODS = ("uniform", "importance", "stratified", "importance+stratified")
PEER_METHODS = ("threestudio", "vdm", "improved-diffusion")
CHECKPOINTS = ("early", "middle", "late")


# --------------------------------------------------------------------------- what the app provides
class Problem(Protocol):
    T: int
    w: Tensor

    def sampler(self, proposal: str, stratify: str, floor: float, learned: LearnedProposal | None = None,
                t_min: int = 0, t_max: int | None = None) -> TimestepSampler: ...

    def sds(self, sampler: TimestepSampler, K: int) -> Any: ...

    def gradient(self, grid: Any, sds: Any, R: int, generator: torch.Generator, render_size: int | None = None,
                 n_samples: int | None = None, probe: bool = False,
                 meter: CostMeter | None = None) -> tuple[Any, dict[str, float], Any]: ...


class Pipeline(Protocol):
    """The text-to-3D pipeline as the benchmark sees it (implemented by :mod:`carv.apps.text_to_3d`)."""

    def problem(self, prompt: str) -> Problem: ...

    def trainer(self, prompt: str, method: str, seed: int, out_dir: Path, steps: int, budget_s: float | None,
                eval_every_s: float) -> Any: ...

    def grid_tensors(self, trainer: Any) -> dict[str, Tensor]: ...

    def grid_from_tensors(self, tensors: dict[str, Tensor]) -> Any: ...

    def grid_gradient(self, grid: Any) -> Tensor: ...

    def zero_grad(self, grid: Any) -> None: ...


@dataclass
class BenchSettings:
    prompt: str = "a red mushroom"
    checkpoint_steps: tuple[int, int, int] = (30, 150, 600)  # early / middle / late steps of the baseline run
    Rs: tuple[int, ...] = (1, 2, 4)
    Ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    min_replicates: int = 12  # variance rows: counts fixed after this many rounds for a relative error rel_error
    rel_error: float = 0.1  # of each row's variance; the baseline uniform (R=2, K=1) at rel_error / sqrt(10)
    baseline_boost: int = 3  # the cost-ratio sweep's baseline gets this many times cost_replicates
    max_replicates: int = 400
    amortise_steps: int = 300  # one-off pilots are charged per estimate over this many steps (the app's default run)
    reference_R: int = 8
    reference_K: int = 16
    reference_estimates: int = 16
    proposal: str = "learned"  # the proposal behind "importance": "learned" (app default) or "weight"
    floor: float = 0.1
    pilot_steps: int = 10  # accountant pilot (the app's estimator at K = k_init, R = 2)
    warmup_R: int = 2
    # warm-up draws per render for the learned proposal and the peer resampler: twice the resampler's bins, so
    # that stratified draws over a support whose width the bins do not divide (the objective's t range) still
    # give every bin its history (each bin gets 2 +- 1 draws per render)
    warmup_K: int = 100
    warmup_steps: int = 5
    resampler_bins: int = 50
    resampler_history: int = 10
    resampler_floor: float = 0.001  # improved-diffusion's uniform_prob
    k_max: int = 16
    # quality at equal wall-clock
    quality_prompts: tuple[str, ...] = ("a red mushroom", "a snowman", "a blue table")
    quality_seeds: tuple[int, ...] = (0, 1, 2)
    quality_budget_s: float = 45.0  # seconds of training per method (CPU seconds with clock="process")
    # predicted vs measured ECM as the cost ratio varies: (render_size, n_samples)
    cost_settings: tuple[tuple[int, int], ...] = ((32, 24), (64, 48), (96, 96))
    cost_replicates: int = 24
    extra_proposal_rows: bool = True  # also measure the other proposal (weight <-> learned) at R = 2, for the record
    # "process": costs and training budgets in this process's CPU seconds (robust on a shared CPU; run with
    # threads=1 so that CPU seconds are compute seconds); "wall": wall-clock (use on a dedicated machine / GPU)
    clock: str = "process"
    seed: int = 0
    threads: int | None = None
    smoke: bool = False  # a --quick run: every ratio it prints says "smoke run, not a measurement"
    # which snapshots to measure (the headline's "middle" must be one); an empty cost_settings skips the cost-ratio
    # sweep and an empty quality_prompts the quality pairs (a smaller configuration than the default)
    snapshots: tuple[str, ...] = CHECKPOINTS

    @classmethod
    def quick(cls, **kw) -> BenchSettings:
        """The smoke run (``--quick``, about 1.5 CPU-minutes at one thread): the headline's middle snapshot only
        (baseline step 20), ``R = 2``, ``K`` in 1, 4 plus the accountant's (``k_max`` 8), the peers at ``K = 1`` and
        at the accountant's ``K``, 3-8 replicates per row, a 4-estimate reference, a learned proposal and peer
        resampler on 25 bins, one quality pair of 8 CPU-seconds per method and no cost-ratio sweep."""
        base = dict(snapshots=("middle",), checkpoint_steps=(5, 20, 40), Rs=(2,), Ks=(1, 4), min_replicates=3,
                    rel_error=0.4, max_replicates=8, reference_R=4, reference_K=8, reference_estimates=4,
                    pilot_steps=4, warmup_steps=5, warmup_K=50, resampler_bins=25, k_max=8,
                    quality_prompts=("a red mushroom",), quality_seeds=(0,), quality_budget_s=8.0, cost_settings=(),
                    cost_replicates=4, extra_proposal_rows=False, baseline_boost=2, smoke=True)
        base.update(kw)
        return cls(**base)

    def validate(self) -> None:
        check_seed(self.seed)
        if len(self.checkpoint_steps) != 3 or list(self.checkpoint_steps) != sorted(set(self.checkpoint_steps)) or \
                self.checkpoint_steps[0] < 0:
            raise ValueError(f"checkpoint_steps: expected three increasing non-negative step counts, "
                             f"got {self.checkpoint_steps!r}")
        if 2 not in self.Rs or 1 not in self.Ks:
            raise ValueError(f"Rs, Ks: the baseline uniform (R=2, K=1) must be measured; "
                             f"got Rs={self.Rs}, Ks={self.Ks}")
        if not 0 < self.rel_error < 1:
            raise ValueError(f"rel_error: expected a relative error in (0, 1), got {self.rel_error!r}")
        if not isinstance(self.amortise_steps, int) or self.amortise_steps < 1:
            raise ValueError(f"amortise_steps: expected a positive integer, got {self.amortise_steps!r}")
        for name in ("min_replicates", "reference_estimates", "cost_replicates", "max_replicates"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"{name}: expected an integer >= 2, got {v!r}")
        if self.proposal not in ("learned", "weight"):
            raise ValueError(f"proposal: expected 'learned' or 'weight', got {self.proposal!r}")
        if self.warmup_K % self.resampler_bins and self.resampler_bins % self.warmup_K:
            raise ValueError(f"warmup_K, resampler_bins: one must divide the other so that stratified warm-up "
                             f"draws fill every bin evenly, got {self.warmup_K}, {self.resampler_bins}")
        if self.warmup_steps * self.warmup_R * self.warmup_K < self.resampler_bins * self.resampler_history:
            raise ValueError(f"warmup_steps: {self.warmup_steps} warm-up steps of {self.warmup_R} x {self.warmup_K} "
                             f"draws give fewer than resampler_history={self.resampler_history} losses in each of "
                             f"{self.resampler_bins} bins")
        if self.clock not in ("process", "wall"):
            raise ValueError(f"clock: expected 'process' (CPU seconds) or 'wall', got {self.clock!r}")
        if self.quality_prompts and not self.quality_seeds:
            raise ValueError("quality_seeds: need at least one seed when quality_prompts are given")
        if not self.snapshots or any(n not in CHECKPOINTS for n in self.snapshots) or "middle" not in self.snapshots:
            raise ValueError(f"snapshots: expected a subset of {list(CHECKPOINTS)} with 'middle' (the headline's), "
                             f"got {self.snapshots!r}")


# --------------------------------------------------------------------------- samplers of every method
class Samplers:
    """The timestep samplers (and learned tables) of every method at one snapshot."""

    def __init__(self, problem: Problem, settings: BenchSettings, learned: LearnedProposal,
                 resampler: SecondMomentResampler):
        s, T = settings, problem.T
        self.proposal_of = {"importance": settings.proposal, "importance+stratified": settings.proposal,
                            "uniform": "none", "stratified": "none"}
        other = "weight" if settings.proposal == "learned" else "learned"
        strat = {"uniform": "none", "importance": "none", "stratified": "per_upstream",
                 "importance+stratified": "per_upstream"}
        self.samplers: dict[str, TimestepSampler] = {}
        for m in CARV_METHODS:
            self.samplers[m] = problem.sampler(self.proposal_of[m], strat[m], s.floor, learned)
        if s.extra_proposal_rows:
            self.samplers[f"{other}-importance"] = problem.sampler(other, "none", s.floor, learned)
            self.samplers[f"{other}-importance+stratified"] = problem.sampler(other, "per_upstream", s.floor, learned)
        # peers draw from the objective's own p over its own range (DESIGN.md: peers on the same objective or not at
        # all); threestudio's randint over [min_step, max_step] is then plain uniform sampling
        lo, hi = _support(problem)
        self.samplers["threestudio"] = problem.sampler("none", "none", s.floor, None, t_min=lo, t_max=hi)
        self.samplers["vdm"] = problem.sampler("none", "lattice", s.floor, None)
        imp = resampler.importance()
        if imp is None:
            raise RuntimeError("resampler: not warmed up (some bin has fewer losses than its history)")
        support = _support(problem)
        self.samplers["improved-diffusion"] = TimestepSampler(
            T, support[0], support[1], importance=binned_importance(imp, T, support), floor=s.resampler_floor)


def beaten_by(head: dict, peer: dict, sigmas: float = 2.0) -> bool:
    """Whether the headline row's ECM beats a peer row's on the same objective by more than ``sigmas`` standard
    errors of the difference (the two SEs combined as independent; a row without an SE counts as 0)."""
    se = math.hypot(head.get("ecm_se") or 0.0, peer.get("ecm_se") or 0.0)
    return head["ecm"] - peer["ecm"] > sigmas * se


def binned_resampler_update(resampler: SecondMomentResampler, t: Tensor, loss: Tensor, T: int,
                            support: tuple[int, int] | None = None) -> None:
    """Feed per-draw losses to a resampler whose "timesteps" are ``resampler.num_timesteps`` equal bins of
    the objective's ``support`` (inclusive ``(t_min, t_max)``; default the full ``0..T-1``)."""
    lo, hi = support if support is not None else (0, T - 1)
    resampler.update((t.reshape(-1) - lo) * resampler.num_timesteps // (hi - lo + 1), loss.reshape(-1))


def binned_importance(imp: Tensor, T: int, support: tuple[int, int] | None = None) -> Tensor:
    """A resampler's per-bin table (bins of ``support``, as in :func:`binned_resampler_update`) as a
    length-``T`` importance table (zero outside the support, which the sampler's range excludes anyway)."""
    lo, hi = support if support is not None else (0, T - 1)
    t = torch.arange(lo, hi + 1)
    table = torch.zeros(T, dtype=imp.dtype)
    table[t] = imp[(t - lo) * imp.numel() // (hi - lo + 1)]
    return table


# --------------------------------------------------------------------------- stage 1 + 2: variance
def _snapshots(pipe: Pipeline, st: BenchSettings, out: Path, progress: bool) -> dict[str, Path]:
    """Train the baseline for the last checkpoint step; save the grid at each checkpoint step."""
    snap_dir = out / "snapshots"
    snap_dir.mkdir(parents=True, exist_ok=True)
    steps = {name: n for name, n in zip(CHECKPOINTS, st.checkpoint_steps, strict=True) if name in st.snapshots}
    paths = {name: snap_dir / f"{name}-step{n}.safetensors" for name, n in steps.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    last = max(steps.values())
    trainer = pipe.trainer(st.prompt, "baseline", st.seed, out / "baseline-run", last, None, 1e9)
    bar = progress_bar(None, progress, total=last, initial=trainer.step_count, desc="baseline run (snapshots)")
    while True:
        for name, n in steps.items():
            if trainer.step_count == n and not paths[name].is_file():
                with atomic_path(paths[name]) as tmp:
                    save_file({k: v.detach().contiguous() for k, v in pipe.grid_tensors(trainer).items()},
                              str(tmp), metadata={"step": str(n), "prompt": st.prompt})
        if trainer.done:
            break
        trainer.step()
        bar.update(1)
        if trainer.step_count % 25 == 0:
            trainer.save()
    bar.close()
    trainer.save()
    return paths


def _support(problem: Problem) -> tuple[int, int]:
    """The objective's timestep support: the problem's ``t_range`` (the app's ``t_lo, t_hi``) or ``0..T-1``."""
    tr = getattr(problem, "t_range", None)
    return (int(tr[0]), int(tr[1])) if tr is not None else (0, problem.T - 1)


def _clock(st: BenchSettings) -> Callable[[], float]:
    return time.process_time if st.clock == "process" else time.perf_counter


def _pilot(pipe: Pipeline, problem: Problem, grid: Any, st: BenchSettings, seed: int) -> dict:
    """Warm up the learned proposal and the peer resampler; run the app's accountant on a short pilot."""
    T = problem.T
    learned = LearnedProposal(T, num_bins=50, prior=problem.w)
    resampler = SecondMomentResampler(st.resampler_bins, history=st.resampler_history)
    g = torch.Generator().manual_seed(seed)
    clock = _clock(st)
    warm = problem.sds(problem.sampler("none", "per_upstream", st.floor), st.warmup_K)
    t_warm, update_s = clock(), []
    for _ in range(st.warmup_steps):
        pipe.zero_grad(grid)
        out, _, _ = problem.gradient(grid, warm, st.warmup_R, g)
        t_u = clock()
        learned.update(out.draws.t, out.estimate.sq_norms)
        update_s.append(clock() - t_u)
        per_pixel = out.estimate.sq_norms / out.grad[0].numel()  # mean squared residual: the peer's "loss"
        binned_resampler_update(resampler, out.draws.t, per_pixel, T, _support(problem))
    warmup_s = clock() - t_warm
    # the app's accountant on the app's estimator (default proposal, per-upstream strata, K = 4, R = 2): the
    # parameter-space components from the app's probes, and (for the record) the render-space proxy
    autok = AutoK(k_init=4, k_min=2, k_max=st.k_max, every=st.pilot_steps, decay=0.8)
    autok_x = AutoK(k_init=4, k_min=2, k_max=st.k_max, every=st.pilot_steps, decay=0.8)
    meter = CostMeter()
    est = problem.sds(problem.sampler(st.proposal, "per_upstream", st.floor, learned), 4)
    probe_s = []
    t_pilot = clock()
    for _ in range(st.pilot_steps):
        pipe.zero_grad(grid)
        out, secs, comps = problem.gradient(grid, est, 2, g, probe=True, meter=meter)
        probe_s.append(secs["probe"])
        autok.observe(comps.between, comps.within)
        autok_x.observe(out.estimate.between, out.estimate.within)
    k_acc, k_x = autok.step(meter), autok_x.step(meter)
    pilot_s = clock() - t_pilot
    return {"learned": learned, "resampler": resampler, "k_accountant": k_acc,
            "accountant": {"k": k_acc, "warmup_s": warmup_s, "pilot_s": pilot_s,
                           "proposal_update_s": statistics.median(update_s) if update_s else 0.0,
                           "between_param": autok.between, "within_param": autok.within,
                           "k_render_space_proxy": k_x, "between_x": autok_x.between, "within_x": autok_x.within,
                           "c_upstream_s": meter.median("upstream"), "c_draw_s": meter.median("draw"),
                           "probe_s": statistics.median(probe_s),
                           "note": "AutoK (decay 0.8) fed the parameter-space components of the app's probes "
                                   "(ComponentProbe, per-upstream strata: within conservative) over a pilot of "
                                   f"{st.pilot_steps} steps at R=2, K=4; k_render_space_proxy is what the same "
                                   "accountant picks from the render-space components"},
            "learned_importance": learned.importance(), "resampler_importance": resampler.importance()}


def _estimate_fn(pipe: Pipeline, problem: Problem, grid: Any, samplers: Samplers, render_size=None,
                 n_samples=None):
    sds_of: dict[str, Any] = {}

    def estimate(c: Config, gen: torch.Generator, meter: CostMeter) -> Tensor:
        if c.method not in sds_of:
            sds_of[c.method] = problem.sds(samplers.samplers[c.method], c.K)
        sds = sds_of[c.method]
        sds.K = c.K
        pipe.zero_grad(grid)
        problem.gradient(grid, sds, c.R, gen, render_size, n_samples, meter=meter)
        return pipe.grid_gradient(grid).clone()

    return estimate


def _charges(acc: dict, st: BenchSettings, proposal_every: int = 10, probe_every: int = 10) -> dict[str, dict]:
    """Every extra a method pays, in seconds per estimate (one estimate = one optimiser step):

    - the learned proposal's warm-up (``warmup_steps`` x ``warmup_R`` renders x ``warmup_K`` draws), once per
      run, amortised over ``amortise_steps`` steps, and its refresh every ``proposal_every`` steps (the app's
      default), for every row using the learned proposal; improved-diffusion's resampler needs the same
      warm-up (its per-bin loss history);
    - the accountant's pilot (``pilot_steps`` probed steps), amortised likewise, and its probes every
      ``probe_every`` steps (two extra backward passes each), for the app's estimator (learned proposal +
      strata), whose ``K`` the accountant chooses.
    """
    warm = acc["warmup_s"] / st.amortise_steps
    upd = acc["proposal_update_s"] / proposal_every
    learned = {"learned-proposal warm-up (amortised)": warm, "proposal refresh": upd}
    out: dict[str, dict] = {}
    for m in ("importance", "importance+stratified", "learned-importance", "learned-importance+stratified"):
        if st.proposal == "learned" or m.startswith("learned-"):
            out[m] = dict(learned)
    out.setdefault("importance+stratified", {})
    out["importance+stratified"].update({"accountant pilot (amortised)": acc["pilot_s"] / st.amortise_steps,
                                         "accountant probes": acc["probe_s"] / probe_every})
    out["improved-diffusion"] = {"resampler warm-up (amortised)": warm}
    return out


def _measure_checkpoint(pipe: Pipeline, problem: Problem, name: str, snap: Path, st: BenchSettings, out: Path,
                        progress: bool) -> dict:
    res_path = out / f"variance-{name}.json"
    if res_path.is_file():
        return json.loads(res_path.read_text())
    grid = pipe.grid_from_tensors(load_file(str(snap)))
    pilot = _pilot(pipe, problem, grid, st, st.seed + 101)
    # the accountant's pick and the pilot's costs fix the configurations and their replicate counts: keep the
    # first pilot's, so that a rerun (or a rerun asking for more replicates) extends the saved replicates
    pilot_path = out / f"pilot-{name}.json"
    if pilot_path.is_file():
        pilot["accountant"] = json.loads(pilot_path.read_text())
        pilot["k_accountant"] = pilot["accountant"]["k"]
    else:
        atomic_write_json(pilot_path, pilot["accountant"])
    samplers = Samplers(problem, st, pilot["learned"], pilot["resampler"])
    estimate = _estimate_fn(pipe, problem, grid, samplers)
    # reference: the app's estimator with many renders and draws (unbiased for the full-range objective)
    ref_cfg = Config("importance+stratified", st.reference_R, st.reference_K)
    t0 = time.perf_counter()
    reference, ref_var = reference_mean(estimate, ref_cfg, st.reference_estimates, st.seed + 7, progress,
                                        desc=f"reference ({name})")
    ref_time = time.perf_counter() - t0
    extra = [m for m in samplers.samplers if m not in CARV_METHODS + PEER_METHODS]
    configs = [Config(m, R, K) for m in CARV_METHODS for R in st.Rs for K in st.Ks]
    configs += [Config(m, 2, K) for m in extra for K in st.Ks]
    configs += [Config(m, R, 1) for m in PEER_METHODS for R in st.Rs]
    k_acc = pilot["k_accountant"]
    if k_acc not in st.Ks:
        configs.append(Config("importance+stratified", 2, k_acc))
    # peers as they are (K = 1) and with carv's reuse at the same K as carv's headline
    configs += [Config(m, 2, k_acc) for m in PEER_METHODS if k_acc != 1]
    spec = RelativeError(target=st.rel_error, n_min=st.min_replicates, n_max=st.max_replicates,
                         baseline=Config("uniform", 2, 1).key, baseline_factor=10.0)
    rows = measure(configs, estimate, reference, spec, seed=st.seed + 11, state_dir=out / f"state-{name}",
                   progress=progress, desc=f"replicates ({name})", clock=_clock(st), reference_variance=ref_var,
                   keep_replicates=True)
    summary = pooled_figures(rows, baseline=("uniform", 2, 1), charges=_charges(pilot["accountant"], st),
                             seed=st.seed, k_max=st.k_max, smoke=st.smoke)
    for r in rows:
        r["checkpoint"] = name
    res = {"checkpoint": name, "step": st.checkpoint_steps[CHECKPOINTS.index(name)], "rows": rows,
           "summary": summary, "accountant": pilot["accountant"],
           "reference": {"method": ref_cfg.method, "R": ref_cfg.R, "K": ref_cfg.K, "estimates": st.reference_estimates,
                         "variance_of_reference": ref_var, "seconds": ref_time},
           "auto_k": _auto_k_check(rows, summary, k_acc, st),
           "proposals": {"learned": pilot["learned_importance"].tolist(),
                         "resampler": pilot["resampler_importance"].tolist()},
           "loadavg": loadavg()}
    atomic_write_json(res_path, res)
    return res


def _auto_k_check(rows: list[dict], summary: dict, k_acc: int, st: BenchSettings) -> dict:
    """The accountant's K against the best fixed K in hindsight, for the app's estimator at R = 2.

    Criterion: work-normalised variance (measured ``variance * cost_s``) at the accountant's K is within
    10% of the smallest one over the measured K grid (``ratio <= 1.10``).
    """
    m = "importance+stratified"
    mine = {r["K"]: r for r in rows if r["method"] == m and r["R"] == 2}
    wnv = {k: r["variance"] * r["cost_s"] for k, r in mine.items()}
    k_best = min(wnv, key=wnv.get)
    fitted = summary["methods"].get(m, {})
    res = {"k_accountant": k_acc, "k_best_measured": k_best,
           "k_fitted_param_space": fitted.get("auto_k"),
           "wnv_ratio": wnv[k_acc] / wnv[k_best] if k_acc in wnv else None}
    res["within_10pct"] = res["wnv_ratio"] is not None and res["wnv_ratio"] <= 1.10
    comps = fit_components(rows, m)
    if comps is not None and summary.get("c_upstream_s") and summary.get("c_draw_s"):
        b, w = comps
        pred = {k: work_normalised_variance(b, w, summary["c_upstream_s"], summary["c_draw_s"], k)
                for k in range(1, st.k_max + 1)}
        lowest = min(pred.values())
        res["predicted_wnv_ratio"] = pred[k_acc] / lowest if lowest > 0 else None  # (both components fitted at 0)
    return res


# --------------------------------------------------------------------------- stage 4: cost ratio sweep
def _cost_sweep(pipe: Pipeline, problem: Problem, snap: Path, mid: dict, st: BenchSettings, out: Path,
                progress: bool) -> dict:
    res_path = out / "cost-ratio.json"
    if res_path.is_file():
        return json.loads(res_path.read_text())
    grid = pipe.grid_from_tensors(load_file(str(snap)))
    pilot = _pilot(pipe, problem, grid, st, st.seed + 303)
    samplers = Samplers(problem, st, pilot["learned"], pilot["resampler"])
    # components fitted at the default setting (middle checkpoint)
    comps = {m: fit_components(mid["rows"], m) for m in ("uniform", "importance+stratified")}
    points = []
    for size, ns in st.cost_settings:
        estimate = _estimate_fn(pipe, problem, grid, samplers, size, ns)
        configs = [Config("uniform", 2, 1)] + [Config("importance+stratified", 2, k) for k in st.Ks]
        ref = reference_mean(estimate, Config("importance+stratified", st.reference_R, st.reference_K),
                                max(4, st.reference_estimates // 2), st.seed + 13, progress,
                                desc=f"reference ({size}px, {ns} samples)")
        boost = st.baseline_boost
        ref, ref_var = ref
        rows = measure(configs, estimate, ref,
                       lambda c, n=st.cost_replicates, b=boost: n * (b if c.method == "uniform" else 1),
                       seed=st.seed + 17,
                       state_dir=out / f"state-cost-{size}-{ns}", progress=progress,
                       desc=f"cost ratio ({size}px, {ns} samples)", clock=_clock(st), reference_variance=ref_var,
                       keep_replicates=True)
        summ = pooled_figures(rows, baseline=("uniform", 2, 1), k_max=st.k_max, seed=st.seed, smoke=st.smoke)
        best = max((r for r in rows if r["method"] != "uniform"), key=lambda r: r["ecm"])
        c_up, c_draw = summ["c_upstream_s"], summ["c_draw_s"]
        points.append({"render_size": size, "n_samples": ns, "c_upstream_s": c_up, "c_draw_s": c_draw,
                       "cost_ratio": c_up / c_draw, "measured_best_ecm": best["ecm"], "measured_best_k": best["K"],
                       "measured_best_of_n": len(configs) - 1, "measured_best_ecm_se": best.get("ecm_se"),
                       "predicted_best_ecm": predicted_best_ecm(comps, c_up / c_draw, st.k_max)[0],
                       "predicted_best_k": predicted_best_ecm(comps, c_up / c_draw, st.k_max)[1],
                       "rows": rows})
    res = {"points": points, "components_default": {m: list(c) if c else None for m, c in comps.items()},
           "loadavg": loadavg()}
    atomic_write_json(res_path, res)
    return res


def predicted_best_ecm(comps: dict[str, tuple[float, float] | None], ratio: float, k_max: int) -> tuple[float, int]:
    """ECM of the best K against uniform ``(R, K=1)`` predicted from fitted components and a cost ratio
    ``c_up / c_draw`` (costs in units of ``c_draw``; ``R`` cancels)."""
    bu, wu = comps["uniform"]
    b, w = comps["importance+stratified"]
    base = (bu + wu) * (ratio + 1.0)
    best = max(range(1, k_max + 1), key=lambda k: base / ((b + w / k) * (ratio + k)))
    return base / ((b + w / best) * (ratio + best)), best


def plot_ecm_vs_cost_ratio(sweep: dict, path: Path, k_max: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = {m: tuple(c) for m, c in sweep["components_default"].items() if c}
    ratios = [0.05 * 1.1 ** i for i in range(80)]
    fig, ax = plt.subplots(figsize=(6.5, 4.3), dpi=120)
    if len(comps) == 2:
        ax.plot(ratios, [predicted_best_ecm(comps, r, k_max)[0] for r in ratios], "-", color="C0",
                label="predicted (components at the default setting)")
    pts = sweep["points"]
    ax.plot([p["cost_ratio"] for p in pts], [p["measured_best_ecm"] for p in pts], "o", color="C3", ms=7,
            label="measured (best K, replicates)")
    for p in pts:
        ax.annotate(f"{p['render_size']}px/{p['n_samples']}s, K={p['measured_best_k']}",
                    (p["cost_ratio"], p["measured_best_ecm"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("measured c_up / c_draw (render+backward per render / teacher per draw)")
    ax.set_ylabel("best ECM vs uniform (R=2, K=1)")
    ax.set_title("importance+stratified: predicted vs measured ECM as the cost ratio varies", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- stage 3: quality
def run_pair(pipe: Pipeline, prompt: str, seed: int, budget_s: float, out: Path, progress: bool = True,
             eval_points: int = 10) -> dict:
    """Baseline and carv at equal training wall-clock: steps interleaved (the run with less training time so
    far goes next) until both have used ``budget_s`` seconds; evaluations every ``budget_s / eval_points``."""
    ev = budget_s / eval_points
    runs = {m: pipe.trainer(prompt, m, seed, out / m, 10**9, budget_s, ev) for m in ("baseline", "carv")}
    bar = progress_bar(None, progress, total=round(2 * budget_s), desc=f"quality {prompt!r} seed {seed}")
    shown = [sum(t.elapsed for t in runs.values())]
    bar.update(round(shown[0]))

    def step(m: str, t: Trainer) -> None:
        if t.eval_due():
            t.evaluate()
            t.mark_evaluated()
        t.step()
        if t.step_count % 25 == 0:
            t.save()

    def show(m: str, t: Trainer) -> None:
        now = sum(t.elapsed for t in runs.values())
        bar.update(round(now) - round(shown[0]))
        shown[0] = now

    runner.interleave(runs, "wall-clock", advance=step, callback=show)
    bar.close()
    for t in runs.values():
        if not t.evals or t.evals[-1]["step"] != t.step_count:
            t.evaluate()
        t.save()
    base, carv = runs["baseline"].evals, runs["carv"].evals
    return {"prompt": prompt, "seed": seed, "budget_s": budget_s,
            "steps": {m: t.step_count for m, t in runs.items()},
            "final": {m: {k: t.evals[-1][k] for k in ("psnr", "iou")} for m, t in runs.items()},
            "K_final": runs["carv"].K,
            "ecm_psnr": equal_quality_ecm(base, carv, "psnr"), "ecm_iou": equal_quality_ecm(base, carv, "iou"),
            "curves": {"baseline": base, "carv": carv}, "loadavg": loadavg()}


def _quality(pipe: Pipeline, st: BenchSettings, out: Path, progress: bool) -> list[dict]:
    results = []
    for prompt in st.quality_prompts:
        for seed in st.quality_seeds:
            path = out / "quality" / f"{'-'.join(prompt.split())}-seed{seed}.json"
            if path.is_file():
                results.append(json.loads(path.read_text()))
                continue
            r = run_pair(pipe, prompt, seed, st.quality_budget_s, path.with_suffix(""), progress)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, r)
            results.append(r)
    return results


def plot_quality(results: list[dict], path: Path) -> None:
    """PSNR against training seconds for every (prompt, seed) pair: baseline dashed, carv solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = list(dict.fromkeys(r["prompt"] for r in results))
    fig, axs = plt.subplots(2, len(prompts), figsize=(max(7.0, 4.2 * len(prompts)), 6.5), dpi=110, squeeze=False)
    for j, prompt in enumerate(prompts):
        for r in (r for r in results if r["prompt"] == prompt):
            for i, key in enumerate(("psnr", "iou")):
                for m, ls in (("baseline", "--"), ("carv", "-")):
                    c = r["curves"][m]
                    axs[i, j].plot([e["elapsed_s"] for e in c], [e[key] for e in c], ls, color=f"C{r['seed']}",
                                   label=f"{m} seed {r['seed']}", lw=1.2)
        axs[0, j].set_title(prompt, fontsize=9)
        axs[0, j].set_ylabel("PSNR (dB), 16 held-out views")
        axs[1, j].set_ylabel("mask IoU")
        for i in range(2):
            axs[i, j].set_xlabel("training seconds")
            axs[i, j].grid(True, alpha=0.3)
        axs[0, j].legend(fontsize=6)
    fig.suptitle("quality vs compute at equal wall-clock\nbaseline (dashed: uniform, K=1) vs carv (solid)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def geomean(xs: list[float]) -> float | None:
    """Geometric mean of the positive entries (None and non-positive ones left out); None when there are none."""
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def log_spread(groups: Mapping[Any, Sequence[float]]) -> tuple[dict[Any, float], float | None]:
    """Each group's geometric mean of its (positive) ratios, and the standard error across groups of those means'
    logs (None with fewer than two groups): the spread of the equal-step benchmarks, whose groups are the
    (prompt, seed) runs and whose ratios are that run's metrics."""
    logs = {k: [math.log(r) for r in v] for k, v in groups.items() if v}
    g = {k: sum(v) / len(v) for k, v in logs.items()}
    se = None
    if len(g) > 1:
        m = sum(g.values()) / len(g)
        se = math.sqrt(sum((x - m) ** 2 for x in g.values()) / (len(g) - 1) / len(g))
    return {k: math.exp(x) for k, x in g.items()}, se


def equal_step_compute(summaries: list[dict]) -> dict:
    """The ``equal_step_compute`` entry of docs/text_to_3d_bench.json from ``carv text-to-3d --compare``
    summaries (equal per-step compute): one pair per prompt, seed and metric with the steps each run needed to
    reach the baseline's final (smoothed) quality. A carv run that never reaches it enters at its bound (all
    its steps, ``reached`` false), so its ratio is an upper bound and the geometric means are upper bounds
    whenever a pair is unreached."""
    pairs, steps_r, secs_r = [], [], []
    by_metric: dict[str, list[float]] = {}
    for sm in summaries:
        if sm.get("compare_at") != "step":
            raise ValueError(f"summaries: expected equal per-step compute runs (compare_at 'step'), got "
                             f"{sm.get('compare_at')!r}")
        # psnr / iou against the ground truth; psnr_ref / iou_ref (runs with --reference) against the
        # objective's own long-run solution
        for metric in [m for m in ("psnr", "iou", "psnr_ref", "iou_ref") if m in sm["steps_ratio_equal_quality"]]:
            st, sec = sm["steps_ratio_equal_quality"][metric], sm["ecm_equal_quality"][metric]
            if st.get("readable") is False:  # summaries written before the flag carry none: read as they were
                raise ValueError(f"summaries: {sm['prompt']!r} seed {sm.get('seed', 0)} has {min(st['evaluations'])} "
                                 "evaluations, too few for steps to quality (carv.bench.quality.min_evaluations): "
                                 "rerun it with evaluations more often (a shorter eval_every_s)")
            reached = st["t_method_s"] is not None
            carv_steps = st["t_method_s"] if reached else sm["steps"]["carv"]
            carv_secs = sec["t_method_s"] if sec["t_method_s"] is not None else sm["train_seconds"]["carv"]
            pairs.append({"prompt": sm["prompt"], "seed": sm.get("seed", 0), "metric": metric,
                          "baseline_steps": st["t_base_s"], "carv_steps": carv_steps, "reached": reached,
                          "baseline_seconds": sec["t_base_s"], "carv_seconds": carv_secs,
                          "target": st["target"]})
            if st["t_base_s"] and carv_steps:
                steps_r.append(st["t_base_s"] / carv_steps)
                by_metric.setdefault(metric, []).append(st["t_base_s"] / carv_steps)
            if sec["t_base_s"] and carv_secs:
                secs_r.append(sec["t_base_s"] / carv_secs)
    return {"pairs": pairs, "steps_ratio_geomean": geomean(steps_r), "seconds_ratio_geomean": geomean(secs_r),
            "steps_ratio_geomean_by_metric": {m: geomean(v) for m, v in by_metric.items()},
            "n_pairs": len(pairs), "n_unreached": sum(not p["reached"] for p in pairs),
            "note": "unreached pairs enter at their bound (the carv run's total), so ratios are upper bounds there"}


_PAIR = ("baseline", "carv")  # the two sub-runs of a --compare summary


def equal_step_budget_sweep(summaries: list[dict], metrics: Sequence[str] = ("psnr", "iou"),
                            lengths: Sequence[int] | None = None) -> dict:
    """Equal per-step compute measured by run length (``benchmarks/equal_step_budget_sweep.py``): from
    ``carv text-to-3d --compare`` summaries of several lengths ``S`` per (prompt, seed), each estimator's final
    quality against ``S`` is a curve; the target is the baseline's final quality at the longest ``S``; each
    estimator's steps to it are the first crossing of its curve, linear between lengths
    (:func:`carv.bench.quality.equal_quality_ecm`, ``x="step"``, no smoothing: each point is its own run, the
    schedule scaled with it). A carv curve that never reaches the target enters at the longest ``S``
    (``reached`` false), so ratios are upper bounds wherever a pair is unreached; a shortest run that already
    reaches it enters at that length (a bound too: fewer steps might have done). Seconds are steps times each
    estimator's median training seconds per step pooled over all the runs (interleaved step by step, so load
    hits both alike); the ratio of the runs' own wall-clock crossings is kept beside it as a check.

    ``lengths``: the sweep's design; a (prompt, seed) without a run at every one of them (a sweep still
    running) is left out and listed under ``skipped``, so that its longest finished run is never taken for
    the target. Without it every (prompt, seed) with at least two lengths counts."""
    runs: dict[tuple[str, int], dict[int, dict]] = {}
    for sm in summaries:
        if sm.get("compare_at") != "step":
            raise ValueError(f"summaries: expected equal per-step compute runs (compare_at 'step'), got "
                             f"{sm.get('compare_at')!r}")
        if sm["steps"]["carv"] != sm["steps"]["baseline"]:
            raise ValueError(f"summaries: a run stopped early ({sm['steps']}); finish it before the report")
        runs.setdefault((sm["prompt"], sm.get("seed", 0)), {})[sm["steps"]["carv"]] = sm
    if not runs:
        raise ValueError("summaries: no runs")
    per_step = {m: statistics.median(sm["seconds_per_step"][m] for g in runs.values() for sm in g.values())
                for m in _PAIR}
    pairs: list[dict] = []
    skipped = []
    design = sorted(set(lengths)) if lengths is not None else None
    for (prompt, seed), by_len in sorted(runs.items()):
        have = sorted(by_len)
        if len(have) < 2 or (design is not None and not set(design) <= set(have)):
            skipped.append({"prompt": prompt, "seed": seed, "lengths": have})
            continue
        lengths = design or have
        for metric in metrics:
            rows = {m: [{"step": n, "elapsed_s": by_len[n]["train_seconds"][m], metric: by_len[n]["final"][m][metric]}
                        for n in lengths] for m in _PAIR}
            st = equal_quality_ecm(rows["baseline"], rows["carv"], metric, window=1, x="step")
            wall = equal_quality_ecm(rows["baseline"], rows["carv"], metric, window=1, x="elapsed_s")
            reached = st["t_method_s"] is not None
            carv_steps = st["t_method_s"] if reached else float(lengths[-1])
            carv_wall = wall["t_method_s"] if wall["t_method_s"] is not None else rows["carv"][-1]["elapsed_s"]
            pairs.append({"prompt": prompt, "seed": seed, "metric": metric, "target": st["target"],
                          "baseline_steps": st["t_base_s"], "carv_steps": carv_steps, "reached": reached,
                          "baseline_seconds": st["t_base_s"] * per_step["baseline"],
                          "carv_seconds": carv_steps * per_step["carv"],
                          "wall_clock_ratio": wall["t_base_s"] / carv_wall if carv_wall > 0 else None,
                          "lengths": lengths, "final": {m: [r[metric] for r in rows[m]] for m in _PAIR}})
    steps_r = [p["baseline_steps"] / p["carv_steps"] for p in pairs]
    groups: dict[tuple[str, int], list[float]] = {}
    for p, r in zip(pairs, steps_r, strict=True):
        groups.setdefault((p["prompt"], p["seed"]), []).append(r)
    se = log_spread(groups)[1]
    by_prompt = {}
    for prompt in sorted({p["prompt"] for p in pairs}):
        mine = [(p, r) for p, r in zip(pairs, steps_r, strict=True) if p["prompt"] == prompt]
        by_prompt[prompt] = {"steps_ratio_geomean": geomean([r for _, r in mine]),
                             "n_pairs": len(mine), "n_unreached": sum(not p["reached"] for p, _ in mine)}
    return {"pairs": pairs, "n_pairs": len(pairs), "n_unreached": sum(not p["reached"] for p in pairs),
            "steps_ratio_geomean": geomean(steps_r),
            "seconds_ratio_geomean": geomean([p["baseline_seconds"] / p["carv_seconds"] for p in pairs]),
            "wall_clock_ratio_geomean_check": geomean([p["wall_clock_ratio"] for p in pairs]),
            "steps_ratio_log_se_across_runs": se,
            "steps_ratio_geomean_by_metric": {m: geomean([r for p, r in zip(pairs, steps_r, strict=True)
                                                           if p["metric"] == m]) for m in metrics},
            "by_prompt": by_prompt, "seconds_per_step_pooled_median": per_step, "skipped": skipped,
            "rule": "the shortest run (schedule scaled with it) whose final quality reaches the baseline's final "
                    "quality at the longest length; first crossing, linear between lengths; unreached pairs at "
                    "the longest length (upper bounds)"}


# --------------------------------------------------------------------------- the whole benchmark
def run_bench(pipe: Pipeline, out_dir: str | Path = "runs/bench-text-to-3d", quick: bool = False,
              json_path: str | Path | None = None, settings: BenchSettings | None = None,
              progress: bool = True, command: str | None = None) -> dict:
    st = settings or (BenchSettings.quick() if quick else BenchSettings())
    st.validate()
    if getattr(pipe, "clock", _clock(st)) is not _clock(st):
        raise ValueError(f"pipe: its clock ({pipe.clock!r}) is not the settings' clock {st.clock!r}; "
                         "build the pipeline with the same clock so that stage costs and run budgets agree")
    set_threads(st.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "settings.json", asdict(st))
    t_start = time.perf_counter()
    load_start = loadavg()
    problem = pipe.problem(st.prompt)
    names = [n for n in CHECKPOINTS if n in st.snapshots]
    snaps = _snapshots(pipe, st, out, progress)
    per_ckpt = {name: _measure_checkpoint(pipe, problem, name, snaps[name], st, out, progress) for name in names}
    sweep = (_cost_sweep(pipe, problem, snaps["middle"], per_ckpt["middle"], st, out, progress) if st.cost_settings
             else {"points": [], "components_default": {}})
    quality = _quality(pipe, st, out, progress) if st.quality_prompts else []

    # ---- tables, plots, JSON
    _add_wnv_ratio_se(per_ckpt, names)
    all_rows = [r for name in names for r in per_ckpt[name]["rows"]]
    _plot_bench(per_ckpt, names, sweep, quality, st, out)
    atomic_write_text(out / "table.md", markdown_table(all_rows, BENCH_COLUMNS) + "\n")
    result = _bench_result(pipe, per_ckpt, names, all_rows, sweep, quality, st, quick, command, load_start)
    result["seconds_this_invocation"] = time.perf_counter() - t_start  # this invocation only: a resumed run
    # reloads what earlier invocations measured
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "report.md", report_markdown(result))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, result)
    if progress:
        _print_bench(result, per_ckpt, names, quality, st, out)
    return result


BENCH_COLUMNS = ("checkpoint", "method", "R", "K", "variance", "variance_se", "var_replicates", "bias2", "cost_s",
                 "re", "ecm", "bound_fraction")


def _add_wnv_ratio_se(per_ckpt: dict, names: list[str]) -> None:
    """The standard error of each snapshot's ``wnv_ratio`` (the accountant's K against the best measured K), from
    the two rows' variance errors."""
    for name in names:
        a = per_ckpt[name]["auto_k"]
        mine = {r["K"]: r for r in per_ckpt[name]["rows"] if r["method"] == "importance+stratified" and r["R"] == 2}
        if a.get("wnv_ratio") is not None:  # its standard error from the two rows' variance errors
            ra, rb = mine[a["k_accountant"]], mine[a["k_best_measured"]]
            a["wnv_ratio_se"] = a["wnv_ratio"] * math.hypot(ra["variance_se"] / ra["variance"],
                                                            rb["variance_se"] / rb["variance"])


def _plot_bench(per_ckpt: dict, names: list[str], sweep: dict, quality: list[dict], st: BenchSettings,
                out: Path) -> None:
    """Variance against cost and ECM against K per snapshot, ECM against the cost ratio, quality against compute."""
    for name in names:
        rows = per_ckpt[name]["rows"]
        plot_variance_vs_cost([r for r in rows if r["method"] in CARV_METHODS + PEER_METHODS],
                              out / f"variance_vs_cost-{name}.png",
                              f"text-to-3D, {name} snapshot: parameter-gradient variance vs compute, labelled (R, K)",
                              cost_label="cost per estimate (s, median " + (
                                  "CPU time, 1 thread)" if st.clock == "process" else "wall-clock)"))
        plot_ecm_vs_k([r for r in rows if r["method"] not in PEER_METHODS], out / f"ecm_vs_k-{name}.png", R=2,
                      title=f"text-to-3D ({name}): ECM vs K at R = 2 (baseline uniform R=2, K=1)")
    if sweep["points"]:
        plot_ecm_vs_cost_ratio(sweep, out / "ecm_vs_cost_ratio.png", st.k_max)
    if quality:
        plot_quality(quality, out / "quality_vs_compute.png")


def _peers_and_reuse_gain(per_ckpt: dict, names: list[str], st: BenchSettings) -> tuple[dict, dict]:
    """Per snapshot: importance + stratification over reuse alone (ECM ratio at each K, R = 2), and carv's headline
    row against the peers."""
    reuse_gain = {}
    for name in names:
        rows = per_ckpt[name]["rows"]
        by = {(r["method"], r["R"], r["K"]): r for r in rows}
        # importance + stratification over reuse alone at the same (R=2, K): ECM ratio at each K
        reuse_gain[name] = {k: by[("importance+stratified", 2, k)]["ecm"] / by[("uniform", 2, k)]["ecm"]
                            for k in st.Ks if ("uniform", 2, k) in by and ("importance+stratified", 2, k) in by}
    peers_beaten = {}
    for name in names:
        rows = per_ckpt[name]["rows"]
        k_acc = per_ckpt[name]["auto_k"]["k_accountant"]
        head_row = next(r for r in rows if (r["method"], r["R"], r["K"]) == ("importance+stratified", 2, k_acc))
        peers = {f"{r['method']} K={r['K']}": {"ecm": r["ecm"], "ecm_se": r.get("ecm_se")}
                 for r in rows if r["method"] in PEER_METHODS and r["R"] == 2}
        best_peer = max((r for r in rows if r["method"] in PEER_METHODS), key=lambda r: r["ecm"])
        peers_beaten[name] = {"peers_at_R2": peers, "carv_headline_ecm": head_row["ecm"],
                              "carv_headline_ecm_se": head_row.get("ecm_se"),
                              "best_peer": {k: best_peer.get(k) for k in ("method", "R", "K", "ecm", "ecm_se")},
                              "beaten_by_headline": beaten_by(head_row, best_peer),
                              "peer_objective": "the same objective (every peer draws from p over its range)"}
    return reuse_gain, peers_beaten


def _bench_result(pipe: Pipeline, per_ckpt: dict, names: list[str], all_rows: list[dict], sweep: dict,
                  quality: list[dict], st: BenchSettings, quick: bool, command: str | None, load_start) -> dict:
    """The benchmark's results (results.json and the ``--json`` file)."""
    best = {name: max((r for r in per_ckpt[name]["rows"] if r["method"] in CARV_METHODS), key=lambda r: r["ecm"])
            for name in names}
    reuse_gain, peers_beaten = _peers_and_reuse_gain(per_ckpt, names, st)
    k_mid = per_ckpt["middle"]["auto_k"]["k_accountant"]
    head = headline(per_ckpt["middle"]["rows"], {"method": "importance+stratified", "R": 2, "K": k_mid,
                                                 "snapshot": "middle"},
                    chosen_by="a priori: the app's estimator (learned proposal + per-upstream strata, R = 2) at the "
                              "accountant's K from its pilot at the middle snapshot, named before measuring")
    best_n = best_of_n([r for r in all_rows if r["method"] in CARV_METHODS])
    # a reading on too few evaluations (equal_quality_ecm's readable) is not pooled: it measures the interval
    q_ecm = [r["ecm_psnr"]["ecm"] if r["ecm_psnr"].get("readable", True) else None for r in quality]
    q_ecm_iou = [r["ecm_iou"]["ecm"] if r["ecm_iou"].get("readable", True) else None for r in quality]
    result = {
        **run_record(command or ("carv bench text-to-3d" + (" --quick" if quick else "")), load_start),
        "smoke": SMOKE_NOTE if st.smoke else None,
        "headline": head,
        "best_of_n": best_n,
        "headline_per_snapshot": {n: {k: v for k, v in peers_beaten[n].items() if k.startswith("carv_headline")}
                                  for n in names},
        "settings": asdict(st),
        "rows": [{k: r.get(k) for k in ("checkpoint", "method", "R", "K", "n", "variance", "variance_se",
                                         "var_replicates", "bias2", "reference_variance", "cost_s", "cost_stages_s",
                                         "charged", "cost_wall_s", "ecm", "ecm_se", "ecm_ci", "re", "bound_fraction")}
                 for r in all_rows if r["method"] in CARV_METHODS + PEER_METHODS],
        "extra_rows": [r for r in all_rows if r["method"] not in CARV_METHODS + PEER_METHODS],
        "cost_ratio": statistics.median(per_ckpt[n]["summary"]["cost_ratio"] for n in names),
        "cost_ratio_per_checkpoint": {n: per_ckpt[n]["summary"]["cost_ratio"] for n in names},
        "auto_k": {n: per_ckpt[n]["auto_k"] for n in names},
        "accountant": {n: per_ckpt[n]["accountant"] for n in names},
        "components": {n: per_ckpt[n]["summary"]["methods"] for n in names},
        "reference": {n: per_ckpt[n]["reference"] for n in names},
        "best": {n: {k: best[n].get(k) for k in ("method", "R", "K", "ecm", "ecm_se")} for n in names},
        "importance_stratification_over_reuse": reuse_gain,
        "peers": peers_beaten,
        "cost_sweep": [{k: v for k, v in p.items() if k != "rows"} for p in sweep["points"]],
        "quality": [{k: v for k, v in r.items() if k != "curves"} for r in quality],
        "quality_summary": {"ecm_psnr_geomean": geomean(q_ecm), "ecm_iou_geomean": geomean(q_ecm_iou),
                            "ecm_psnr_each": q_ecm, "n_pairs": len(quality),
                            "n_unread": sum(not r["ecm_psnr"].get("readable", True) for r in quality),
                            "final_psnr_mean": {m: statistics.mean(r["final"][m]["psnr"] for r in quality)
                                                for m in ("baseline", "carv")} if quality else None,
                            "final_iou_mean": {m: statistics.mean(r["final"][m]["iou"] for r in quality)
                                               for m in ("baseline", "carv")} if quality else None},
        "objective": asdict(pipe.cfg) if dataclasses.is_dataclass(getattr(pipe, "cfg", None)) else None,
        "snapshots": names,
        "proposal": st.proposal,
        "seconds_this_invocation": None,  # set by run_bench
        "proposal_tables": {n: per_ckpt[n]["proposals"] for n in names},
    }
    return result


def _print_bench(result: dict, per_ckpt: dict, names: list[str], quality: list[dict], st: BenchSettings,
                 out: Path) -> None:
    head, best_n, peers_beaten, best = result["headline"], result["best_of_n"], result["peers"], result["best"]
    for name in names:
        rows = [r for r in per_ckpt[name]["rows"] if r["R"] == 2]
        print_table(rows, BENCH_COLUMNS[1:], title=f"text-to-3D gradient variance at the {name} snapshot (R = 2 rows)",
                    highlight={("importance+stratified", 2, per_ckpt[name]["auto_k"]["k_accountant"])},
                    smoke=st.smoke)
    note = f" ({SMOKE_NOTE})" if st.smoke else ""
    for name in names:
        a = per_ckpt[name]["auto_k"]
        pb = peers_beaten[name]
        print(f"{name}: carv's estimator at the accountant's K = {a['k_accountant']}: ECM "
              f"{pb['carv_headline_ecm']:.2f}x +- {pb['carv_headline_ecm_se'] or 0:.2f}{note}; best of "
              f"{sum(r['method'] in CARV_METHODS for r in per_ckpt[name]['rows'])} carv rows "
              f"{best[name]['ecm']:.2f}x +- {best[name].get('ecm_se') or 0:.2f} "
              f"(upper bound){note}; c_up/c_draw = {per_ckpt[name]['summary']['cost_ratio']:.2f}; best peer "
              f"{pb['best_peer']['method']} K={pb['best_peer']['K']} {pb['best_peer']['ecm']:.2f}x +- "
              f"{pb['best_peer'].get('ecm_se') or 0:.2f}{note}")
    print(f"headline (a priori, middle snapshot): ECM {head['value']:.2f}x +- {head['se'] or 0:.2f}{note}; "
          f"best of {best_n['n']} rows: {best_n['value']:.2f}x +- {best_n.get('se') or 0:.2f} "
          f"(upper bound){note}")
    qs = result["quality_summary"]
    if quality:
        spread = ("one pair: no error bar" if qs["n_pairs"] < 2 else
                  f"per pair {', '.join('-' if e is None else f'{e:.2f}' for e in qs['ecm_psnr_each'])}")
        if qs.get("n_unread"):
            spread += (f"; {qs['n_unread']} not read: too few evaluations per run "
                       f"(carv.bench.quality.min_evaluations)")
        print(f"quality at equal wall-clock ({qs['n_pairs']} prompt x seed pairs): ECM at equal PSNR (geomean) "
              f"{_f(qs['ecm_psnr_geomean'])} ({spread}){note}; final PSNR baseline "
              f"{qs['final_psnr_mean']['baseline']:.2f} dB, carv {qs['final_psnr_mean']['carv']:.2f} dB")
    print(f"run folder: {out} ({result['seconds_this_invocation'] / 60:.1f} min in this invocation)")


def _f(v, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 10 ** -nd or v == 0 else f"{v:.2g}"
    return str(v)


def report_markdown(res: dict) -> str:
    """The headline tables of a benchmark result (Markdown), as pasted into BENCHMARKS.md."""
    lines = []
    rows = res["rows"]
    for name in CHECKPOINTS:
        if any(r["checkpoint"] == name for r in rows):
            lines += _snapshot_markdown(res, name)
    lines += _peers_sweep_quality_markdown(res)
    return "\n".join(lines) + "\n"


def _snapshot_markdown(res: dict, name: str) -> list[str]:
    """One snapshot's ECM table (method x R rows, K columns) and the accountant's line."""
    lines = []
    rs = [r for r in res["rows"] if r["checkpoint"] == name]
    step = res["settings"]["checkpoint_steps"][CHECKPOINTS.index(name)]
    lines += [f"**{name} snapshot (baseline step {step})**, `c_up / c_draw` = "
              f"{_f(res['cost_ratio_per_checkpoint'][name])}; ECM against uniform (R=2, K=1), "
              "RE against uniform at the same (R, K):", "",
              "| method | R | K=" + " | K=".join(str(k) for k in res["settings"]["Ks"])
              + " | best ECM | RE at K=1 |",
              "| --- | --- |" + " --- |" * (len(res["settings"]["Ks"]) + 2)]
    methods = list(dict.fromkeys(r["method"] for r in rs))
    for m in methods:
        for R in res["settings"]["Rs"]:
            by = {r["K"]: r for r in rs if r["method"] == m and r["R"] == R}
            if not by:
                continue
            cells = [_f(by[k]["ecm"]) if k in by else "" for k in res["settings"]["Ks"]]
            best = max(by.values(), key=lambda r: r["ecm"])
            re1 = by[1]["re"] if 1 in by else None
            lines.append(f"| {m} | {R} | " + " | ".join(cells) + f" | {_f(best['ecm'])} +- "
                         f"{_f(best.get('ecm_se'))} (K={best['K']}, best of {len(by)}: upper bound) | {_f(re1)} |")
    a = res["auto_k"][name]
    acc = res["accountant"][name]
    comps = res["components"][name].get("importance+stratified", {})
    lines += ["", f"Accountant (pilot, parameter-space probes): K = {a['k_accountant']}; best measured K at R=2: "
                  f"{a['k_best_measured']}; Var*C at the accountant's K / best = {_f(a['wnv_ratio'], 3)} +- "
                  f"{_f(a.get('wnv_ratio_se'), 3)} measured, {_f(a.get('predicted_wnv_ratio'), 3)} from the "
                  f"fitted components (within 10%: {a['within_10pct']} / "
                  f"{(a.get('predicted_wnv_ratio') or 9) <= 1.10}); K from the render-space proxy: "
                  f"{acc.get('k_render_space_proxy')}; fitted parameter-space components "
                  f"(importance+stratified): between {_f(comps.get('between'), 5)}, within "
                  f"{_f(comps.get('within'), 5)}, auto K {comps.get('auto_k')}.", ""]
    return lines


def _peers_sweep_quality_markdown(res: dict) -> list[str]:
    """The peers' rows, the cost-ratio sweep and the quality pairs."""
    rows, lines = res["rows"], []
    lines += ["**Peers** (K = 1, their own samplers on the objective's own p and range; threestudio's is then "
              "plain uniform sampling):", "",
              "| snapshot | method | R | variance | var_replicates | bias2 | ECM | RE |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["method"] in PEER_METHODS:
            lines.append(f"| {r['checkpoint']} | {r['method']} | {r['R']} | {_f(r['variance'], 5)} | "
                         f"{_f(r['var_replicates'], 5)} | {_f(r['bias2'], 5)} | {_f(r['ecm'])} | {_f(r['re'])} |")
    lines += ["", "**Cost ratio sweep** (middle snapshot; prediction from the components fitted at the default "
                  "setting and each setting's measured costs):", "",
              "| render | samples/ray | c_up / c_draw | measured best ECM (K) | predicted best ECM (K) |",
              "| --- | --- | --- | --- | --- |"]
    for p in res["cost_sweep"]:
        lines.append(f"| {p['render_size']} px | {p['n_samples']} | {_f(p['cost_ratio'])} | "
                     f"{_f(p['measured_best_ecm'])} ({p['measured_best_k']}) | "
                     f"{_f(p['predicted_best_ecm'])} ({p['predicted_best_k']}) |")
    lines += ["", "**Quality at equal wall-clock** (PSNR / mask IoU on 16 held-out views at 32 px; ECM at equal "
                  "quality = time for the baseline to reach its final smoothed quality / time for carv):", "",
              "| prompt | seed | steps base / carv | final PSNR base / carv | final IoU base / carv | "
              "ECM (PSNR) | ECM (IoU) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for q in res["quality"]:
        def e(d):
            return _f(d["ecm"]) if d["ecm"] is not None else f"< {_f(d.get('upper_bound'))}"
        lines.append(f"| {q['prompt']} | {q['seed']} | {q['steps']['baseline']} / {q['steps']['carv']} | "
                     f"{_f(q['final']['baseline']['psnr'])} / {_f(q['final']['carv']['psnr'])} | "
                     f"{_f(q['final']['baseline']['iou'], 3)} / {_f(q['final']['carv']['iou'], 3)} | "
                     f"{e(q['ecm_psnr'])} | {e(q['ecm_iou'])} |")
    qs = res["quality_summary"]
    lines += ["", f"Geometric mean ECM at equal PSNR over the pairs where carv reached the target: "
                  f"{_f(qs['ecm_psnr_geomean'])}; at equal IoU: {_f(qs['ecm_iou_geomean'])}.", ""]
    return lines


# ------------------------------------------------------------------ the app's pipeline, wired in
class TextTo3DPipeline:
    """This pipeline as :class:`carv.bench.text_to_3d.Pipeline` (problems, trainers, grids) for the benchmark."""

    def __init__(self, cfg: TextTo3DConfig | None = None, teacher: UNetTeacher | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.cfg = cfg or TextTo3DConfig()
        self.teacher = teacher if teacher is not None else load_scenes_teacher()
        self.clock = clock
        self._problems: dict[str, SceneProblem] = {}

    def problem(self, prompt: str) -> SceneProblem:
        key = get_scene(prompt).prompt
        if key not in self._problems:
            self._problems[key] = problem_for(dataclasses.replace(self.cfg, prompt=key), self.teacher, self.clock)
        return self._problems[key]

    def trainer(self, prompt: str, method: str, seed: int, out_dir: Path, steps: int, budget_s: float | None,
                eval_every_s: float) -> Trainer:
        cfg = dataclasses.replace(self.cfg, prompt=get_scene(prompt).prompt, method=method, seed=seed, steps=steps,
                                  budget_s=budget_s, eval_every_s=eval_every_s)
        return Trainer(cfg, out_dir, self.problem(prompt))

    def grid_tensors(self, trainer: Trainer) -> dict[str, Tensor]:
        return {"density": trainer.grid.density, "color": trainer.grid.color}

    def grid_from_tensors(self, tensors: dict[str, Tensor]) -> VoxelGrid:
        grid = VoxelGrid(int(tensors["density"].shape[-1]), bound=1.0)
        with torch.no_grad():
            grid.density.copy_(tensors["density"])
            grid.color.copy_(tensors["color"])
        return grid

    def grid_gradient(self, grid: VoxelGrid) -> Tensor:
        return grid_grad(grid)

    def zero_grad(self, grid: VoxelGrid) -> None:
        grid.zero_grad(set_to_none=True)


def bench_text_to_3d(out_dir: str | Path = "runs/bench-text-to-3d", quick: bool = False,
                     json_path: str | Path | None = None, threads: int | None = None, seed: int = 0,
                     progress: bool = True, settings=None, cfg: TextTo3DConfig | None = None,
                     command: str | None = None, config: str | Path | None = None) -> dict:
    """``carv bench text-to-3d``: :func:`carv.bench.text_to_3d.run_bench` with this pipeline wired in
    (``config``: a JSON file of :class:`BenchSettings` fields, for a smaller configuration than the default)."""
    if config is not None:
        from carv.bench.harness import settings_from_json

        if quick or settings is not None:
            raise ValueError("--config, --quick: give one of them (--quick is its own small configuration)")
        settings = settings_from_json(BenchSettings, config, seed=seed, threads=threads)
    if settings is None:
        settings = BenchSettings.quick(seed=seed, threads=threads) if quick else BenchSettings(seed=seed,
                                                                                                 threads=threads)
    set_threads(settings.threads)
    clock = time.process_time if settings.clock == "process" else time.perf_counter
    settings.validate()  # bad settings are named before the folder is touched
    with RunFolder(out_dir, "carv bench text-to-3d", {"quick": quick, "seed": settings.seed}):
        return run_bench(TextTo3DPipeline(cfg, clock=clock), out_dir, quick, json_path, settings, progress,
                         command)
