"""A threestudio-shaped score-distillation guidance backed by carv's estimator.

It follows the call shapes of threestudio's ``StableDiffusionGuidance``
(``threestudio/models/guidance/stable_diffusion_guidance.py`` of threestudio-project/threestudio at commit 02d05b0)
and its ``PromptProcessorOutput`` (``threestudio/models/prompt_processors/base.py`` at commit 0113b37): the
same config names, ``__call__(rgb [B, H, W, C], prompt_utils, elevation, azimuth, camera_distances,
rgb_as_latents=False, **kwargs)`` returning a dict with
``loss_sds``, ``grad_norm``, ``min_step`` and ``max_step``, and ``update_step(epoch, global_step,
on_load_weights=False)``. threestudio itself is not a dependency: the class works with any object that
has threestudio's ``prompt_utils.get_text_embeddings(elevation, azimuth, camera_distances,
view_dependent_prompting)`` (conditional rows first, then unconditional: ``[2B, L, D]``), including carv's
:class:`~carv.teachers.prompts.PromptEmbeddings` from ``teacher.encode_prompt(...)``. :func:`register`
registers it with threestudio under ``"carv-stable-diffusion-guidance"`` when threestudio is importable.

What changes against threestudio's guidance (everything else is its behaviour):

- each of the ``B`` renders gets ``K`` ``(t, eps)`` draws (``K = 1`` with ``proposal="none"`` and
  ``stratify="none"`` is threestudio's estimator), drawn from carv's timestep sampler (importance
  weights keep the estimate unbiased; stratified draws);
- ``guidance_scale`` is in threestudio's convention (``eps_c + s (eps_c - eps_u)``; carv's ``s + 1``);
- non-finite teacher outputs follow ``nan_policy`` (``"raise"`` or ``"skip"``) instead of ``nan_to_num``,
  which biases the estimate toward zero;
- the output also carries carv's statistics: ``K``, ``R``, ``between``, ``within``, ``proposal``,
  ``skipped``.

``loss_sds = 0.5 * ||latents - (latents - grad).detach()||^2 / B`` exactly as threestudio's, so its value
and its gradient (``d loss_sds / d latents = grad / B``) match threestudio's for the same ``grad``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from carv.objectives.sds import ScoreDistillation
from carv.objectives.weighting import weight_table
from carv.timesteps import LearnedProposal, TimestepSampler, percent_range, scheduled_value

__all__ = ["CarvGuidance", "register", "REGISTRY_NAME"]

REGISTRY_NAME = "carv-stable-diffusion-guidance"
PROPOSALS = ("none", "weight", "learned")


@dataclass
class CarvGuidanceConfig:
    """threestudio's ``StableDiffusionGuidance.Config`` fields that apply, then carv's own."""

    pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-1-base"
    guidance_scale: float = 100.0  # threestudio's convention
    grad_clip: Any = None  # a number or a [start_step, start, end, end_step] schedule (biases the estimate)
    half_precision_weights: bool = True
    min_step_percent: Any = 0.02  # a number or a schedule
    max_step_percent: Any = 0.98
    weighting_strategy: str = "sds"  # sds, uniform, fantasia3d
    view_dependent_prompting: bool = True
    # carv
    K: int = 4
    proposal: str = "learned"
    stratify: str = "per_upstream"
    floor: float = 0.1
    proposal_every: int = 10
    max_batch: Any = "auto"
    nan_policy: str = "raise"
    seed: int = 0
    auto_k: bool = False  # re-choose K with carv.Accountant (needs a batch of >= 2 renders to measure)
    k_max: int = 32
    probe_every: int = 10
    choose_every: int = 20


class CarvGuidance:
    """threestudio's SDS guidance call shape with carv's estimator (see the module doc).

    Args:
        cfg: a :class:`CarvGuidanceConfig`, or a dict / OmegaConf config of its fields (as threestudio passes).
        teacher: a :class:`~carv.teachers.diffusers.DiffusersTeacher` built with ``from_pipeline``; if None,
            it is loaded from ``cfg.pretrained_model_name_or_path`` (float16 weights when
            ``half_precision_weights``).
        device: where the teacher runs (default: CUDA if available).
    """

    Config = CarvGuidanceConfig

    def __init__(self, cfg: Any = None, teacher: Any = None, device: torch.device | str | None = None):
        self.cfg = _parse_config(cfg)
        c = self.cfg
        if c.proposal not in PROPOSALS:
            raise ValueError(f"proposal: expected one of {PROPOSALS}, got {c.proposal!r}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if teacher is None:
            from carv.teachers.diffusers import DiffusersTeacher

            dtype = torch.float16 if c.half_precision_weights else torch.float32
            teacher = DiffusersTeacher.from_pretrained(c.pretrained_model_name_or_path, dtype=dtype,
                                                       device=self.device)
        self.teacher = teacher
        T = teacher.schedule.num_timesteps
        self.num_train_timesteps = T
        self.learned = (LearnedProposal(T, prior=weight_table(c.weighting_strategy, teacher.schedule))
                        if c.proposal == "learned" else None)
        self.min_step, self.max_step = percent_range(T, scheduled_value(c.min_step_percent, 0),
                                                        scheduled_value(c.max_step_percent, 0))
        sampler = TimestepSampler(T, self.min_step, self.max_step, importance=self._importance(),
                                  floor=c.floor if c.proposal != "none" else 0.0, stratify=c.stratify,
                                  device=self.device)
        self.sds = ScoreDistillation(teacher, sampler, K=c.K, weighting=c.weighting_strategy,
                                     guidance_scale=c.guidance_scale, max_batch=c.max_batch, nan_policy=c.nan_policy,
                                     guidance_convention="threestudio")
        self.generator = torch.Generator(self.device).manual_seed(c.seed)
        self.grad_clip_val: float | None = None
        self.steps = 0
        self.accountant = None
        if c.auto_k:
            from carv.accountant import Accountant

            # threestudio's batch (R) is fixed by its data loader: the accountant chooses K alone
            self.accountant = Accountant(self.sds, params=None, budget=None, probe_every=c.probe_every,
                                         choose_every=c.choose_every, k_range=(2, max(2, c.k_max)), device=self.device,
                                         warmup=1)

    def _importance(self) -> Tensor | None:
        if self.cfg.proposal == "none":
            return None
        if self.cfg.proposal == "weight" or not self.learned.ready:
            return weight_table(self.cfg.weighting_strategy, self.teacher.schedule)
        return self.learned.importance()

    @property
    def K(self) -> int:
        return self.sds.K

    @K.setter
    def K(self, K: int) -> None:  # an accountant re-chooses K between steps
        self.sds.K = K

    # ---------------------------------------------------------------- threestudio's interface
    def encode_images(self, imgs: Tensor) -> Tensor:
        """threestudio's ``encode_images``: ``[B, 3, 512, 512]`` in ``[0, 1]`` -> latents (posterior sample)."""
        return self.teacher.encode_images(imgs, size=None, generator=self.generator)

    def __call__(self, rgb: Tensor, prompt_utils: Any, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor,
                 rgb_as_latents: bool = False, **kwargs) -> dict[str, Any]:
        if not isinstance(rgb, Tensor) or rgb.ndim != 4:
            raise ValueError(f"rgb: expected [B, H, W, C], got {getattr(rgb, 'shape', type(rgb).__name__)}")
        B = rgb.shape[0]
        rgb_bchw = rgb.permute(0, 3, 1, 2)
        latent_size = self.teacher.unet.config.sample_size
        if rgb_as_latents:
            latents = F.interpolate(rgb_bchw, (latent_size, latent_size), mode="bilinear", align_corners=False)
        else:
            size = 8 * latent_size
            latents = self.encode_images(F.interpolate(rgb_bchw, (size, size), mode="bilinear", align_corners=False))
        emb = prompt_utils.get_text_embeddings(elevation, azimuth, camera_distances, self.cfg.view_dependent_prompting)
        cond, uncond = emb[:B], emb[B:]
        if self.accountant is not None:  # the step opened by update_step (or here, if it is not called)
            st = self.accountant.current or self.accountant.begin()
            out = st.objective(latents, cond, self.generator, uncond=uncond)
        else:
            out = self.sds(latents, cond, self.generator, uncond=uncond)
        grad = out.grad
        if self.grad_clip_val is not None:
            grad = grad.clamp(-self.grad_clip_val, self.grad_clip_val)
        target = (latents - grad).detach()
        loss_sds = 0.5 * F.mse_loss(latents, target, reduction="sum") / B
        if self.learned is not None and out.skipped is None:
            self.learned.update(out.draws.t, out.estimate.sq_norms)
        est = out.estimate
        return {"loss_sds": loss_sds, "grad_norm": grad.norm(), "min_step": self.min_step, "max_step": self.max_step,
                "K": out.draws.K, "R": B, "between": est.between, "within": est.within, "proposal": self.cfg.proposal,
                "skipped": out.skipped, "sds_output": out}

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        """Per-step updates, as threestudio's: grad clipping and the annealed timestep range from their
        schedules; carv's learned proposal (refreshed every ``proposal_every`` steps); with ``auto_k`` the
        accountant closes the previous step (its time from this call to the last one is the step's cost: the
        guidance call is the draw stage, everything else the upstream stage) and may set a new ``K``.
        The components are those of the latents (the accountant has no access to the scene's parameters)."""
        c = self.cfg
        if self.accountant is not None and not on_load_weights:
            if self.accountant.current is not None and self.accountant.current.R is not None:
                self.accountant.end()
            if self.accountant.current is None:
                self.accountant.begin()
        if c.grad_clip is not None:
            self.grad_clip_val = scheduled_value(c.grad_clip, global_step, epoch)
        lo, hi = percent_range(self.num_train_timesteps, scheduled_value(c.min_step_percent, global_step, epoch),
                                  scheduled_value(c.max_step_percent, global_step, epoch))
        if (lo, hi) != (self.min_step, self.max_step):
            self.min_step, self.max_step = lo, hi
            self.sds.sampler.set_t_range(lo, hi)
        if self.learned is not None and global_step % c.proposal_every == 0 and self.learned.ready:
            self.sds.sampler.set_importance(self._importance())
        self.steps = global_step


def _parse_config(cfg: Any) -> CarvGuidanceConfig:
    if cfg is None:
        return CarvGuidanceConfig()
    if isinstance(cfg, CarvGuidanceConfig):
        return dataclasses.replace(cfg)
    if not isinstance(cfg, dict):
        try:  # an OmegaConf DictConfig, as threestudio passes
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # noqa: BLE001 - report what was passed
            raise TypeError(f"cfg: expected a CarvGuidanceConfig, a dict or an OmegaConf config, got "
                            f"{type(cfg).__name__}") from e
    names = {f.name for f in dataclasses.fields(CarvGuidanceConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"cfg: unknown key(s) {unknown}; allowed: {sorted(names)}")
    return CarvGuidanceConfig(**cfg)


def register() -> type:
    """Register :class:`CarvGuidance` with threestudio as ``"carv-stable-diffusion-guidance"`` (call it from a
    threestudio ``custom/`` extension's ``__init__.py``). Needs threestudio importable."""
    try:
        import threestudio
        from threestudio.utils.base import BaseObject
    except ImportError as e:
        raise ImportError("register: threestudio is not importable; CarvGuidance works without it, but "
                          "registering needs it installed") from e

    class ThreestudioCarvGuidance(BaseObject, CarvGuidance):
        Config = CarvGuidanceConfig

        def configure(self) -> None:
            CarvGuidance.__init__(self, self.cfg, device=self.device)

    return threestudio.register(REGISTRY_NAME)(ThreestudioCarvGuidance)
