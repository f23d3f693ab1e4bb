"""Latent score distillation for ``carv text-to-3d --teacher <Stable Diffusion folder>``.

The same text-to-3D run (voxel grid, cameras, carv's estimator, accountant, run folder, ``--compare``),
with a local diffusers Stable Diffusion pipeline as the teacher: each step renders ``R`` views, resizes
them (bilinear) to the VAE's input size (8 x the UNet's latent size: 512 px for SD), encodes them with the
VAE (:meth:`~carv.teachers.diffusers.DiffusersTeacher.encode_images`, the posterior mean) and asks
:class:`carv.ScoreDistillation` for the SDS gradient on the latents, conditioned on view-dependent prompts
(threestudio's direction rule) with one negative embedding per view. The render, the resize and the VAE
encode are the upstream stage (forward + backward); the guided UNet draws are the draw stage.

Held-out quality is still measured against the procedural scene's ground truth, so the prompt must be
one of the scenes' prompts; a real Stable Diffusion model was never trained on those renders, so PSNR and
IoU then say how close it gets to carv's toy ground truth, not how good its own 3D is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from carv.apps.text_to_3d.problem import SceneProblem
from carv.objectives.sds import ScoreDistillation
from carv.objectives.weighting import weight_table
from carv.render import VoxelGrid, render
from carv.render.cameras import Cameras
from carv.teachers.scenes import BACKGROUND

__all__ = ["LatentSceneProblem", "check_sd_folder", "load_sd_teacher"]

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_sd_folder(path: str | Path) -> Path:
    """``path`` if it is a diffusers Stable Diffusion folder as ``save_pretrained`` writes it, else ValueError."""
    p = Path(path)
    index = p / "model_index.json"
    if not index.is_file():
        raise ValueError(f"teacher: {str(p)!r} is not a diffusers pipeline folder (no model_index.json); pass a "
                         f"local Stable Diffusion folder as StableDiffusionPipeline.save_pretrained writes it, or "
                         f"omit --teacher for the built-in scenes teacher")
    try:
        meta = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"teacher: {str(index)!r} is not readable JSON ({e})") from e
    cls = str(meta.get("_class_name", ""))
    missing = [k for k in SD_PARTS if k not in meta or not (p / k).is_dir()]
    if "StableDiffusion" not in cls or missing:
        raise ValueError(f"teacher: {str(p)!r} holds a {cls or 'unnamed'} pipeline; expected a Stable Diffusion "
                         f"1.x/2.x pipeline with {list(SD_PARTS)}" + (f" (missing {missing})" if missing else ""))
    return p


def load_sd_teacher(path: str | Path, device: torch.device | str | None = None):
    """The :class:`~carv.teachers.diffusers.DiffusersTeacher` of a local Stable Diffusion folder."""
    from carv.teachers.diffusers import DiffusersTeacher

    return DiffusersTeacher.from_pretrained(str(check_sd_folder(path)), device=device)


class LatentSceneProblem(SceneProblem):
    """:class:`~carv.apps.text_to_3d.SceneProblem` with a Stable Diffusion teacher on VAE latents."""

    def __init__(self, prompt: str, sd_teacher: Any, render_size: int = 64, n_samples: int = 48,
                 guidance_scale: float = 100.0, n_eval_views: int = 16, clock: Callable[[], float] = time.perf_counter,
                 t_range: tuple[int, int] | None = None, train_elevation: tuple[float, float] | None = None,
                 negative_prompt: str = ""):
        # the held-out views and the ground truth come from the procedural scene, made as for the scenes teacher
        super().__init__(prompt, None, render_size, n_samples, guidance_scale, n_eval_views, clock, t_range=t_range,
                         train_elevation=train_elevation)
        self.teacher = sd_teacher
        self.schedule = sd_teacher.schedule
        self.T = self.schedule.num_timesteps
        self.w = weight_table("sds", self.schedule)
        self.vae_size = 8 * int(sd_teacher.unet.config.sample_size)
        self.embeddings = sd_teacher.encode_prompt(self.prompt, negative_prompt)

    def sds(self, sampler, K: int) -> ScoreDistillation:
        return ScoreDistillation(self.teacher, sampler, K=K, weighting="sds", guidance_scale=self.guidance_scale)

    def teacher_input(self, grid: VoxelGrid, cameras: Cameras, generator: torch.Generator | None = None,
                      render_size: int | None = None, n_samples: int | None = None) -> tuple[Tensor, Tensor]:
        """Render -> resize to the VAE's input size -> VAE latents ``[R, 4, h, w]``; and the opacity at the
        evaluation size (for the regularisers)."""
        out = render(grid, cameras, render_size or self.render_size, n_samples=n_samples or self.n_samples,
                     bound=grid.bound, background=BACKGROUND, generator=generator)
        rgb = F.interpolate(out.rgb, (self.vae_size, self.vae_size), mode="bilinear", align_corners=False)
        opacity = out.opacity
        if opacity.shape[-1] != self.image_size:
            opacity = F.interpolate(opacity, size=(self.image_size, self.image_size), mode="area")
        return self.teacher.encode_images(rgb, size=None), opacity

    def condition(self, cameras: Cameras) -> dict[str, Tensor]:
        cond, uncond = self.embeddings.for_views(cameras.elevation_deg.cpu(), cameras.azimuth_deg.cpu())
        return {"cond": cond, "uncond": uncond}
