"""Text-to-3D by score distillation of a voxel grid from the procedural-scene teacher, through carv.

The pipeline (DreamFusion's loop, at CPU scale):

1. **Upstream** (the expensive part): render the learnable :class:`~carv.render.VoxelGrid` (density +
   colour, post-activated, 48^3 by default) from ``R`` random cameras (azimuth over 360 degrees,
   elevation over the teacher's 0-40 degrees, radius 3, field of view 40), at ``render_size``
   (64 px) with ``n_samples`` jittered samples per ray, composite onto the teacher's grey background,
   and resize (area) to the teacher's 32 px, as real pipelines render above the teacher's resolution and
   resize. Its backward pass (render + resize) runs once per step.
2. **Teacher**: :class:`carv.ScoreDistillation` with the frozen prompt- and camera-conditioned DDPM
   (:func:`carv.teachers.scenes.load_scenes_teacher`; labels: prompt, view bin, and the camera's azimuth and
   elevation, :func:`carv.teachers.scenes.teacher_cond`), classifier-free guidance 3, SDS weighting
   ``w = 1 - alphabar_t`` and a timestep range annealed per step (the objective at step ``n``: ``p = U{20..980}``
   at step 0, its top moving linearly to 400 at step 200 and staying there: ``t_lo, t_hi = 0.02, 0.98`` ->
   ``t_lo_end, t_hi_end = 0.02, 0.4`` over ``anneal_steps``; threestudio's ``max_step_percent`` schedule, applied
   through ``TimestepSampler.set_t_range``). Its other settings (measured in BENCHMARKS.md, "Text-to-3D
   quality"): training cameras over the teacher's own 0-40 degrees of elevation (``elev_lo, elev_hi``; a
   (prompt, view) teacher, which knows the camera only as a 90-degree view bin, did better at 15-25, since it
   pulls every render towards its bin's average view: the stemless dome of earlier sessions), an initial
   density blob of radius 0.85, and Adam with ``beta2 = 0.99``
   (``adam_beta2``; torch's 0.999 averages a voxel's squared gradients over about 1000 steps, longer than the
   run). Measured and left off by default: ``sparsity_weight`` (a penalty on the renders' opacity from step
   ``sparsity_start``: it removed background-grey haze for the (prompt, view) teacher and erodes the thin stem with
   the camera-conditioned one), ``guidance_end`` (guidance annealed over ``anneal_steps``),
   ``lr_end`` (Adam's rate decayed geometrically), ``init_color`` (a fresh voxel's colour),
   ``coarse_resolution, coarse_steps`` (coarse-to-fine grid), ``color_lr_scale`` (the colour's rate against the
   density's), ``init_center_z, init_height`` (the blob as an ellipsoid) and ``sparsity_end`` (a sparsity ramp).
3. **carv** (the default, ``method="carv"``): ``K`` draws per render; the timestep proposal is
   :class:`carv.LearnedProposal` (``q ~ p sqrt(E||f||^2 | t)``, learned online from the squared residual
   norms every step computes anyway, the teacher's weight table ``w`` as its prior, refreshed every
   ``proposal_every`` steps, floor ``0.1``); per-upstream stratification; ``K`` chosen by
   :class:`carv.AutoK` from the measured stage costs and variance components and re-chosen every
   ``accountant_every`` steps. ``method="baseline"`` is the plain estimator: uniform ``t``, ``K = 1``.
   Every variant is unbiased for the same gradient (the proposal at a step depends only on earlier
   steps' draws).

:class:`Trainer` holds one run (grid, Adam, generator, proposal, accountant, cost meter, clocks) and
checkpoints it (safetensors for tensors, JSON for the rest; nothing is pickled), so a rerun of the
same command continues. :func:`run_text_to_3d` is the main job (``carv text-to-3d``): a run folder
with ``config.json``, ``metrics.jsonl``, ``turntable.png``, ``comparison.png`` and plots; ``compare=True``
also trains the baseline at equal training wall-clock (the two runs' steps are interleaved in one
process so that machine load hits both alike) and writes side-by-side turntables and quality-versus-
compute curves. The side-by-side benchmark (``carv bench text-to-3d``, :mod:`carv.bench.text_to_3d`)
drives this pipeline; no benchmark code lives here.

Accounting: the stage ``"upstream"`` is charged, per render, the render forward, its backward pass and
the optimiser step (a per-step cost, amortised over the ``R`` renders of a step); ``"draw"`` is the
:class:`~carv.ScoreDistillation` call (noising, ``R K`` guided teacher calls, reduction) per draw.
The accountant reads the variance components of the *parameter* gradient (the vector Adam consumes),
measured every ``probe_every`` steps by :class:`carv.accounting.ComponentProbe` from the step's own
draws with two extra backward passes through the renders (about 6% of the training time at the
defaults; it is charged to the run's clock, not to the stage costs). The probe's between estimate is
passed (and logged as ``between_param``) signed, unclipped: one probe's estimate is noisy and often
negative, and only the allocator's average over probes is clipped at 0. The render-space components that
every step reports for free are a poor proxy here: their within/between ratio is tens of times the
parameter-space one (the render's Jacobian averages the per-pixel noise of the teacher's residual
away far more than the differences between views), so an accountant reading them picks ``K = k_max``
where ``K ~ 3-4`` is best (``carv bench text-to-3d`` measures both).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from carv._machine import loadavg, machine_info, set_threads
from carv._plotting import save_image_grid
from carv._progress import progress_bar
from carv._runfolder import CorruptFileError, RunFolder, RunState, atomic_write_json, load_tensors, save_figure
from carv._validate import (
    SEARCH_MAX,
    check_field_types,
    check_finite_parameters,
    check_int,
    check_lr,
    check_positive_int,
    check_seed,
    check_steps,
    check_threads,
)
from carv.accounting import Allocator, ComponentProbe, CostMeter, VarianceComponents, equal_quality_ecm, timed_estimate
from carv.objectives.sds import ScoreDistillation, SDSOutput
from carv.objectives.weighting import weight_table
from carv.render import (
    VoxelGrid,
    cameras_from_unit,
    get_scene,
    opaque_loss,
    random_cameras,
    render,
    sparsity_loss,
    turntable_cameras,
)
from carv.render.cameras import Cameras
from carv.teachers.scenes import BACKGROUND, RENDER_SETTINGS, load_scenes_teacher, teacher_cond
from carv.teachers.unet import UNetTeacher, weights_digest
from carv.timesteps import STRATIFY_MODES, LearnedProposal, TimestepSampler, annealed_range
from carv.upstream import UPSTREAM_MODES, UpstreamSampler

__all__ = [
    "DEFAULT_PROMPT",
    "METHODS",
    "PROPOSALS",
    "TextTo3DConfig",
    "SceneProblem",
    "problem_for",
    "Trainer",
    "run_text_to_3d",
]

DEFAULT_PROMPT = "a red mushroom"
METHODS = ("carv", "baseline")
PROPOSALS = ("none", "weight", "learned")
EVAL_SEED = 20_251_127  # held-out cameras: never drawn by a training generator (those are seeded by `seed`)
# config fields a resumed run may change (they do not change what a step computes)
RESUMABLE_CHANGES = ("steps", "budget_s", "checkpoint_every", "eval_every_s", "threads")
STEP_BUDGETS = ("baseline", "free")  # or a number of seconds per step
COMPARE_AT = ("step", "wall-clock")


@dataclass
class TextTo3DConfig:
    """One text-to-3D run. ``method`` picks the estimator preset; ``None`` fields take the preset's value.

    ``carv``: learned proposal (weight-table prior), per-upstream stratification, ``K`` from the
    accountant. ``baseline``: uniform timesteps, no stratification, ``K = 1``.
    """

    prompt: str = DEFAULT_PROMPT
    method: str = "carv"
    steps: int = 400  # 300 with the earlier (prompt, view) teacher; 400 gives the stem its full opacity (BENCHMARKS.md)
    budget_s: float | None = None  # also stop once this many seconds of training (step) time are spent
    # the estimator
    R: int = 2  # renders per step (with the accountant's budget: the plain step's R, which sets the budget)
    K: int | None = None  # None: carv -> the accountant chooses; baseline -> 1
    # the accountant's per-step budget: "baseline" (the plain estimator's measured step: R renders, K = 1),
    # a number of seconds, or "free" (K only, at fixed R: the old AutoK)
    step_budget: str | float = "baseline"
    r_max: int = 8
    upstream: str | None = None  # cameras: None -> carv "lattice" (shifted lattice across steps), baseline "iid"
    proposal: str | None = None  # None: carv -> "learned", baseline -> "none"
    stratify: str | None = None  # None: carv -> "per_upstream", baseline -> "none"
    floor: float = 0.1
    proposal_every: int = 10
    k_init: int = 4
    k_max: int = 16
    accountant_every: int = 20  # steps between re-choices of K
    probe_every: int = 10  # steps between parameter-space variance probes (2 extra backward passes each)
    guidance_scale: float = 3.0  # the teacher's own sampling guidance; 7.5-15 oversaturate and add floaters
    guidance_end: float | None = None  # guidance moves linearly from guidance_scale to this at anneal_steps
    # the objective's timestep range, as fractions of T (threestudio's min/max_step_percent): (t_lo, t_hi) at
    # step 0, moving linearly to (t_lo_end, t_hi_end) at step anneal_steps (None: no annealing)
    # (default: U{20..980} at step 0 narrowing to U{20..400} at step 200, then fixed: the high-noise steps shape the
    # silhouette early, the low-noise ones the details; measured in BENCHMARKS.md, "Text-to-3D quality")
    t_lo: float = 0.02
    t_hi: float = 0.98
    t_lo_end: float | None = 0.02
    t_hi_end: float | None = 0.4
    anneal_steps: int = 200
    # elevation range (degrees) of the training cameras; the held-out views keep the teacher's 0-40 (default: the
    # same 0-40, which the camera-conditioned teacher knows; 15-25 was better for the earlier (prompt, view) teacher)
    elev_lo: float = 0.0
    elev_hi: float = 40.0
    # the scene representation and the renderer
    grid_resolution: int = 48
    # coarse-to-fine: train a coarse_resolution^3 grid for the first coarse_steps steps, then upsample it
    # (trilinearly, Adam's moments too) to grid_resolution^3; None: grid_resolution from the start
    coarse_resolution: int | None = None
    coarse_steps: int = 100
    render_size: int = 64
    n_samples: int = 48
    init_blob: float = 5.0  # peak raw density of the initial blob (0: start from an empty grid)
    init_radius: float = 0.85  # radius of the initial blob (the grid spans [-1, 1]^3)
    init_center_z: float = 0.0  # height of the blob's centre (the scenes stand on the floor z = -0.75)
    init_height: float | None = None  # the blob's vertical semi-axis (None: init_radius, a ball)
    init_color: float = 0.5  # every voxel's colour at step 0 (grey level in (0, 1); 0.5 is the background's grey)
    lr: float = 0.1
    lr_end: float | None = None  # Adam's learning rate decays geometrically from lr to lr_end at anneal_steps
    color_lr_scale: float = 1.0  # the colour's learning rate is this times the density's (lr_at(step) * scale)
    # Adam's beta2 (beta1 is 0.9): how long a voxel remembers its past gradient sizes, about 1 / (1 - beta2) steps
    # (default 0.99, not torch's 0.999, which averages over ~1000 steps, longer than the run; measured in BENCHMARKS.md)
    adam_beta2: float = 0.99
    # with --compare: the baseline's own learning rate (None: lr, one rule for both); lets each estimator run at
    # the rate tuned for it on a common grid (a lower-variance gradient can afford a longer step)
    baseline_lr: float | None = None
    tv_weight: float = 0.0
    # opacity regularisers on the training renders, per pixel in the units of the SDS gradient (see
    # Trainer.regulariser): sparsity charges opacity (no background-coloured haze), opaque its binary entropy
    # (default 0: with the camera-conditioned teacher the penalty erodes the mushroom's thin stem, mask IoU 0.897
    # at 0.03 against 0.930 without; it removed background-grey haze for the earlier (prompt, view) teacher, where
    # 0.03 from step 100 was the default; measured in BENCHMARKS.md)
    sparsity_weight: float = 0.0
    # the sparsity schedule: 0 before step sparsity_start, then sparsity_weight, moving linearly to sparsity_end at
    # anneal_steps when that is given (sparsity_start 100: none while the shape forms)
    sparsity_end: float | None = None
    sparsity_start: int = 100
    opaque_weight: float = 0.0
    # the run folder
    eval_every_s: float = 20.0  # training seconds between quality evaluations (16 held-out views)
    n_eval_views: int = 16
    checkpoint_every: int = 50
    seed: int = 0
    threads: int | None = None
    # a local diffusers Stable Diffusion folder: latent SDS (render -> VAE encode -> SDS), see carv.apps.latent_sds
    teacher: str | None = None
    # a finished text-to-3d run folder whose newest checkpoint is the objective's reference solution (e.g. a
    # long, low-variance run): every evaluation also reports psnr_ref / iou_ref against its held-out renders
    reference: str | None = None

    # ---------------------------------------------------------------- presets
    @property
    def resolved_proposal(self) -> str:
        return self.proposal if self.proposal is not None else ("learned" if self.method == "carv" else "none")

    @property
    def resolved_stratify(self) -> str:
        return self.stratify if self.stratify is not None else ("per_upstream" if self.method == "carv" else "none")

    @property
    def resolved_upstream(self) -> str:
        return self.upstream if self.upstream is not None else ("lattice" if self.method == "carv" else "iid")

    @property
    def auto_k(self) -> bool:
        return self.K is None and self.method == "carv"

    @property
    def initial_k(self) -> int:
        if self.K is not None:
            return self.K
        return self.k_init if self.method == "carv" else 1

    def t_range(self, step: int, num_timesteps: int = 1000) -> tuple[int, int]:
        """The objective's timestep support ``(t_min, t_max)`` at optimisation step ``step``."""
        end = None if self.t_lo_end is None or self.t_hi_end is None else (self.t_lo_end, self.t_hi_end)
        try:
            return annealed_range(step, num_timesteps, (self.t_lo, self.t_hi), end, self.anneal_steps)
        except ValueError as e:
            raise ValueError(f"t_lo, t_hi, t_lo_end, t_hi_end: {e} (t_lo={self.t_lo!r}, t_hi={self.t_hi!r}, "
                             f"t_lo_end={self.t_lo_end!r}, t_hi_end={self.t_hi_end!r})") from None

    def guidance_at(self, step: int) -> float:
        """The classifier-free guidance scale at optimisation step ``step``: linear from ``guidance_scale`` at step 0
        to ``guidance_end`` at ``anneal_steps`` and constant after (``guidance_scale`` when ``guidance_end`` is
        None)."""
        if self.guidance_end is None:
            return float(self.guidance_scale)
        a = min(step / self.anneal_steps, 1.0)
        return (1 - a) * float(self.guidance_scale) + a * float(self.guidance_end)

    def lr_at(self, step: int) -> float:
        """Adam's learning rate at optimisation step ``step``: ``lr (lr_end / lr) ** min(step / anneal_steps, 1)``
        (a geometric decay that stays at ``lr_end`` after ``anneal_steps``), or ``lr`` when ``lr_end`` is None."""
        if self.lr_end is None:
            return float(self.lr)
        return float(self.lr) * (float(self.lr_end) / float(self.lr)) ** min(step / self.anneal_steps, 1.0)

    def sparsity_at(self, step: int) -> float:
        """The sparsity weight at optimisation step ``step``: 0 before ``sparsity_start``; then ``sparsity_weight``
        (``sparsity_end`` None), or linear from ``sparsity_weight`` at ``sparsity_start`` to ``sparsity_end`` at
        ``anneal_steps`` and constant after."""
        if step < self.sparsity_start:
            return 0.0
        if self.sparsity_end is None:
            return float(self.sparsity_weight)
        span = max(self.anneal_steps - self.sparsity_start, 1)
        a = min((step - self.sparsity_start) / span, 1.0)
        return (1 - a) * float(self.sparsity_weight) + a * float(self.sparsity_end)

    def identity(self) -> dict:
        """The configuration with the presets resolved, so that a default spelled out equals the default
        (``--proposal learned`` is the carv run's own proposal); what run folders and checkpoints compare."""
        d = asdict(self)
        d.update(proposal=self.resolved_proposal, stratify=self.resolved_stratify, upstream=self.resolved_upstream,
                 K=self.K if self.K is not None else ("auto" if self.method == "carv" else 1))
        return d

    def validate(self) -> None:
        check_field_types(self)  # a mistyped config value is named before anything else looks at it
        get_scene(self.prompt)  # ValueError listing the allowed prompts
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        check_int(self.sparsity_start, "sparsity_start", 0, None if self.sparsity_end is None else self.anneal_steps)
        for name in ("steps", "R", "r_max", "proposal_every", "k_init", "k_max", "accountant_every", "probe_every",
                     "grid_resolution", "anneal_steps", "coarse_steps",
                     "render_size", "n_samples", "n_eval_views", "checkpoint_every"):
            check_positive_int(getattr(self, name), name)
        check_steps(self.steps)
        check_seed(self.seed)
        # sizes beyond these would only end in an allocator error (a 512^3 grid with Adam is 4 GB)
        for name, hi in (("grid_resolution", 256), ("render_size", 512), ("n_samples", 1024),
                         ("n_eval_views", 256), ("R", 4096), ("K", 10**7), ("k_max", SEARCH_MAX)):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, 1, hi)
        if self.K is not None:
            check_positive_int(self.K, "K")
        if self.threads is not None:
            check_threads(self.threads)
        if self.grid_resolution < 4:
            raise ValueError(f"grid_resolution: expected an integer >= 4, got {self.grid_resolution}")
        if self.coarse_resolution is not None:
            check_int(self.coarse_resolution, "coarse_resolution", 4, self.grid_resolution)
        if self.render_size < 32 or self.render_size % 32:
            raise ValueError(f"render_size: expected a multiple of the teacher's 32 px (32, 64, 96, ...), "
                             f"got {self.render_size}")
        if self.resolved_proposal not in PROPOSALS:
            raise ValueError(f"proposal: expected one of {PROPOSALS}, got {self.proposal!r}")
        allowed = tuple(m for m in STRATIFY_MODES if m != "grid")
        if self.resolved_stratify not in allowed:
            raise ValueError(f"stratify: expected one of {allowed} ('grid' is biased), got {self.stratify!r}")
        if not (isinstance(self.floor, (int, float)) and 0 < self.floor <= 1):
            raise ValueError(f"floor: expected a number in (0, 1], got {self.floor!r}")
        if not self.k_init <= self.k_max or self.k_init < 2:
            raise ValueError(f"k_init, k_max: need 2 <= k_init <= k_max, got k_init={self.k_init}, k_max={self.k_max}")
        if self.auto_k and self.R > self.r_max:
            raise ValueError(f"R, r_max: need R <= r_max with the accountant, got R={self.R}, r_max={self.r_max}")
        sb = self.step_budget
        if not (sb in STEP_BUDGETS or (isinstance(sb, (int, float)) and not isinstance(sb, bool)
                                       and math.isfinite(sb) and sb > 0)):
            raise ValueError(f"step_budget: expected one of {STEP_BUDGETS} or a positive number of seconds, "
                             f"got {sb!r}")
        if self.resolved_upstream not in UPSTREAM_MODES:
            raise ValueError(f"upstream: expected one of {UPSTREAM_MODES}, got {self.upstream!r}")
        if self.auto_k and self.probe_every < 2:
            raise ValueError(f"probe_every: the accountant needs ordinary steps between probes (>= 2), "
                             f"got {self.probe_every}")
        for name in ("guidance_scale", "tv_weight", "init_blob", "sparsity_weight", "opaque_weight") + (
                ("guidance_end",) if self.guidance_end is not None else ()) + (
                ("sparsity_end",) if self.sparsity_end is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite non-negative number, got {v!r}")
        for name in ("lr", "eval_every_s", "init_radius", "color_lr_scale") + tuple(
                n for n in ("lr_end", "init_height", "baseline_lr") if getattr(self, n) is not None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        for name in ("lr", *(n for n in ("lr_end", "baseline_lr") if getattr(self, n) is not None)):
            check_lr(getattr(self, name), name)
        b = self.adam_beta2
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
            raise ValueError(f"adam_beta2: expected a number strictly between 0 and 1, got {b!r}")
        z = self.init_center_z
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not -1 <= z <= 1:
            raise ValueError(f"init_center_z: expected a height inside the grid's box [-1, 1], got {z!r}")
        if isinstance(self.init_color, bool) or not isinstance(self.init_color, (int, float)) or not (
                0 < self.init_color < 1):
            raise ValueError(f"init_color: expected a grey level strictly between 0 and 1, got {self.init_color!r}")
        for name in ("elev_lo", "elev_hi"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -90 < v < 90:
                raise ValueError(f"{name}: expected an elevation in degrees strictly between -90 and 90, got {v!r}")
        if self.elev_lo > self.elev_hi:
            raise ValueError(f"elev_lo, elev_hi: need elev_lo <= elev_hi, got {self.elev_lo}, {self.elev_hi}")
        self.t_range(0)  # ValueError naming the bad fraction
        if (self.t_lo_end is None) != (self.t_hi_end is None):
            raise ValueError(f"t_lo_end, t_hi_end: give both ends of the annealed range or neither, got "
                             f"t_lo_end={self.t_lo_end!r}, t_hi_end={self.t_hi_end!r}")
        if self.t_lo_end is not None:
            self.t_range(self.anneal_steps)
        if self.teacher is not None:
            from carv.apps.latent_sds import check_sd_folder

            check_sd_folder(self.teacher)
        if self.reference is not None:
            reference_checkpoint(self.reference)  # ValueError naming `reference`
        if self.budget_s is not None and (isinstance(self.budget_s, bool) or not isinstance(self.budget_s, (int, float))
                                          or not math.isfinite(self.budget_s) or not self.budget_s > 0):
            raise ValueError(f"budget_s: expected a positive number of seconds or None, got {self.budget_s!r}")
        check_render_memory(self)


# peak bytes per ray sample of the volume renderer (float32, CPU): measured about 75 with gradients (a training
# render and its backward) and 50 without (evaluation, turntable) at 128-256 px, 96-256 samples per ray
RENDER_BYTES_PER_SAMPLE = {"train": 80, "eval": 56}


def check_render_memory(cfg: TextTo3DConfig) -> None:
    """Refuse, before anything is written, a configuration whose largest render (a training step's ``R`` views
    with gradients, up to ``r_max`` when the accountant sets ``R``; the held-out views; the turntable) cannot fit
    the free memory, naming the flags that set its size."""
    from carv._machine import check_fits

    S2N = cfg.render_size ** 2 * cfg.n_samples
    R = max(cfg.R, cfg.r_max) if cfg.auto_k else cfg.R
    need = {"a training step": R * S2N * RENDER_BYTES_PER_SAMPLE["train"],
            "the evaluation": max(cfg.n_eval_views, 16) * S2N * RENDER_BYTES_PER_SAMPLE["eval"]}
    what = max(need, key=need.get)
    views = f"{R} views" if what == "a training step" else f"{max(cfg.n_eval_views, 16)} views"
    check_fits(need[what], "cpu", "render_size, n_samples (--render-size, --n-samples, --R)",
               f"{what} renders {views} x {cfg.render_size}^2 rays x {cfg.n_samples} samples per ray, which")


def reference_checkpoint(path: str | Path, what: str = "reference") -> Path:
    """The newest checkpoint file of a text-to-3d run folder; ValueError naming the argument ``what``."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{what}: expected a text-to-3d run folder, got {str(path)!r} (not a directory)")
    files = RunState(folder).checkpoints()  # numerically: checkpoint-10000000 is newer than checkpoint-9999999
    if not files:
        raise ValueError(f"{what}: {str(path)!r} holds no checkpoint-*.safetensors (not a text-to-3d run "
                         f"folder, or the run has not saved yet)")
    return files[0]


def load_run_grid(path: str | Path, what: str = "reference") -> tuple[VoxelGrid, dict]:
    """``(grid, state)`` of a text-to-3d run folder's newest checkpoint that verifies (checksummed), read-only.

    Unlike :meth:`carv._runfolder.RunState.load` (which resumes a run: it rewrites ``metrics.jsonl`` to the
    checkpoint and renames damaged files) this leaves the folder as it is, for reading someone else's run
    (a reference solution, a figure). ``what`` names the argument in errors."""
    reference_checkpoint(path, what)  # a folder with checkpoints, or a clear error
    bad = []
    for f in RunState(path).checkpoints():
        try:
            tensors, meta = load_tensors(f)
        except CorruptFileError as e:
            bad.append(str(e))
            continue
        if "grid.density" not in tensors or "grid.color" not in tensors:
            raise ValueError(f"{what}: {str(f)!r} is not a text-to-3d checkpoint (no grid.density / grid.color)")
        density = tensors["grid.density"]
        grid = VoxelGrid(int(density.shape[-1]), bound=1.0)
        with torch.no_grad():
            grid.density.copy_(density)
            grid.color.copy_(tensors["grid.color"])
        return grid, json.loads(meta.get("state", "{}"))
    raise ValueError(f"{what}: no checkpoint in {str(path)!r} verifies ({'; '.join(bad)})")


def load_reference_grid(path: str | Path) -> VoxelGrid:
    """The voxel grid of a run folder's newest good checkpoint, as a reference solution (``reference``)."""
    return load_run_grid(path, "reference")[0]


# --------------------------------------------------------------------------- the pipeline
class SceneProblem:
    """Teacher + prompt + renderer settings + held-out views: everything a step or an evaluation needs.

    Stateless with respect to the grid, so one problem serves several runs (and the benchmark).
    """

    def __init__(self, prompt: str, teacher: UNetTeacher | None = None, render_size: int = 64, n_samples: int = 48,
                 guidance_scale: float = 3.0, n_eval_views: int = 16, clock: Callable[[], float] = time.perf_counter,
                 t_range: tuple[int, int] | None = None, train_elevation: tuple[float, float] | None = None):
        self.clock = clock  # times the stages and the runs' training time (the benchmark uses CPU time)
        # the objective's timestep support and training-camera elevations when not given per call (the
        # benchmark's samplers and cameras); None: the full range / the teacher's elevations
        self.t_range, self.train_elevation = t_range, train_elevation
        self.scene = get_scene(prompt)
        self.prompt = self.scene.prompt
        self.teacher = teacher if teacher is not None else load_scenes_teacher()
        self.prompts = list(self.teacher.meta.get("prompts", []))
        if self.prompt not in self.prompts:
            raise ValueError(f"prompt: the teacher was not trained on {prompt!r}; allowed prompts: {self.prompts}")
        self.image_size = int(self.teacher.meta.get("render", {}).get("image_size", RENDER_SETTINGS["image_size"]))
        if render_size % self.image_size:
            raise ValueError(f"render_size: must be a multiple of the teacher's {self.image_size} px, "
                             f"got {render_size}")
        self.render_size, self.n_samples = render_size, n_samples
        self.guidance_scale = float(guidance_scale)
        self.schedule = self.teacher.schedule
        self.T = self.schedule.num_timesteps
        self.w = weight_table("sds", self.schedule)
        rs = RENDER_SETTINGS
        self.elevation_range = tuple(rs["elevation_range"])
        self.radius, self.fov = float(rs["radius"]), float(rs["fov_deg"])
        # held-out views: fixed cameras from their own seed, ground truth made like the teacher's data
        self.eval_cameras = random_cameras(n_eval_views, torch.Generator().manual_seed(EVAL_SEED),
                                           self.elevation_range, self.radius, self.fov)
        with torch.no_grad():
            gt = render(self.scene.bake(rs["bake_resolution"]), self.eval_cameras, self.image_size,
                        n_samples=rs["n_samples"], bound=self.scene.aabb, background=BACKGROUND,
                        supersample=rs["supersample"])
        self.gt_rgb, self.gt_opacity = gt.rgb, gt.opacity
        self.ref_rgb: Tensor | None = None  # a reference solution's held-out renders (set_reference)
        self.ref_opacity: Tensor | None = None

    @torch.no_grad()
    def set_reference(self, grid: VoxelGrid | None) -> None:
        """Evaluate also against ``grid``'s held-out renders (``psnr_ref``, ``iou_ref``): the distance to the
        objective's own solution (a long, low-variance run), not to the ground truth (None: stop)."""
        if grid is None:
            self.ref_rgb = self.ref_opacity = None
            return
        x, self.ref_opacity = self.render(grid, self.eval_cameras)
        self.ref_rgb = (x + 1.0) / 2.0

    # ---------------------------------------------------------------- pieces
    def new_grid(self, resolution: int, init_blob: float, init_radius: float = 0.5,
                 init_color: float = 0.5, init_center_z: float = 0.0, init_height: float | None = None) -> VoxelGrid:
        """A fresh grid: an initial density blob (``init_blob`` peak raw density, 0 for none; an ellipsoid of
        horizontal radius ``init_radius`` and vertical semi-axis ``init_height`` centred at height
        ``init_center_z``) and every voxel's colour ``init_color`` (a grey level in (0, 1); the raw colour is its
        logit)."""
        grid = VoxelGrid(resolution, bound=1.0)
        if init_blob > 0:
            grid.add_blob_(radius=init_radius, peak=init_blob, center_z=init_center_z, height=init_height)
        if init_color != 0.5:
            with torch.no_grad():
                grid.color.fill_(math.log(init_color / (1.0 - init_color)))
        return grid

    def sampler(self, proposal: str, stratify: str, floor: float, learned: LearnedProposal | None = None,
                t_min: int | None = None, t_max: int | None = None) -> TimestepSampler:
        """The timestep sampler of a method (the tables come from the library; nothing is reimplemented).

        ``t_min, t_max`` default to the problem's ``t_range`` (the objective's support) or the full range."""
        if t_min is None and t_max is None and self.t_range is not None:
            t_min, t_max = self.t_range
        t_min = 0 if t_min is None else t_min
        if proposal == "none":
            return TimestepSampler(self.T, t_min, t_max, stratify=stratify)
        if proposal == "weight":
            return TimestepSampler(self.T, t_min, t_max, importance=self.w, floor=floor, stratify=stratify)
        if proposal == "learned":
            imp = learned.importance() if learned is not None else self.w
            return TimestepSampler(self.T, t_min, t_max, importance=imp, floor=floor, stratify=stratify)
        raise ValueError(f"proposal: expected one of {PROPOSALS}, got {proposal!r}")

    def sds(self, sampler: TimestepSampler, K: int) -> ScoreDistillation:
        return ScoreDistillation(self.teacher, sampler, K=K, weighting="sds", guidance_scale=self.guidance_scale)

    def cameras(self, R: int, generator: torch.Generator, upstream: UpstreamSampler | None = None,
                elevation_range: tuple[float, float] | None = None) -> Cameras:
        """``R`` training cameras: iid (``upstream=None``), or spread by a :class:`carv.upstream.UpstreamSampler`
        over (azimuth, elevation) with each camera still uniform (each step's estimate stays unbiased).
        Elevations span ``elevation_range`` (default: the problem's ``train_elevation``, else the teacher's
        training range, which the held-out views use)."""
        el = elevation_range or self.train_elevation or self.elevation_range
        if upstream is None:
            return random_cameras(R, generator, el, self.radius, self.fov)
        return cameras_from_unit(upstream.draw(R, generator), el, self.radius, self.fov)

    def render(self, grid: VoxelGrid, cameras: Cameras, generator: torch.Generator | None = None,
               render_size: int | None = None, n_samples: int | None = None) -> tuple[Tensor, Tensor]:
        """``(x [B, 3, 32, 32] in [-1, 1], opacity [B, 1, 32, 32])``: render at ``render_size`` on the grey
        background, then area-resize to the teacher's size. ``generator`` jitters the samples along rays."""
        size = render_size or self.render_size
        out = render(grid, cameras, size, n_samples=n_samples or self.n_samples, bound=grid.bound,
                     background=BACKGROUND, generator=generator)
        rgb, opacity = out.rgb, out.opacity
        if size != self.image_size:
            rgb = F.interpolate(rgb, size=(self.image_size, self.image_size), mode="area")
            opacity = F.interpolate(opacity, size=(self.image_size, self.image_size), mode="area")
        return rgb * 2.0 - 1.0, opacity

    def teacher_input(self, grid: VoxelGrid, cameras: Cameras, generator: torch.Generator | None = None,
                      render_size: int | None = None, n_samples: int | None = None) -> tuple[Tensor, Tensor]:
        """``(what the teacher sees, opacity)``: here the renders of :meth:`render` (a latent teacher encodes
        them)."""
        return self.render(grid, cameras, generator, render_size, n_samples)

    def condition(self, cameras: Cameras) -> dict[str, Any]:
        """The teacher's condition per view: ``{"cond": ...}`` (and ``"uncond"`` for per-view negatives)."""
        return {"cond": teacher_cond(self.teacher, self.prompt, cameras)}

    def gradient(self, grid: VoxelGrid, sds: ScoreDistillation, R: int, generator: torch.Generator,
                 render_size: int | None = None, n_samples: int | None = None, probe: bool = False,
                 meter: CostMeter | None = None, upstream: UpstreamSampler | None = None,
                 regulariser: Callable[[Tensor], Tensor] | None = None,
                 elevation_range: tuple[float, float] | None = None,
                 ) -> tuple[SDSOutput, dict[str, float], VarianceComponents | None]:
        """One SDS gradient step's worth of work: ``R`` renders, ``R K`` teacher draws, one backward.

        Accumulates the SDS gradient into ``grid``'s ``.grad`` and returns the SDS output, the seconds
        spent in the stages (``upstream``: render + backward, ``draw``: the SDS call, ``probe``; also recorded
        in ``meter`` when given, per render and per draw) and, with
        ``probe=True``, the variance components of the *parameter* gradient from two extra backward
        passes (:class:`carv.accounting.ComponentProbe`; needs ``R >= 2``, ``K >= 2``), else None.

        ``regulariser``: a function of the renders' opacity ``[R, 1, 32, 32]`` whose value is added to the
        surrogate loss before its one backward pass (a deterministic term of the objective: it is exact
        for the drawn cameras, so it adds no timestep/noise variance; the probe measures the SDS part).
        """
        cams = self.cameras(R, generator, upstream, elevation_range)  # camera sampling: negligible
        cond = self.condition(cams)
        held: dict[str, Tensor] = {}

        def renders() -> Tensor:
            x, held["opacity"] = self.teacher_input(grid, cams, generator, render_size, n_samples)
            return x

        def objective(x: Tensor) -> SDSOutput:
            out = sds(x, cond["cond"], generator, keep_draws=probe, uncond=cond.get("uncond"))
            if regulariser is not None:
                out.loss = out.loss + regulariser(held["opacity"])
            return out

        x, out, secs = timed_estimate(renders, objective, sds.K, meter, clock=self.clock, retain_graph=probe)
        t3 = self.clock()
        comps = None
        if probe:
            # signed: the allocator averages many probes
            comps = ComponentProbe(R, sds.K).measure(x, [grid.density, grid.color], out.estimate.draws, generator)
            out.estimate.draws = None
        secs["probe"] = self.clock() - t3
        return out, secs, comps

    @torch.no_grad()
    def evaluate(self, grid: VoxelGrid) -> dict[str, float]:
        """PSNR (dB, colour in [0, 1], MSE pooled over the held-out views) and mask IoU (opacity > 0.5) against
        the ground truth; with a reference (:meth:`set_reference`) also ``psnr_ref`` / ``iou_ref`` against it."""
        x, opacity = self.render(grid, self.eval_cameras)
        rgb = (x + 1.0) / 2.0
        psnr, iou, mse = _psnr_iou(rgb, opacity, self.gt_rgb, self.gt_opacity)
        row = {"psnr": psnr, "iou": iou, "mse": mse}
        if self.ref_rgb is not None:
            row["psnr_ref"], row["iou_ref"], _ = _psnr_iou(rgb, opacity, self.ref_rgb, self.ref_opacity)
        return row


def _psnr_iou(rgb: Tensor, opacity: Tensor, rgb_true: Tensor, opacity_true: Tensor) -> tuple[float, float, float]:
    mse = float((rgb - rgb_true).pow(2).mean())
    pred, true = opacity > 0.5, opacity_true > 0.5
    union = int((pred | true).sum())
    iou = float((pred & true).sum()) / union if union else 1.0
    return -10.0 * math.log10(max(mse, 1e-12)), iou, mse


def problem_for(cfg: TextTo3DConfig, teacher: UNetTeacher | None = None,
                clock: Callable[[], float] = time.perf_counter) -> SceneProblem:
    """The :class:`SceneProblem` of a configuration: its renderer, guidance, held-out views, and the
    objective's timestep range (at step 0) and training elevations as the problem's defaults. With
    ``cfg.teacher`` (a Stable Diffusion folder) it is :class:`carv.apps.latent_sds.LatentSceneProblem`, and
    ``teacher`` is that teacher already loaded (or None)."""
    kw = dict(t_range=cfg.t_range(0), train_elevation=(cfg.elev_lo, cfg.elev_hi))
    if cfg.teacher is not None:
        from carv.apps.latent_sds import LatentSceneProblem, load_sd_teacher

        sd = teacher if teacher is not None else load_sd_teacher(cfg.teacher)
        return LatentSceneProblem(cfg.prompt, sd, cfg.render_size, cfg.n_samples, cfg.guidance_scale,
                                  cfg.n_eval_views, clock, **kw)
    return SceneProblem(cfg.prompt, teacher, cfg.render_size, cfg.n_samples, cfg.guidance_scale, cfg.n_eval_views,
                        clock, **kw)


def _grid_grad(grid: VoxelGrid) -> Tensor:
    return torch.cat([grid.density.grad.reshape(-1), grid.color.grad.reshape(-1)])


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
                get_scene(cfg.prompt).prompt, cfg.render_size, cfg.n_samples, float(cfg.guidance_scale)):
            raise ValueError("problem: its prompt / render_size / n_samples / guidance_scale differ from the config's")
        self.grid = p.new_grid(self.resolution_at(0), cfg.init_blob, cfg.init_radius, cfg.init_color,
                               cfg.init_center_z, cfg.init_height)
        self.opt = self.new_optimiser(self.grid)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.learned = LearnedProposal(p.T, num_bins=50, prior=p.w) if cfg.resolved_proposal == "learned" else None
        self.sds = p.sds(p.sampler(cfg.resolved_proposal, cfg.resolved_stratify, cfg.floor, self.learned),
                         cfg.initial_k)
        # the importance table the sampler uses now (refreshed from the learned proposal every proposal_every steps)
        self.importance = p.w.clone() if cfg.resolved_proposal in ("weight", "learned") else None
        self.alloc: Allocator | None = None
        if cfg.auto_k:
            budget = None if cfg.step_budget == "free" else cfg.step_budget
            free = budget is None  # free budget: K only, at the fixed R (the old AutoK)
            # with a budget the run starts at R = 1, K = k_init until the first re-choice: within the plain
            # step's cost 2 (c_up + c_draw) whenever c_up >= (k_init - 2) c_draw
            self.alloc = Allocator(budget, baseline=(cfg.R, 1), r_range=(cfg.R, cfg.R) if free else (1, cfg.r_max),
                                   k_range=(2 if free else 1, cfg.k_max), r_init=cfg.R if free else 1,
                                   k_init=cfg.k_init,
                                   every=cfg.accountant_every, warmup=3, window=9, probe_every=cfg.probe_every)
        # training cameras: iid, or spread across the renders of a step and across steps (carv.upstream)
        self.upstream = (UpstreamSampler(2, cfg.resolved_upstream, generator=self.generator)
                         if cfg.resolved_upstream != "iid" else None)
        self.R = self.alloc.R if self.alloc is not None else cfg.R
        self.meter = CostMeter()
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
        t0 = p.clock()
        if self.grid.resolution != self.resolution_at(self.step_count):  # coarse-to-fine
            self.upsample(self.resolution_at(self.step_count))
        self.opt.zero_grad(set_to_none=True)
        probe = self.alloc is not None and self.alloc.probe_due()
        if self.alloc is not None:  # a probe step runs at R, K >= 2 (its extra cost is charged by the allocator)
            R, K = self.alloc.probe_shape() if probe else (self.alloc.R, self.alloc.K)
            self.sds.K = K
        else:
            R, K = self.R, self.sds.K
        self.sds.sampler.set_t_range(*cfg.t_range(self.step_count, p.T))  # the objective at this step
        self.set_lr(self.step_count)
        self.sds.guidance_scale = cfg.guidance_at(self.step_count)
        # probe steps draw iid cameras: the allocator needs the between-render variance one step pays
        out, secs, comps = p.gradient(self.grid, self.sds, R, self.generator, probe=probe,
                                      upstream=None if probe else self.upstream, regulariser=self.regulariser,
                                      elevation_range=(cfg.elev_lo, cfg.elev_hi))
        t1 = p.clock()
        if cfg.tv_weight > 0:
            (cfg.tv_weight * self.grid.tv_loss()).backward()
        self.opt.step()
        check_finite_parameters(self.grid.parameters(), "lr", self.opt.param_groups[0]["lr"])
        t2 = p.clock()
        # the optimiser step is a per-step cost: charge it to the renders of the step
        self.meter.add("upstream", secs["upstream"] + (t2 - t1), count=R)
        self.meter.add("draw", secs["draw"], count=R * K)
        if probe:
            self.meter.add("probe", secs["probe"])
        est = out.estimate
        if self.learned is not None:
            self.learned.update(out.draws.t, est.sq_norms)
        self.step_count += 1
        if self.learned is not None and self.step_count % cfg.proposal_every == 0:
            self.importance = self.learned.importance()
            self.sds.sampler.set_importance(self.importance)
        if self.alloc is not None:
            if comps is not None:  # parameter-space components: the accountant's input (probe steps only)
                self.alloc.observe(comps.between, comps.within)
            self.R, self.sds.K = self.alloc.step(self.meter)
        self.elapsed += p.clock() - t0
        row = {"kind": "step", "step": self.step_count, "elapsed_s": self.elapsed, "R": R, "K": K, "probe": probe,
               "next_R": self.R, "next_K": self.sds.K, "between_x": est.between, "within_x": est.within,
               "grad_x_norm": float(out.grad.norm()), "step_s": p.clock() - t0}
        if comps is not None:
            row.update(between_param=comps.between, within_param=comps.within, probe_s=secs["probe"])
        return row

    def evaluate(self) -> dict[str, Any]:
        row = {"kind": "eval", "step": self.step_count, "elapsed_s": self.elapsed, **self.problem.evaluate(self.grid)}
        self.evals.append(row)
        return row

    def eval_due(self) -> bool:
        return self.elapsed >= self.next_eval

    def mark_evaluated(self) -> None:
        """The next evaluation at the first multiple of ``eval_every_s`` after now (one jump, not a loop: with
        a tiny ``eval_every_s`` a loop of additions would take ``elapsed / eval_every_s`` iterations)."""
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
        if self.importance is not None:
            tensors["sampler.importance"] = self.importance
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
        diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
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
        if self.importance is not None:
            self.importance = tensors["sampler.importance"].to(torch.float64)
            self.sds.sampler.set_importance(self.importance)
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


# --------------------------------------------------------------------------- images and plots
@torch.no_grad()
def turntable(problem: SceneProblem, grid: VoxelGrid | None, n: int = 8, elevation: float = 20.0) -> Tensor:
    """``[n, 3, S, S]`` in [0, 1] turntable views of ``grid`` (or of the ground truth when ``grid`` is None)."""
    cams = turntable_cameras(n, elevation, problem.radius, problem.fov)
    S = problem.render_size
    if grid is None:
        rs = RENDER_SETTINGS
        return render(problem.scene.bake(rs["bake_resolution"]), cams, S, bound=problem.scene.aabb,
                      n_samples=rs["n_samples"] * S // problem.image_size, background=BACKGROUND).rgb
    return render(grid, cams, S, n_samples=problem.n_samples, bound=grid.bound, background=BACKGROUND).rgb


def plot_quality_curves(curves: dict[str, list[dict]], path: str | Path, title: str = "", x: str = "elapsed_s") -> None:
    """PSNR and mask IoU against training seconds (``x="elapsed_s"``) or optimisation steps (``x="step"``),
    one line per run (``curves[name]`` = eval rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for i, (name, rows) in enumerate(curves.items()):
        xs = [r[x] for r in rows]
        for ax, key in zip(axs, ("psnr", "iou"), strict=True):
            ax.plot(xs, [r[key] for r in rows], "o-", ms=3, color=f"C{i}", label=name)
    axs[0].set_ylabel("PSNR on 16 held-out views (dB)")
    axs[1].set_ylabel("mask IoU on 16 held-out views")
    for ax in axs:
        ax.set_xlabel("training seconds (render + teacher + backward + optimiser)" if x == "elapsed_s"
                      else "optimisation steps")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_run_diagnostics(trainer: Trainer, steps: list[dict], path: str | Path) -> None:
    """K chosen by the accountant against step, and the timestep proposal against the objective's ``p``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    if steps:
        axs[0].step([r["step"] for r in steps], [r["K"] for r in steps], where="post")
    axs[0].set_xlabel("step")
    axs[0].set_ylabel("K (draws per render)")
    axs[0].set_title("K used per step" + (" (accountant)" if trainer.alloc is not None else ""), fontsize=9)
    axs[0].grid(True, alpha=0.3)
    s = trainer.sds.sampler
    T = s.num_timesteps
    axs[1].plot(range(T), (s.p * T).numpy(), label="p (objective: uniform)", color="grey")
    w = trainer.problem.w
    axs[1].plot(range(T), (0.9 * w / w.sum() * T + 0.1).numpy(), label="q ~ p w (weight, floor 0.1)", ls="--")
    axs[1].plot(range(T), (s.q * T).numpy(), label="q used now", color="C3")
    axs[1].set_xlabel("timestep t")
    axs[1].set_ylabel("density x T")
    axs[1].set_title("timestep proposal", fontsize=9)
    axs[1].legend(fontsize=7)
    axs[1].grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- the main job
def _prepare(trainer: Trainer) -> RunState:
    """Write the run's ``config.json``; the trainer's :class:`RunState` already holds the metrics (restored
    to the checkpoint's rows on resume)."""
    atomic_write_json(trainer.out / "config.json", {**asdict(trainer.cfg), "proposal_resolved":
                                                    trainer.cfg.resolved_proposal, "stratify_resolved":
                                                    trainer.cfg.resolved_stratify})
    return trainer.state


def _train_step(trainer: Trainer, metrics: RunState) -> None:
    if trainer.eval_due():
        metrics.append(trainer.evaluate())
        trainer.mark_evaluated()
    metrics.append(trainer.step())
    if trainer.step_count % trainer.cfg.checkpoint_every == 0:
        trainer.save()


def _finish(trainer: Trainer, metrics: RunState) -> dict:
    if not trainer.evals or trainer.evals[-1]["step"] != trainer.step_count:
        metrics.append(trainer.evaluate())
    trainer.save()
    return trainer.evals[-1]


def _write_run_outputs(trainer: Trainer, title: str) -> None:
    out, p = trainer.out, trainer.problem
    tt = turntable(p, trainer.grid)
    ev = trainer.evals[-1]
    save_image_grid([turntable(p, None), tt], ["ground truth", f"{trainer.cfg.method}\n{trainer.step_count} steps"],
                    out / "turntable.png",
                    title=f"{p.prompt!r}: {title}, turntable (elevation 20); held-out PSNR {ev['psnr']:.2f} dB, "
                    f"mask IoU {ev['iou']:.3f}",
                    col_names=[f"az {int(a)}" for a in torch.arange(8) * 45])
    with torch.no_grad():
        x, op = p.render(trainer.grid, p.eval_cameras)
    n = min(8, x.shape[0])
    rows = [p.gt_rgb[:n], ((x + 1) / 2)[:n], p.gt_opacity[:n].expand(-1, 3, -1, -1), op[:n].expand(-1, 3, -1, -1)]
    save_image_grid(rows, ["ground truth", "learned", "GT mask", "learned mask"], out / "comparison.png",
                    title=f"{p.prompt!r} ({trainer.cfg.method}), held-out views at 32 px: PSNR {ev['psnr']:.2f} dB "
                    f"(16 views), mask IoU {ev['iou']:.3f}")
    plot_quality_curves({trainer.cfg.method: trainer.evals}, out / "quality_vs_time.png",
                        f"{p.prompt!r}: quality on held-out views vs training time")
    steps = [r for r in trainer.state.rows if r.get("kind") == "step"]
    plot_run_diagnostics(trainer, steps, out / "k_and_proposal.png")


def run_text_to_3d(prompt: str = DEFAULT_PROMPT, out_dir: str | Path | None = None,
                   cfg: TextTo3DConfig | None = None, compare: bool = False, fresh: bool = False,
                   progress: bool = True, teacher: UNetTeacher | None = None, compare_at: str = "step",
                   restart: bool | None = None) -> dict:
    """The main job: distil ``prompt`` into a voxel grid; write (and resume) a run folder; return a summary.

    The folder (default ``runs/text-to-3d/<prompt>``, or ``<prompt>-compare`` with ``compare=True``) is a
    :class:`carv._runfolder.RunFolder`: locked, with a manifest naming the command and configuration, and
    checksummed checkpoints; ``fresh=True`` moves an earlier run there aside first (``restart`` is its
    deprecated alias). A plain run's folder and a comparison's are never the same folder (the manifest
    names the command).

    With ``compare=True`` the run folder gets ``carv/`` and ``baseline/`` sub-runs, interleaved step by step
    in one process (machine load hits both alike), and ``turntables.png`` side by side plus
    ``quality_vs_steps.png`` and ``quality_vs_seconds.png``. ``compare_at="step"`` (the default): **equal
    per-step compute**, both make ``cfg.steps`` steps and carv's allocator spends the baseline's measured
    per-step cost (``R (c_up + c_draw)`` from the baseline's own meter, re-read every step). Both use the same
    learning rate (``cfg.lr``: one rule for both) unless ``cfg.baseline_lr`` gives the baseline its own (each
    tuned on the same grid: ``benchmarks/equal_step_reference.py --lr-grid``). ``compare_at="wall-clock"``: the
    run with less training time so far steps next, and the baseline stops once it has used as much time as the carv run.
    """
    cfg = dataclasses.replace(cfg) if cfg is not None else TextTo3DConfig()
    cfg.prompt = prompt
    cfg.validate()
    if compare_at not in COMPARE_AT:
        raise ValueError(f"compare_at: expected one of {COMPARE_AT}, got {compare_at!r}")
    fresh = bool(fresh or restart)
    set_threads(cfg.threads)
    default_root = Path("runs/text-to-3d" if cfg.teacher is None else "runs/text-to-3d-sd")
    slug = _slug(get_scene(prompt).prompt) + ("-compare" if compare else "")
    out = Path(out_dir) if out_dir is not None else default_root / slug
    command = "carv text-to-3d --compare" if compare else "carv text-to-3d"
    if teacher is None and cfg.teacher is None:
        teacher = load_scenes_teacher()
    digest = teacher_digest(teacher)
    identity = {**cfg.identity(), **({"compare_at": compare_at} if compare else {}),
                **({"teacher_weights": digest} if digest else {})}
    with RunFolder(out, command, identity, RESUMABLE_CHANGES, fresh=fresh) as folder:
        if folder.previous is not None and progress:
            print(f"--fresh: moved the earlier run in {str(out)!r} to {str(folder.previous)!r}")
        return _run_in_folder(out, cfg, compare, progress, teacher, compare_at)


def _baseline_lr(cfg: TextTo3DConfig) -> dict:
    """The baseline's learning-rate fields in ``--compare``: ``cfg.baseline_lr`` in place of ``cfg.lr`` (a decay
    to ``lr_end`` keeps its ratio ``lr_end / lr``), or nothing when it is None (both at ``cfg.lr``)."""
    if cfg.baseline_lr is None:
        return {}
    end = None if cfg.lr_end is None else float(cfg.lr_end) * float(cfg.baseline_lr) / float(cfg.lr)
    return {"lr": float(cfg.baseline_lr), "lr_end": end, "baseline_lr": None}


def _run_in_folder(out: Path, cfg: TextTo3DConfig, compare: bool, progress: bool,
                   teacher: UNetTeacher | None, compare_at: str) -> dict:
    problem = problem_for(cfg, teacher)  # teacher: loaded by run_text_to_3d (None only for a diffusers cfg.teacher)
    if cfg.reference is not None:
        problem.set_reference(load_reference_grid(cfg.reference))
    if not compare:
        trainer = Trainer(cfg, out, problem)
        metrics = _prepare(trainer)
        bar = progress_bar(None, progress, total=cfg.steps, initial=trainer.step_count, desc=f"text-to-3d {cfg.method}")
        try:  # an error message after an interruption starts on its own line
            while not trainer.done:
                _train_step(trainer, metrics)
                bar.update(1)
                bar.set_postfix(K=trainer.K, psnr=f"{trainer.evals[-1]['psnr']:.1f}" if trainer.evals else "-")
        finally:
            bar.close()
        final = _finish(trainer, metrics)
        _write_run_outputs(trainer, cfg.method)
        summary = {"command": "carv text-to-3d", "prompt": problem.prompt, "method": cfg.method,
                   "steps": trainer.step_count, "train_seconds": trainer.elapsed, "final": final,
                   "K_final": trainer.K, "c_upstream_s": trainer.meter.median("upstream"),
                   "c_draw_s": trainer.meter.median("draw"), "resumed_from": trainer.resumed_from,
                   "machine": machine_info(loadavg=loadavg())}
        atomic_write_json(out / "summary.json", summary)
        if progress:
            print(f"{problem.prompt!r} ({cfg.method}): {trainer.step_count} steps, {trainer.elapsed:.0f} s training, "
                  f"PSNR {final['psnr']:.2f} dB, mask IoU {final['iou']:.3f}, K = {trainer.K}; run folder: {out}")
        return summary

    equal_step = compare_at == "step"
    cfgs = {"carv": dataclasses.replace(cfg, method="carv"),
            "baseline": dataclasses.replace(cfg, method="baseline", K=None, proposal=None, stratify=None,
                                            upstream=None, **_baseline_lr(cfg),
                                            **({} if equal_step else dict(steps=10**9, budget_s=None)))}
    trainers = {m: Trainer(c, out / m, problem) for m, c in cfgs.items()}
    metrics = {m: _prepare(t) for m, t in trainers.items()}
    carv_t, base_t = trainers["carv"], trainers["baseline"]
    spend_baseline = equal_step and carv_t.alloc is not None and cfg.step_budget == "baseline"
    bar = progress_bar(None, progress, total=cfg.steps, initial=carv_t.step_count, desc="text-to-3d compare")
    while True:
        if equal_step:
            if carv_t.done and base_t.done:
                break
            base_due = not base_t.done and (base_t.step_count <= carv_t.step_count or carv_t.done)
        else:
            if carv_t.done and base_t.elapsed >= carv_t.elapsed:
                break
            base_due = base_t.elapsed < carv_t.elapsed or carv_t.done
        if base_due:
            _train_step(base_t, metrics["baseline"])
        else:
            b = base_t.plain_step_cost() if spend_baseline else None
            if b is not None:  # carv's allocator spends the baseline's measured per-step cost
                carv_t.alloc.budget = b
            _train_step(carv_t, metrics["carv"])
            bar.update(1)
        bar.set_postfix(R=carv_t.R, K=carv_t.K, base_steps=base_t.step_count)
    bar.close()
    finals = {m: _finish(t, metrics[m]) for m, t in trainers.items()}
    for m, t in trainers.items():
        _write_run_outputs(t, m)
    gt = turntable(problem, None)
    save_image_grid([gt, turntable(problem, base_t.grid), turntable(problem, carv_t.grid)],
                    ["ground truth", f"baseline\n{base_t.step_count} steps", f"carv\n{carv_t.step_count} steps"],
                    out / "turntables.png",
                    title=(f"{problem.prompt!r} at equal per-step compute, {carv_t.step_count} steps each "
                           f"({base_t.elapsed:.0f} s baseline, {carv_t.elapsed:.0f} s carv)" if equal_step else
                           f"{problem.prompt!r} at equal training time ({carv_t.elapsed:.0f} s each)"),
                    col_names=[f"az {int(a)}" for a in torch.arange(8) * 45])
    curves = {"baseline (uniform, K=1)": base_t.evals,
              "carv (allocator, learned q, strata, lattice cameras)": carv_t.evals}
    for x, name in (("step", "steps"), ("elapsed_s", "seconds")):
        plot_quality_curves(curves, out / f"quality_vs_{name}.png",
                            f"{problem.prompt!r}: held-out quality vs training {name}", x=x)
    keys = ("psnr", "iou") + (("psnr_ref", "iou_ref") if cfg.reference is not None else ())
    ecm_q = {k: equal_quality_ecm(base_t.evals, carv_t.evals, k) for k in keys}
    steps_q = {k: equal_quality_ecm(base_t.evals, carv_t.evals, k, x="step") for k in keys}
    step_s = {m: t.elapsed / max(t.step_count, 1) for m, t in trainers.items()}
    summary = {"command": "carv text-to-3d --compare", "compare_at": compare_at, "prompt": problem.prompt,
               "seed": cfg.seed,
               "train_seconds": {m: t.elapsed for m, t in trainers.items()}, "seconds_per_step": step_s,
               "steps": {m: t.step_count for m, t in trainers.items()}, "final": finals,
               "ecm_equal_quality": ecm_q, "steps_ratio_equal_quality": steps_q, "R_final": carv_t.R,
               "K_final": carv_t.K, "allocator_history": carv_t.alloc.history if carv_t.alloc is not None else None,
               "machine": machine_info(loadavg=loadavg())}
    atomic_write_json(out / "summary.json", summary)
    if progress:
        for m in METHODS:
            f = finals[m]
            print(f"{m:>8}: {trainers[m].step_count:5d} steps, PSNR {f['psnr']:.2f} dB, mask IoU {f['iou']:.3f}")
        print(f"seconds per step: baseline {step_s['baseline']:.3f}, carv {step_s['carv']:.3f} "
              f"(carv at R = {carv_t.R}, K = {carv_t.K})")
        for label, res in (("steps", steps_q["psnr"]), ("seconds", ecm_q["psnr"])):
            print(f"baseline / carv {label} to the baseline's final PSNR: {res['ecm']:.2f}x" if res["ecm"] is not None
                  else f"baseline / carv {label} to the baseline's final PSNR: {res['note']}")
        print(f"run folder: {out}")
    return summary


def _slug(prompt: str) -> str:
    return "-".join(prompt.split())


def text_to_3d_from_cli(prompt: str | None, out_dir: str | Path | None, flags: dict, baseline: bool = False,
                        compare: bool = False, fresh: bool = False, progress: bool = True,
                        compare_at: str = "step") -> dict:
    """The ``carv text-to-3d`` command: flags (None = default) -> config -> :func:`run_text_to_3d`."""
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    get_scene(prompt)  # a bad prompt fails first, with the list of allowed prompts
    names = {f.name for f in dataclasses.fields(TextTo3DConfig)}
    unknown = sorted(set(flags) - names)
    if unknown:
        raise ValueError(f"flags: unknown option(s) {unknown}")
    given = {k: v for k, v in flags.items() if v is not None}
    if isinstance(given.get("step_budget"), str) and given["step_budget"] not in STEP_BUDGETS:
        try:
            given["step_budget"] = float(given["step_budget"])
        except ValueError:
            raise ValueError(f"step_budget: expected one of {STEP_BUDGETS} or a positive number of seconds, "
                             f"got {given['step_budget']!r}") from None
    if compare_at not in COMPARE_AT:
        raise ValueError(f"compare_at: expected one of {COMPARE_AT}, got {compare_at!r}")
    if baseline and compare:
        raise ValueError("baseline, compare: --compare already trains the baseline next to carv; pass one of them")
    if "baseline_lr" in given and not compare:
        raise ValueError("baseline_lr: --baseline-lr is the baseline's rate in --compare; without --compare use --lr")
    if baseline:
        clash = sorted(k for k in ("K", "proposal", "stratify") if k in given and not (k == "K" and given[k] == 1))
        if clash:
            raise ValueError(f"baseline: --baseline fixes uniform timesteps and K = 1; it conflicts with "
                             f"{', '.join('--' + c for c in clash)}")
        given["method"] = "baseline"
    if "t_lo_end" not in given:  # the command line anneals the top only: the bottom stays at --t-lo
        given["t_lo_end"] = given.get("t_lo", TextTo3DConfig.t_lo)
    cfg = TextTo3DConfig(**{**given, "prompt": prompt})
    cfg.validate()
    return run_text_to_3d(prompt, out_dir, cfg, compare=compare, fresh=fresh, progress=progress,
                          compare_at=compare_at)
