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
   pulls every render towards its bin's average view: a dome without its stem), an initial
   density blob of radius 0.85, and Adam with ``beta2 = 0.99``
   (``adam_beta2``; torch's 0.999 averages a voxel's squared gradients over about 1000 steps, longer than the
   run). Measured and left off by default: ``sparsity_weight`` (a penalty on the renders' opacity from step
   ``sparsity_start``: it removed background-grey haze for the (prompt, view) teacher and erodes the thin stem with
   the camera-conditioned one), ``guidance_end`` (guidance annealed over ``anneal_steps``),
   ``lr_end`` (Adam's rate decayed geometrically), ``init_color`` (a fresh voxel's colour),
   ``coarse_resolution, coarse_steps`` (coarse-to-fine grid), ``color_lr_scale`` (the colour's rate against the
   density's), ``init_center_z, init_height`` (the blob as an ellipsoid) and ``sparsity_end`` (a sparsity ramp).
3. **carv** (the default, ``method="carv"``): ``K`` draws per render; the timestep proposal is chosen by
   :class:`carv.ProposalSelector` among uniform, the teacher's weight table ``w`` and
   :class:`carv.LearnedProposal` (``q ~ p sqrt(E||f||^2 | t)``, learned online from the squared residual
   norms every step computes anyway, ``w`` as its prior), on the run's own draws, refreshed every
   ``proposal_every`` steps and less often once the choice settles, floor ``0.1``; per-upstream
   stratification; ``(R, K)`` chosen by :class:`carv.Allocator` from the measured stage costs and variance
   components at the plain step's cost and re-chosen every ``accountant_every`` steps.
   ``method="baseline"`` is the plain estimator: uniform ``t``, ``K = 1``. Every variant is unbiased for the
   same gradient (the proposal at a step depends only on earlier steps' draws).

:class:`Trainer` holds one run (grid, Adam, generator, proposal, accountant, cost meter, clocks) and
checkpoints it (safetensors for tensors, JSON for the rest; nothing is pickled), so a rerun of the
same command continues. :func:`run_text_to_3d` is the main job (``carv text-to-3d``): a run folder
with ``config.json``, ``metrics.jsonl``, ``turntable.png``, ``comparison.png`` and plots. The comparison with the
plain estimator (``carv text-to-3d --compare``, :func:`carv.bench.compare.compare_text_to_3d`) and the side-by-side
benchmark (``carv bench text-to-3d``, :mod:`carv.bench.text_to_3d`) live in ``carv.bench`` and
drive this pipeline; no benchmark code lives here.

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

from carv.apps.text_to_3d.config import (
    COMPARE_AT,
    DEFAULT_PROMPT,
    METHODS,
    RESUMABLE_CHANGES,
    STEP_BUDGETS,
    TextTo3DConfig,
    check_render_memory,
    config_from_cli,
)
from carv.apps.text_to_3d.latent import LatentSceneProblem, check_sd_folder, load_sd_teacher
from carv.apps.text_to_3d.outputs import plot_quality_curves, plot_run_diagnostics, turntable, write_run_outputs
from carv.apps.text_to_3d.problem import (
    EVAL_SEED,
    PROPOSALS,
    SceneProblem,
    grid_grad,
    load_reference_grid,
    load_run_grid,
    reference_checkpoint,
)
from carv.apps.text_to_3d.run import (
    open_run,
    prepare_run,
    run_text_to_3d,
    slug,
    text_to_3d_from_cli,
)
from carv.apps.text_to_3d.trainer import Trainer, problem_for, teacher_digest

__all__ = [
    "DEFAULT_PROMPT",
    "METHODS",
    "PROPOSALS",
    "TextTo3DConfig",
    "SceneProblem",
    "LatentSceneProblem",
    "problem_for",
    "Trainer",
    "run_text_to_3d",
    "open_run",
    "prepare_run",
    "write_run_outputs",
    "config_from_cli",
    "text_to_3d_from_cli",
    "slug",
    "grid_grad",
    "turntable",
    "plot_quality_curves",
    "plot_run_diagnostics",
    "load_run_grid",
    "load_reference_grid",
    "reference_checkpoint",
    "check_render_memory",
    "check_sd_folder",
    "load_sd_teacher",
    "teacher_digest",
    "COMPARE_AT",
    "EVAL_SEED",
    "RESUMABLE_CHANGES",
    "STEP_BUDGETS",
]
