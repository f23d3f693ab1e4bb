"""The text-to-3D problem: teacher, prompt, renderer settings and held-out views (:class:`SceneProblem`), and
reading a finished run's grid (a reference solution)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from carv._runfolder import CorruptFileError, RunState, load_tensors
from carv.accounting import ComponentProbe, CostMeter, VarianceComponents, timed_estimate
from carv.objectives.sds import ScoreDistillation, SDSOutput
from carv.objectives.weighting import weight_table
from carv.render import VoxelGrid, cameras_from_unit, find_scene, random_cameras, render
from carv.render.cameras import Cameras
from carv.teachers.scenes import BACKGROUND, RENDER_SETTINGS, load_scenes_teacher, teacher_cond
from carv.teachers.unet import UNetTeacher
from carv.timesteps import LearnedProposal, TimestepSampler
from carv.upstream import UpstreamSampler

__all__ = ["PROPOSALS", "EVAL_SEED", "SceneProblem", "grid_grad", "reference_checkpoint", "load_run_grid",
           "load_reference_grid"]

PROPOSALS = ("none", "weight", "learned", "auto")
EVAL_SEED = 20_251_127  # held-out cameras: never drawn by a training generator (those are seeded by `seed`)


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

    any_prompt = False  # the scenes teacher knows only its scenes' prompts

    def __init__(self, prompt: str, teacher: UNetTeacher | None = None, render_size: int = 64, n_samples: int = 48,
                 guidance_scale: float = 3.0, n_eval_views: int = 16, clock: Callable[[], float] = time.perf_counter,
                 t_range: tuple[int, int] | None = None, train_elevation: tuple[float, float] | None = None):
        self.clock = clock  # times the stages and the runs' training time (the benchmark uses CPU time)
        # the objective's timestep support and training-camera elevations when not given per call (the
        # benchmark's samplers and cameras); None: the full range / the teacher's elevations
        self.t_range, self.train_elevation = t_range, train_elevation
        self.scene = find_scene(prompt)  # None: no ground truth (a Stable Diffusion teacher takes any prompt)
        self.prompt = self.scene.prompt if self.scene is not None else prompt
        self.teacher = teacher if teacher is not None else load_scenes_teacher()
        self.prompts = list(self.teacher.meta.get("prompts", []))
        if self.prompt not in self.prompts and not self.any_prompt:
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
        self.gt_rgb = self.gt_opacity = None
        if self.scene is not None:
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
        if proposal in ("learned", "auto"):  # "auto" starts from the learned proposal's prior, the weight table
            imp = learned.importance((t_min, self.T - 1 if t_max is None else t_max)) if learned is not None else None
            imp = self.w if imp is None else imp
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
                 elevation_range: tuple[float, float] | None = None, halves: bool = False,
                 ) -> tuple[SDSOutput, dict[str, float], VarianceComponents | None]:
        """One SDS gradient step's worth of work: ``R`` renders, ``R K`` teacher draws, one backward.

        Accumulates the SDS gradient into ``grid``'s ``.grad`` and returns the SDS output, the seconds
        spent in the stages (``upstream``: render + backward, ``draw``: the SDS call, ``probe``; also recorded
        in ``meter`` when given, per render and per draw) and, with
        ``probe=True``, the variance components of the *parameter* gradient from two extra backward
        passes (:class:`carv.accounting.ComponentProbe`; needs ``R >= 2``, ``K >= 2``), else None. ``halves``
        (where the run's ordinary steps stratify rows; a probe step itself draws iid): a third pass reads the
        within-half variance too
        (:meth:`~carv.accounting.ComponentProbe.measure_halves`, :meth:`carv.accounting.Allocator.probe_reads_halves`).

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
            comps = ComponentProbe(R, sds.K).measure_halves(  # with halves: the within-half variance too
                x, [grid.density, grid.color], out.estimate.draws, sds.sampler.half(out.draws.t) if halves else None,
                generator)
            out.estimate.draws = None
        secs["probe"] = self.clock() - t3
        return out, secs, comps

    @torch.no_grad()
    def evaluate(self, grid: VoxelGrid) -> dict[str, float]:
        """PSNR (dB, colour in [0, 1], MSE pooled over the held-out views) and mask IoU (opacity > 0.5) against
        the ground truth; with a reference (:meth:`set_reference`) also ``psnr_ref`` / ``iou_ref`` against it.
        A prompt without a procedural scene has no ground truth: then ``opacity`` (the held-out views' mean)."""
        x, opacity = self.render(grid, self.eval_cameras)
        rgb = (x + 1.0) / 2.0
        if self.gt_rgb is None:
            row = {"opacity": float(opacity.mean())}
        else:
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


def grid_grad(grid: VoxelGrid) -> Tensor:
    """The grid's parameter gradient (density, then colour) as one flat vector."""
    return torch.cat([grid.density.grad.reshape(-1), grid.color.grad.reshape(-1)])
