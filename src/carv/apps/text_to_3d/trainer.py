"""One text-to-3D run's state and step: :class:`Trainer` (grid, optimiser, generator, proposal, allocator, cost
meter, clocks, evaluations, checkpoints), built on the problem of its configuration (:func:`problem_for`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from carv._runfolder import RunState
from carv._validate import check_finite_parameters
from carv.accounting import Allocator, CostMeter, accounting_summary, choose_next, plan_step
from carv.apps.text_to_3d.config import LEGACY_SETTINGS, RESUMABLE_CHANGES, TextTo3DConfig, run_prompt
from carv.apps.text_to_3d.latent import LatentSceneProblem, load_sd_teacher
from carv.apps.text_to_3d.problem import SceneProblem
from carv.render import VoxelGrid, opaque_loss, sparsity_loss
from carv.teachers.unet import UNetTeacher, weights_digest
from carv.timesteps import LearnedProposal, ProposalSelector
from carv.upstream import UpstreamSampler

__all__ = ["problem_for", "teacher_digest", "Trainer"]

def problem_for(cfg: TextTo3DConfig, teacher: UNetTeacher | None = None,
                clock: Callable[[], float] = time.perf_counter) -> SceneProblem:
    """The :class:`SceneProblem` of a configuration: its renderer, guidance, held-out views, and the
    objective's timestep range (at step 0) and training elevations as the problem's defaults. With
    ``cfg.teacher`` (a Stable Diffusion folder) it is :class:`carv.apps.text_to_3d.latent.LatentSceneProblem`, and
    ``teacher`` is that teacher already loaded (or None)."""
    kw = dict(t_range=cfg.t_range(0), train_elevation=(cfg.elev_lo, cfg.elev_hi))
    if cfg.teacher is not None:
        sd = teacher if teacher is not None else load_sd_teacher(cfg.teacher)
        return LatentSceneProblem(cfg.prompt, sd, cfg.render_size, cfg.n_samples, cfg.guidance_scale,
                                  cfg.n_eval_views, clock, **kw)
    return SceneProblem(cfg.prompt, teacher, cfg.render_size, cfg.n_samples, cfg.guidance_scale, cfg.n_eval_views,
                        clock, **kw)


# --------------------------------------------------------------------------- one run
def teacher_digest(teacher) -> str | None:
    """:func:`carv.teachers.unet.weights_digest` of a built-in-style teacher (a :class:`UNetTeacher`), else None
    (a diffusers teacher's weights are not hashed: gigabytes, and its folder is checked by name)."""
    return weights_digest(teacher) if isinstance(teacher, UNetTeacher) else None


class Trainer:
    """One run's state: grid, optimiser, generator, proposal, accountant, cost meter, clocks, evaluations.

    ``step()`` does one optimisation step; ``evaluate()`` measures quality on the held-out views (its time
    is not charged to the run). ``save()`` / the constructor (``resume=True``) checkpoint and restore the
    whole state, so a resumed run continues exactly where the checkpoint was taken (up to the
    accountant's choices, which read measured wall-clock costs).
    """

    def __init__(self, cfg: TextTo3DConfig, out_dir: str | Path | None = None, problem: SceneProblem | None = None,
                 resume: bool = True, teacher: UNetTeacher | None = None):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(out_dir) if out_dir is not None else None
        self.problem = problem if problem is not None else problem_for(cfg, teacher)
        p = self.problem
        # the teacher's weights are part of a run's identity (a checkpoint never resumes with another teacher)
        self.teacher_digest = teacher_digest(p.teacher)
        if (p.prompt, p.render_size, p.n_samples, p.guidance_scale) != (
                run_prompt(cfg.prompt), cfg.render_size, cfg.n_samples, float(cfg.guidance_scale)):
            raise ValueError("problem: its prompt / render_size / n_samples / guidance_scale differ from the config's")
        self.grid = p.new_grid(self.resolution_at(0), cfg.init_blob, cfg.init_radius, cfg.init_color,
                               cfg.init_center_z, cfg.init_height)
        self.opt = self.new_optimiser(self.grid)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        proposal = cfg.resolved_proposal
        self.learned = LearnedProposal(p.T, num_bins=50, prior=p.w) if proposal in ("learned", "auto") else None
        # "auto": uniform, p w or the learned table, compared on the run's own draws at every refresh
        self.selector = (ProposalSelector(p.T, weight=p.w, learned=self.learned, start="weight",
                                          every=cfg.proposal_every) if proposal == "auto" else None)
        self.sds = p.sds(p.sampler(proposal, cfg.resolved_stratify, cfg.floor, self.learned), cfg.initial_k)
        self.alloc: Allocator | None = None
        if cfg.auto_k:
            budget = None if cfg.step_budget == "free" else cfg.step_budget
            free = budget is None  # free budget: K only, at the fixed R (the old AutoK)
            # with a budget the run starts at R = 1, K = k_init until the first re-choice: within the plain
            # step's cost 2 (c_up + c_draw) whenever c_up >= (k_init - 2) c_draw
            self.alloc = Allocator(budget, baseline=(cfg.R, 1), r_range=(cfg.R, cfg.R) if free else (1, cfg.r_max),
                                   k_range=(2 if free else 1, cfg.k_max), r_init=cfg.R if free else 1,
                                   k_init=cfg.k_init,
                                   every=cfg.accountant_every, warmup=3, window=9, probe_every=cfg.probe_every,
                                   live_costs=cfg.live_costs,
                                   efficiency_tolerance=None if cfg.fill_budget else 0.03,
                                   between_estimate=cfg.between_estimate, cost_ratio=cfg.cost_ratio,
                                   probe_ratio=cfg.probe_ratio, selection=cfg.selection, mix=cfg.mix_pairs)
        # training cameras: iid, or spread across the renders of a step and across steps (carv.upstream)
        self.upstream = (UpstreamSampler(2, cfg.resolved_upstream, generator=self.generator)
                         if cfg.resolved_upstream != "iid" else None)
        self.R = self.alloc.R if self.alloc is not None else cfg.R
        self.meter = CostMeter(clock=p.clock)  # the problem's clock (the benchmark charges CPU seconds)
        self.step_count = 0
        self.elapsed = 0.0  # seconds of training (step) time; evaluation and checkpointing are not counted
        self.next_eval = 0.0
        self.evals: list[dict] = []
        self.resumed_from: int | None = None
        # checkpoints and metrics (checksummed; a damaged newest checkpoint falls back to the previous one)
        self.state = RunState(self.out) if self.out is not None else None
        if self.state is not None:
            loaded = self.state.load(accept=self._accept) if resume else None
            if loaded is not None:
                self._load(loaded)
            elif not resume:
                self.state.start()

    # ---------------------------------------------------------------- properties
    @property
    def regulariser(self) -> Callable[[Tensor], Tensor] | None:
        """The opacity regulariser of the objective, or None when both weights are 0.

        ``opacity [R, 1, H, W] -> (sparsity_weight * sparsity_loss + opaque_weight * opaque_loss) * H W / R``:
        the weights are per pixel, on the scale of the SDS surrogate (whose gradient per render element is
        the residual ``/ R``), so ``sparsity_weight = 0.05`` charges a fully opaque pixel as much as an SDS
        residual of 0.05 asks for it. The sparsity weight is the current step's (:meth:`TextTo3DConfig.sparsity_at`
        at ``step_count``, read when the regulariser is called)."""
        cfg = self.cfg
        if cfg.sparsity_weight == 0 and not cfg.sparsity_end and cfg.opaque_weight == 0:
            return None

        def reg(opacity: Tensor) -> Tensor:
            scale = opacity[0].numel()  # mean over R H W pixels * H W = sum / R
            sparsity = cfg.sparsity_at(self.step_count)
            return scale * (sparsity * sparsity_loss(opacity) + cfg.opaque_weight * opaque_loss(opacity))

        return reg

    @property
    def K(self) -> int:
        return self.sds.K

    def resolution_at(self, step: int) -> int:
        """The grid's resolution during optimisation step ``step`` (coarse-to-fine: ``coarse_resolution`` before
        ``coarse_steps``)."""
        cfg = self.cfg
        return cfg.coarse_resolution if cfg.coarse_resolution is not None and step < cfg.coarse_steps \
            else cfg.grid_resolution

    def upsample(self, resolution: int) -> None:
        """Replace the grid by its trilinear upsampling to ``resolution^3`` and carry Adam's state over: the first
        and second moments are resampled the same way (the step counts stay), so the optimiser continues at the
        same effective step size instead of restarting (a fresh Adam would move every voxel by ``lr`` at once)."""
        old, state = self.grid, self.opt.state_dict()
        self.grid = old.upsampled(resolution)
        opt = self.new_optimiser(self.grid)
        for st in state["state"].values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = VoxelGrid.resample_volume(st[k], resolution).clamp_min(0.0 if k == "exp_avg_sq" else
                                                                                   -float("inf"))
        opt.load_state_dict(state)
        self.opt = opt

    def new_optimiser(self, grid: VoxelGrid) -> torch.optim.Adam:
        """Adam over two parameter groups, the grid's raw density and its raw colour (their learning rates are
        set per step by :meth:`set_lr`)."""
        opt = torch.optim.Adam([{"params": [grid.density]}, {"params": [grid.color]}], lr=self.cfg.lr,
                               betas=(0.9, float(self.cfg.adam_beta2)))
        self.set_lr(0, opt)
        return opt

    def set_lr(self, step: int, opt: torch.optim.Optimizer | None = None) -> None:
        """The learning rates of optimisation step ``step`` in ``opt`` (default: the run's optimiser):
        ``lr_at(step)`` for the density and ``color_lr_scale`` times that for the colour."""
        opt = self.opt if opt is None else opt
        lr = self.cfg.lr_at(step)
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[1]["lr"] = lr * float(self.cfg.color_lr_scale)

    def plain_step_cost(self) -> float | None:
        """This run's measured cost of one plain step, ``R (c_up + c_draw)`` from its meter's medians (None
        before both stages are timed): the budget carv's allocator spends when compared at equal per-step
        compute."""
        if not (self.meter.times.get("upstream") and self.meter.times.get("draw")):
            return None
        return self.R * (self.meter.median("upstream") + self.meter.median("draw"))

    @property
    def done(self) -> bool:
        if self.step_count >= self.cfg.steps:
            return True
        return self.cfg.budget_s is not None and self.elapsed >= self.cfg.budget_s

    # ---------------------------------------------------------------- training
    def step(self) -> dict[str, Any]:
        """One optimisation step; returns its metrics row."""
        cfg, p = self.cfg, self.problem
        sw = self.meter.stopwatch()
        if self.grid.resolution != self.resolution_at(self.step_count):  # coarse-to-fine
            self.upsample(self.resolution_at(self.step_count))
        self.opt.zero_grad(set_to_none=True)
        # a probe step runs at R, K >= 2 (its extra cost is charged by the allocator)
        R, K, probe = plan_step(self.alloc, self.R, self.sds.K)
        self.sds.K = K
        self.sds.sampler.set_t_range(*cfg.t_range(self.step_count, p.T))  # the objective at this step
        self.set_lr(self.step_count)
        self.sds.guidance_scale = cfg.guidance_at(self.step_count)
        # probe steps draw iid cameras and iid timesteps: the allocator needs the components one step pays, and the
        # probe reads them without bias only from iid draws
        # the third contrast where the ordinary steps' rows are stratified (read before iid() turns strata off)
        halves = probe and self.alloc is not None and self.alloc.probe_reads_halves(self.sds.sampler)
        with self.sds.sampler.iid() if probe else nullcontext():
            out, secs, comps = p.gradient(self.grid, self.sds, R, self.generator, probe=probe, halves=halves,
                                          upstream=None if probe else self.upstream, regulariser=self.regulariser,
                                          elevation_range=(cfg.elev_lo, cfg.elev_hi))
        sw.lap()  # the gradient's own stages: secs (timed on the same clock)
        if cfg.tv_weight > 0:
            (cfg.tv_weight * self.grid.tv_loss()).backward()
        self.opt.step()
        check_finite_parameters(self.grid.parameters(), "lr", self.opt.param_groups[0]["lr"])
        # the optimiser step is a per-step cost: charge it to the renders of the step
        sw.seconds.update(upstream=secs["upstream"] + sw.lap(), draw=secs["draw"], probe=secs["probe"])
        sw.record({"upstream": R, "draw": R * K, **({"probe": 1} if probe else {})})
        est = out.estimate
        sampler = self.sds.sampler
        self.step_count += 1
        if self.selector is not None:  # refreshes on its own schedule (every proposal_every steps, then sparser)
            self.selector.step(out.draws.t, est.sq_norms, sampler)
        elif self.learned is not None:
            self.learned.update(out.draws.t, est.sq_norms)
            if self.step_count % cfg.proposal_every == 0:
                sampler.set_importance(self.learned.importance((sampler.t_min, sampler.t_max)))
        if self.alloc is not None:  # parameter-space components (probe steps only): the allocator's input
            self.R, self.sds.K = choose_next(self.alloc, self.meter, comps)
        self.elapsed += sw.elapsed()
        row = {"kind": "step", "step": self.step_count, "elapsed_s": self.elapsed, "R": R, "K": K, "probe": probe,
               "next_R": self.R, "next_K": self.sds.K, "between_x": est.between, "within_x": est.within,
               "grad_x_norm": float(out.grad.norm()), "step_s": sw.elapsed()}
        if comps is not None:
            row.update(between_param=comps.between, within_param=comps.within, probe_s=secs["probe"])
        return row

    def accounting(self) -> dict:
        """``summary.json["accounting"]`` (:func:`carv.accounting.accounting_summary`): the allocator's components,
        the meter's stage medians, the chosen ``(R, K)`` with its mix and the proposal in use."""
        m, a = self.meter, self.alloc
        costs = [m.median(s) if m.times.get(s) else None for s in ("upstream", "draw")]
        proposal = self.selector.current if self.selector is not None else self.cfg.resolved_proposal
        if a is None:
            return accounting_summary(None, None, *costs, self.R, self.K, proposal)
        return accounting_summary(a.between, a.within, *costs, *a.base, proposal, k_max=a.k_max, mix=a.mix,
                                  strata=a.priced_strata)

    def evaluate(self) -> dict[str, Any]:
        row = {"kind": "eval", "step": self.step_count, "elapsed_s": self.elapsed, **self.problem.evaluate(self.grid)}
        self.evals.append(row)
        return row

    def checkpoint_due(self) -> bool:
        return self.step_count % self.cfg.checkpoint_every == 0

    def eval_due(self) -> bool:
        """Whether to evaluate now: every ``eval_every`` steps where set (the first multiple after the last
        evaluation), else every ``eval_every_s`` seconds of training."""
        if self.cfg.eval_every is not None:
            last = self.evals[-1]["step"] if self.evals else -1
            return last < 0 or self.step_count // self.cfg.eval_every > last // self.cfg.eval_every
        return self.elapsed >= self.next_eval

    def mark_evaluated(self) -> None:
        """The next evaluation at the first multiple of ``eval_every_s`` after now (one jump, not a loop: with
        a tiny ``eval_every_s`` a loop of additions would take ``elapsed / eval_every_s`` iterations). By steps
        (``eval_every``) the last evaluation's step is the state, kept in ``evals``."""
        if self.next_eval <= self.elapsed:
            every = self.cfg.eval_every_s
            self.next_eval = (math.floor(self.elapsed / every) + 1) * every

    # ---------------------------------------------------------------- checkpoint
    def save(self) -> None:
        """Checkpoint the whole state (checksummed, with the metrics so far) into the run folder."""
        if self.state is None:
            raise ValueError("out_dir: this trainer has no run folder to checkpoint into")
        tensors = {"grid.density": self.grid.density.detach(), "grid.color": self.grid.color.detach(),
                   "rng": self.generator.get_state()}
        opt_state = self.opt.state_dict()
        for i, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = torch.as_tensor(v)
        if self.learned is not None:
            for k, v in self.learned.state_dict().items():
                tensors[f"learned.{k}"] = v
        if self.selector is not None:
            for k, v in self.selector.state_dict().items():
                tensors[f"selector.{k}"] = v
        # the table the sampler draws from now (refreshed every proposal_every steps, "auto" on the selector's
        # schedule; empty: q = p), restored as it was rather than rebuilt from statistics that have moved since
        tensors["sampler.importance"] = self.sds.sampler.importance_state()
        meta = {
            "version": 2,
            "config": self.identity(),
            "step": self.step_count,
            "elapsed_s": self.elapsed,
            "next_eval": self.next_eval,
            "K": self.sds.K,
            "R": self.R,
            "opt_param_groups": opt_state["param_groups"],
            "allocator": self.alloc.state_dict() if self.alloc is not None else None,
            "upstream": self.upstream.state_dict() if self.upstream is not None else None,
            "meter": self.meter.state_dict(),
            "evals": self.evals,
        }
        self.state.save(self.step_count, tensors, meta)

    def identity(self) -> dict:
        """What a checkpoint of this run must match to be resumed: the configuration's identity and the teacher's
        weights digest (:func:`teacher_digest`; absent for teachers it does not cover)."""
        return {**self.cfg.identity(), **({"teacher_weights": self.teacher_digest} if self.teacher_digest else {})}

    def _accept(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Refuse a checkpoint that is not this run's (another configuration or seed, another command's), before
        :meth:`RunState.load` touches the folder."""
        saved, now = meta.get("config"), self.identity()
        if not isinstance(saved, dict) or "grid.density" not in tensors or "rng" not in tensors:
            raise ValueError(f"out_dir: {str(self.out)!r} holds a checkpoint that is not a text-to-3d run's; use "
                             f"another --out, or --fresh")
        diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, LEGACY_SETTINGS.get(k)) != now[k])
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
            raise ValueError(f"out_dir: {str(self.out)!r} holds a run with a different configuration ({details}); "
                             f"use another --out, the same settings, or --fresh")

    def _load(self, loaded: tuple[dict[str, Tensor], dict]) -> None:
        tensors, meta = loaded
        self._accept(tensors, meta)
        D = int(tensors["grid.density"].shape[-1])
        if D != self.grid.resolution:  # saved before the coarse-to-fine upsampling
            self.grid = VoxelGrid(D, bound=self.grid.bound)
            self.opt = self.new_optimiser(self.grid)
        with torch.no_grad():
            self.grid.density.copy_(tensors["grid.density"])
            self.grid.color.copy_(tensors["grid.color"])
        state = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                state.setdefault(int(i), {})[k] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
        self.generator.set_state(tensors["rng"])
        if self.learned is not None:
            self.learned.load_state_dict({"m2": tensors["learned.m2"], "mass": tensors["learned.mass"]})
        if self.selector is not None:
            self.selector.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("selector.")})
        # a checkpoint without the key held no table (q = p)
        self.sds.sampler.load_importance_state(tensors.get("sampler.importance", torch.zeros(0, dtype=torch.float64))
                                               .to(torch.float64))
        if self.alloc is not None and meta.get("allocator") is not None:
            self.alloc.load_state_dict(meta["allocator"])
        if self.upstream is not None and meta.get("upstream") is not None:
            self.upstream.load_state_dict(meta["upstream"])
        self.sds.K = int(meta["K"])
        self.R = int(meta.get("R", self.cfg.R))
        self.meter.load_state_dict(meta["meter"])
        self.step_count, self.elapsed = int(meta["step"]), float(meta["elapsed_s"])
        self.next_eval, self.evals = float(meta["next_eval"]), list(meta["evals"])
        self.resumed_from = self.step_count
