"""A threestudio-shaped score-distillation guidance backed by carv's estimator.

It follows threestudio's ``StableDiffusionGuidance`` (threestudio-project/threestudio at commit 28d9d80,
``threestudio/models/guidance/stable_diffusion_guidance.py``): the same config names, ``__call__(rgb [B, H, W, C],
prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents=False, **kwargs)`` returning a dict with
``loss_sds``, ``grad_norm``, ``min_step`` and ``max_step``, and ``update_step(epoch, global_step,
on_load_weights=False)``. threestudio itself is not a dependency: :class:`CarvGuidance` works with any object
that has threestudio's ``prompt_utils.get_text_embeddings(elevation, azimuth, camera_distances,
view_dependent_prompting)`` (conditional rows first, then unconditional: ``[2B, L, D]``), including carv's
:class:`~carv.teachers.prompts.PromptEmbeddings` from ``teacher.encode_prompt(...)``.

:func:`register` registers a threestudio class under ``"carv-stable-diffusion-guidance"``. That class is built
the way threestudio builds every guidance: ``BaseObject.__init__(cfg)`` parses the config into its ``Config``
dataclass, sets ``self.device = get_device()`` and calls ``configure()``, which loads the teacher from
``cfg.pretrained_model_name_or_path``; threestudio's ``do_update_step`` reaches carv's :meth:`update_step`.

What changes against threestudio's guidance (everything else is its behaviour):

- each of the ``B`` renders gets ``K`` ``(t, eps)`` draws (``K = 1`` with ``proposal="none"`` and
  ``stratify="none"`` is threestudio's estimator), drawn from carv's timestep sampler (importance
  weights keep the estimate unbiased; stratified draws);
- ``guidance_scale`` is in threestudio's convention (``eps_c + s (eps_c - eps_u)``; carv's ``s + 1``);
- non-finite teacher outputs follow ``nan_policy`` (``"raise"`` or ``"skip"``) instead of ``nan_to_num``,
  which biases the estimate toward zero;
- the output dict (:func:`guidance_output`) holds only numbers and scalar tensors, so threestudio's systems can
  pass every entry to Lightning's ``self.log``: carv adds ``K``, ``R``, ``skipped`` (1.0 when ``nan_policy="skip"``
  dropped the step) and, when measurable, ``between`` and ``within``; the full
  :class:`~carv.objectives.sds.SDSOutput` of the last call (draws, reason for a skip) is ``guidance.last_output``.

``loss_sds = 0.5 * ||latents - (latents - grad).detach()||^2 / B`` exactly as threestudio's, so its value
and its gradient (``d loss_sds / d latents = grad / B``) match threestudio's for the same ``grad``.

Images are resized (bilinear) to ``image_size`` = 512 px before the VAE, and ``rgb_as_latents`` inputs to
``image_size / 8`` = 64, as threestudio does for every Stable Diffusion model.

Resuming: the guidance is not an ``nn.Module`` (as threestudio's ``StableDiffusionGuidance``), so Lightning's
checkpoint does not hold its state; :meth:`CarvGuidance.state_dict` / :meth:`CarvGuidance.load_state_dict`
(``K``, the generator, the learned proposal and its selector) let a system save and restore it.

A misspelt config key, a value that cannot work, or a call argument of the wrong shape is one ValueError /
TypeError naming it, raised before the teacher loads or the UNet runs.

Every key of threestudio's shipped guidance configs is accepted. Keys for features carv does not implement
(:data:`IGNORED_KEYS`: HiFA's image loss, SJC, token merging, VSD, zero123 / ControlNet / SDI conditioning) are
ignored with one warning each when set to a value that would change anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from carv.objectives.sds import ScoreDistillation
from carv.objectives.weighting import weight_table
from carv.teachers.diffusers import check_device
from carv.timesteps import LearnedProposal, ProposalSelector, TimestepSampler, percent_range, scheduled_value

__all__ = ["CarvGuidance", "CarvGuidanceConfig", "IGNORED_KEYS", "REGISTRY_NAME", "guidance_output", "register"]

REGISTRY_NAME = "carv-stable-diffusion-guidance"
PROPOSALS = ("none", "weight", "learned", "auto")
WEIGHTINGS = {"sds": "sds", "dreamfusion": "sds", "uniform": "uniform", "fantasia3d": "fantasia3d"}
_ANY = object()  # an ignored key that never warns: it only matters with another ignored key
_ZERO123 = "zero123 image conditioning is not implemented (the guidance is text-conditioned SDS)"
_SDI = "SDI's DDIM-inversion noise is not implemented (the guidance draws eps as SDS does)"
_VSD = "VSD is not implemented (the guidance is SDS)"
_CONTROLNET = "ControlNet conditioning is not implemented"

# keys of threestudio's shipped guidance configs that carv accepts but does not act on:
# {key: (values that change nothing, what is not done)}
IGNORED_KEYS: dict[str, tuple[Any, str]] = {
    "use_img_loss": ((False,), "HiFA's image-space loss (loss_sds_img) is not computed"),
    "use_sjc": ((False,), "score Jacobian chaining is not implemented (the guidance is SDS)"),
    "var_red": (_ANY, "used only with use_sjc"),
    "token_merging": ((False,), "tomesd token merging is not applied"),
    "token_merging_params": (({},), "token merging is not applied"),
    "enable_sequential_cpu_offload": ((False,), "the teacher stays on the guidance's device"),
    "max_items_eval": (_ANY, "guidance_eval images are not produced"),
    "guidance_type": (("sds",), _VSD),
    "vsd_phi_model_name_or_path": ((), _VSD),
    "vsd_use_camera_condition": (_ANY, _VSD),
    "pretrained_model_name_or_path_lora": ((), _VSD),
    "return_rgb_1step_orig": ((False,), "one-step denoised images are not returned"),
    "cond_image_path": ((), _ZERO123),
    "cond_elevation_deg": ((), _ZERO123),
    "cond_azimuth_deg": ((), _ZERO123),
    "cond_camera_distance": ((), _ZERO123),
    "pretrained_config": ((), _ZERO123),
    "vram_O": (_ANY, _ZERO123),
    "control_type": ((), _CONTROLNET),
    "condition_scale": ((), _CONTROLNET),
    "fixed_size": ((), _CONTROLNET),
    "enable_sdi": ((False,), _SDI),
    "inversion_guidance_scale": ((), _SDI),
    "inversion_n_steps": ((), _SDI),
    "inversion_eta": ((), _SDI),
    "t_anneal": ((False,), _SDI),
}
WARNED: set[str] = set()  # the ignored keys already warned about in this process


@dataclass
class _KnownConfig:
    """threestudio's ``StableDiffusionGuidance.Config`` fields that carv honours, then carv's own."""

    pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-1-base"
    guidance_scale: float = 100.0  # threestudio's convention
    grad_clip: Any = None  # a number or a schedule (see carv.timesteps.scheduled_value); biases the estimate
    half_precision_weights: bool = True
    min_step_percent: Any = 0.02  # a number or a schedule
    max_step_percent: Any = 0.98
    sqrt_anneal: bool = False  # HiFA: min = max step percent, annealed by sqrt(global_step / trainer_max_steps)
    trainer_max_steps: int = 25000
    weighting_strategy: str = "sds"  # sds (= dreamfusion), uniform, fantasia3d
    view_dependent_prompting: bool = True
    enable_memory_efficient_attention: bool = False  # PyTorch 2's attention is already memory-efficient
    enable_attention_slicing: bool = False
    enable_channels_last_format: bool = False
    # carv
    image_size: int = 512  # threestudio's resize for every SD model; rgb_as_latents inputs go to image_size / 8
    K: int = 4
    proposal: str = "auto"  # uniform, the weight table or the learned one, chosen from the run's own draws
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


CarvGuidanceConfig = dataclasses.make_dataclass(
    "CarvGuidanceConfig", [(k, Any, field(default=None)) for k in IGNORED_KEYS], bases=(_KnownConfig,))
CarvGuidanceConfig.__module__ = __name__
CarvGuidanceConfig.__doc__ = ("threestudio's ``StableDiffusionGuidance.Config`` fields, carv's own (``image_size``, "
                              "``K``, ``proposal``, ...), then the :data:`IGNORED_KEYS` (default None).")


def guidance_output(loss_sds: Tensor, grad: Tensor, min_step: int, max_step: int, out: Any, R: int,
                    accounting: dict | None = None) -> dict[str, Any]:
    """The dict a guidance call returns: numbers and scalar tensors only (threestudio logs every entry).

    ``loss_sds`` (with its graph), ``grad_norm``, ``min_step``, ``max_step`` (threestudio's keys); ``K``, ``R``,
    ``skipped`` (1.0 when the step was dropped by ``nan_policy="skip"``, else 0.0) and the variance components
    ``between`` / ``within`` of the latent-space estimate when they are measurable (``R >= 2``, ``K >= 2``).
    With ``auto_k``, the numeric entries of the accountant's :func:`~carv.accounting.accounting_summary` follow
    as ``accounting_<key>`` (``accounting_bound_ecm``, ``accounting_bound_fraction``, ...; a mix as
    ``accounting_mix_share`` and ``accounting_mix_K``) once they are measured
    (no key starts with ``loss_``: threestudio's systems weight every ``loss_*`` entry)."""
    d: dict[str, Any] = {"loss_sds": loss_sds, "grad_norm": grad.detach().norm(), "min_step": int(min_step),
                         "max_step": int(max_step), "K": int(out.draws.K), "R": int(R),
                         "skipped": float(out.skipped is not None)}
    for name in ("between", "within"):
        value = getattr(out.estimate, name)
        if value is not None:
            d[name] = float(value)
    for key, value in (accounting or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            d[f"accounting_{key}"] = float(value)
    mix = (accounting or {}).get("mix")
    if mix:  # the share of steps the allocator runs at (R, K + 1) (carv.accounting.Allocator.mix_for)
        d["accounting_mix_share"], d["accounting_mix_K"] = float(mix["share"]), float(mix["K"])
    return d


class CarvGuidance:
    """threestudio's SDS guidance call shape with carv's estimator (see the module doc).

    Args:
        cfg: a :class:`CarvGuidanceConfig`, or a dict / OmegaConf config of its fields (as threestudio passes).
        teacher: a :class:`~carv.teachers.diffusers.DiffusersTeacher` built with ``from_pipeline``; if None,
            it is loaded from ``cfg.pretrained_model_name_or_path`` (float16 weights when
            ``half_precision_weights``).
        device: where the teacher runs (default: CUDA if available).

    ``config`` is the parsed :class:`CarvGuidanceConfig` the guidance reads; ``cfg`` is the config as the host
    framework holds it (the same object here; threestudio's OmegaConf config in the registered class).
    """

    Config = CarvGuidanceConfig

    def __init__(self, cfg: Any = None, teacher: Any = None, device: torch.device | str | None = None):
        self.cfg = parse_config(cfg, copy=True)
        self.setup(self.cfg, teacher, device)

    def setup(self, config: Any, teacher: Any = None, device: torch.device | str | None = None) -> None:
        """Build the guidance from a config (everything ``__init__`` does after parsing; threestudio's
        ``configure`` calls it)."""
        c = self.config = parse_config(config)
        check_config(c)
        warn_ignored(c)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if teacher is None:
            from carv.teachers.diffusers import DiffusersTeacher

            dtype = torch.float16 if c.half_precision_weights else torch.float32
            teacher = DiffusersTeacher.from_pretrained(c.pretrained_model_name_or_path, dtype=dtype,
                                                       device=self.device)
        if c.enable_attention_slicing:
            teacher.unet.set_attention_slice(1)
        if c.enable_channels_last_format:
            teacher.unet.to(memory_format=torch.channels_last)
        self.teacher = teacher
        self.weighting = WEIGHTINGS[c.weighting_strategy]
        T = teacher.schedule.num_timesteps
        self.num_train_timesteps = T
        weight = weight_table(self.weighting, teacher.schedule)
        self.learned = LearnedProposal(T, prior=weight) if c.proposal in ("learned", "auto") else None
        # "auto": carv's ProposalSelector compares uniform, the weight table and the learned one on the run's own
        # draws and switches only on a clear gain (its refreshes: every proposal_every steps, sparser once settled)
        self.selector = (ProposalSelector(T, weight=weight, learned=self.learned, start="weight",
                                          every=c.proposal_every) if c.proposal == "auto" else None)
        self.min_step, self.max_step = self.step_range(0, 0)
        sampler = TimestepSampler(T, self.min_step, self.max_step, importance=self._importance(),
                                  floor=c.floor if c.proposal != "none" else 0.0, stratify=c.stratify,
                                  device=self.device)
        self.sds = ScoreDistillation(teacher, sampler, K=c.K, weighting=self.weighting,
                                     guidance_scale=c.guidance_scale, max_batch=c.max_batch, nan_policy=c.nan_policy,
                                     guidance_convention="threestudio")
        self.generator = torch.Generator(self.device).manual_seed(c.seed)
        self.grad_clip_val: float | None = None
        self.steps = 0
        self.last_output = None
        self._last_update: int | None = None
        self.accountant = None
        if c.auto_k:
            from carv.accountant import Accountant

            # threestudio's batch (R) is fixed by its data loader: the accountant chooses K alone
            self.accountant = Accountant(self.sds, params=None, budget=None, probe_every=c.probe_every,
                                         choose_every=c.choose_every, k_range=(2, max(2, c.k_max)), device=self.device,
                                         warmup=1)

    def _importance(self) -> Tensor | None:
        if self.config.proposal == "none":
            return None
        if self.selector is not None:
            return self.selector.table(self.selector.current, (self.min_step, self.max_step))
        if self.config.proposal == "weight" or not self.learned.ready:
            return weight_table(self.weighting, self.teacher.schedule)
        return self.learned.importance((self.min_step, self.max_step))

    def step_range(self, epoch: int, global_step: int) -> tuple[int, int]:
        """``(min_step, max_step)`` at this step, as threestudio's ``update_step``: the scheduled percents, or
        with ``sqrt_anneal`` both at ``max - (max - min) sqrt(global_step / trainer_max_steps)`` (``max`` is
        ``max_step_percent``, or its second entry when it is a schedule)."""
        c = self.config
        lo = _scheduled("min_step_percent", c.min_step_percent, global_step, epoch)
        if not c.sqrt_anneal:
            hi = _scheduled("max_step_percent", c.max_step_percent, global_step, epoch)
            now_lo, now_hi = lo, hi
        else:
            hi = c.max_step_percent if isinstance(c.max_step_percent, (int, float)) else c.max_step_percent[1]
            progress = min(float(global_step) / c.trainer_max_steps, 1.0) ** 0.5
            now_lo = now_hi = (hi - lo) * (1.0 - progress) + lo
        try:
            return percent_range(self.num_train_timesteps, now_lo, now_hi)
        except ValueError as e:
            raise ValueError(f"min_step_percent, max_step_percent: expected fractions of T in [0, 1] with min <= max "
                             f"at every step, got {c.min_step_percent!r} and {c.max_step_percent!r} "
                             f"({now_lo:.4g} and {now_hi:.4g} at global_step {global_step})") from e

    @property
    def K(self) -> int:
        return self.sds.K

    @K.setter
    def K(self, K: int) -> None:  # an accountant re-chooses K between steps
        self.sds.K = K

    # ---------------------------------------------------------------- threestudio's interface
    def encode_images(self, imgs: Tensor) -> Tensor:
        """threestudio's ``encode_images``: images ``[B, 3, H, W]``, floats in ``[0, 1]`` -> latents (a sample of
        the VAE's posterior, drawn with the guidance's generator)."""
        return self.teacher.encode_images(imgs, size=None, generator=self.generator)

    def decode_latents(self, latents: Tensor, latent_height: int = 64, latent_width: int = 64) -> Tensor:
        """threestudio's ``decode_latents``: latents resized (bilinear) to ``latent_height x latent_width``, then
        decoded to images ``[B, 3, 8 latent_height, 8 latent_width]`` in ``[0, 1]``."""
        for name, v in (("latent_height", latent_height), ("latent_width", latent_width)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if not isinstance(latents, Tensor) or latents.ndim != 4:
            raise ValueError(f"latents: expected [B, C, h, w], got "
                             f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
        latents = F.interpolate(latents, (latent_height, latent_width), mode="bilinear", align_corners=False)
        return self.teacher.decode_latents(latents)

    def set_min_max_steps(self, min_step_percent: float = 0.02, max_step_percent: float = 0.98) -> None:
        """threestudio's ``set_min_max_steps``: the timestep range as fractions of ``T`` (the sampler follows)."""
        try:
            lo, hi = percent_range(self.num_train_timesteps, min_step_percent, max_step_percent)
        except (TypeError, ValueError) as e:
            raise ValueError(f"min_step_percent, max_step_percent: expected fractions of T with 0 <= min <= max <= 1, "
                             f"got {min_step_percent!r} and {max_step_percent!r}") from e
        self._set_range(lo, hi)

    def _set_range(self, lo: int, hi: int) -> None:
        if (lo, hi) != (self.min_step, self.max_step):
            self.min_step, self.max_step = lo, hi
            self.sds.sampler.set_t_range(lo, hi)

    def __call__(self, rgb: Tensor, prompt_utils: Any, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor,
                 rgb_as_latents: bool = False, **kwargs) -> dict[str, Any]:
        B = check_call(rgb, prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents,
                       self.teacher.in_channels)
        check_device("rgb", rgb, self.teacher.unet)
        rgb_bchw = rgb.permute(0, 3, 1, 2)
        size = self.config.image_size
        if rgb_as_latents:
            latents = F.interpolate(rgb_bchw, (size // 8, size // 8), mode="bilinear", align_corners=False)
        else:
            latents = self.encode_images(F.interpolate(rgb_bchw, (size, size), mode="bilinear", align_corners=False))
        emb = prompt_utils.get_text_embeddings(elevation, azimuth, camera_distances,
                                               self.config.view_dependent_prompting)
        check_embeddings(emb, B, getattr(self.teacher.unet.config, "cross_attention_dim", None))
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
        if out.skipped is None:
            if self.selector is not None:
                self.selector.update(out.draws.t, out.estimate.sq_norms, self.sds.sampler)
            elif self.learned is not None:
                self.learned.update(out.draws.t, out.estimate.sq_norms)
        self.last_output = out
        acc = self.accountant.summary(proposal=self.proposal) if self.accountant is not None else None
        return guidance_output(loss_sds, grad, self.min_step, self.max_step, out, B, acc)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        """Per-step updates, as threestudio's: grad clipping and the timestep range from their schedules
        (:meth:`step_range`); carv's proposal (``"learned"``: refreshed every ``proposal_every`` steps;
        ``"auto"``: the selector's schedule, counted once per ``global_step``); with ``auto_k``
        the accountant closes the previous step (its time from this call to the last one is the step's cost:
        the guidance call is the draw stage, everything else the upstream stage) and may set a new ``K``.
        The components are those of the latents (the accountant has no access to the scene's parameters).
        threestudio calls this once per batch, validation batches included: repeated calls at one
        ``global_step`` change nothing."""
        c = self.config
        new_step = not on_load_weights and global_step != self._last_update
        if self.accountant is not None and new_step:
            if self.accountant.current is not None and self.accountant.current.R is not None:
                self.accountant.end()
            if self.accountant.current is None:
                self.accountant.begin()
        self._last_update = global_step
        if c.grad_clip is not None:
            self.grad_clip_val = _scheduled("grad_clip", c.grad_clip, global_step, epoch)
        self._set_range(*self.step_range(epoch, global_step))
        if self.selector is not None:
            if new_step:
                self.selector.advance(self.sds.sampler)
        elif self.learned is not None and global_step % c.proposal_every == 0 and self.learned.ready:
            self.sds.sampler.set_importance(self._importance())
        self.steps = global_step

    @property
    def proposal(self) -> str:
        """The proposal in use: the config's, or with ``"auto"`` the selector's current choice (``"uniform"``,
        ``"weight"`` or ``"learned"``)."""
        return self.selector.current if self.selector is not None else self.config.proposal

    # ---------------------------------------------------------------- resuming
    def state_dict(self) -> dict[str, Tensor]:
        """What a resumed run needs to continue as the uninterrupted one (tensors only, safetensors-friendly):
        ``K``, the last ``global_step`` seen, the generator's state, the importance table the sampler uses now
        (empty: ``q = p``), the learned proposal's statistics and the proposal selector's window, choice and
        schedule. The table is saved as used, not rebuilt from the statistics on load: those have moved since the
        last refresh, and a resumed run must draw as the uninterrupted one.
        threestudio's guidances are not ``nn.Module`` s, so Lightning's checkpoint does not hold it: save it from
        the system's ``on_save_checkpoint`` (``checkpoint["carv_guidance"] = self.guidance.state_dict()``) and
        restore it in ``on_load_checkpoint``."""
        state = {"K": torch.tensor(self.K), "steps": torch.tensor(self.steps),
                 "generator": self.generator.get_state()}
        if self.learned is not None:
            state.update({f"learned.{k}": v for k, v in self.learned.state_dict().items()})
        if self.selector is not None:
            state.update({f"selector.{k}": v for k, v in self.selector.state_dict().items()})
        if self.config.proposal != "none":
            state["importance"] = self.sds.sampler.importance_state()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (ValueError naming a missing or extra key)."""
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected the keys {sorted(expected)} (proposal={self.config.proposal!r}), "
                             f"got {got}")
        self.K = int(state["K"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"].cpu())
        if self.learned is not None:
            self.learned.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("learned.")})
        if self.selector is not None:
            self.selector.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                           if k.startswith("selector.")})
        if "importance" in state:
            self.sds.sampler.load_importance_state(state["importance"])


def parse_config(cfg: Any, copy: bool = False) -> CarvGuidanceConfig:
    """A :class:`CarvGuidanceConfig` from None, a config (itself, or a copy), a dict or an OmegaConf config
    (unknown keys: ValueError)."""
    if cfg is None:
        return CarvGuidanceConfig()
    if isinstance(cfg, CarvGuidanceConfig):
        return dataclasses.replace(cfg) if copy else cfg
    if not isinstance(cfg, dict):
        try:  # an OmegaConf DictConfig, as threestudio passes
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # noqa: BLE001 - report what was passed
            raise TypeError(f"cfg: expected a CarvGuidanceConfig, a dict or an OmegaConf config, got "
                            f"{type(cfg).__name__}") from e
    names = {f.name for f in dataclasses.fields(CarvGuidanceConfig)}
    unknown = sorted(set(cfg) - names, key=str)
    if unknown:
        near = {k: difflib.get_close_matches(str(k), names, n=1) for k in unknown}
        hint = "".join(f" ({k!r}: did you mean {m[0]!r}?)" for k, m in near.items() if m)
        raise ValueError(f"cfg: unknown key(s) {unknown}{hint}; allowed: {sorted(names)}")
    return CarvGuidanceConfig(**cfg)


def warn_ignored(config: CarvGuidanceConfig) -> list[str]:
    """Warn (once per key and process) about :data:`IGNORED_KEYS` set to a value that would change something in
    threestudio; returns the keys that are set so."""
    active = []
    for key, (noop, what) in IGNORED_KEYS.items():
        value = getattr(config, key)
        if value is None or noop is _ANY or value in noop:
            continue
        active.append(key)
        if key not in WARNED:
            WARNED.add(key)
            warnings.warn(f"{key}={value!r} is ignored by carv's guidance: {what}", UserWarning, stacklevel=3)
    return active


_BOOLS = ("half_precision_weights", "sqrt_anneal", "view_dependent_prompting", "enable_memory_efficient_attention",
          "enable_attention_slicing", "enable_channels_last_format", "auto_k")
_POSITIVE_INTS = ("K", "trainer_max_steps", "proposal_every", "probe_every", "choose_every")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _scheduled(name: str, spec: Any, global_step: int, epoch: int) -> float:
    """:func:`scheduled_value`, with an error that names the config key."""
    try:
        return scheduled_value(spec, global_step, epoch)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a number or a threestudio schedule ([start_value, end_value, end_step], "
                         f"[start_step, start_value, end_value, end_step] or piecewise), got {spec!r}") from e


def check_config(c: CarvGuidanceConfig) -> None:
    """ValueError / TypeError naming the first config key whose value cannot work (before any model is loaded)."""
    if c.proposal not in PROPOSALS:
        raise ValueError(f"proposal: expected one of {PROPOSALS}, got {c.proposal!r}")
    if c.weighting_strategy not in WEIGHTINGS:
        raise ValueError(f"weighting_strategy: expected one of {sorted(WEIGHTINGS)}, got {c.weighting_strategy!r}")
    if not _is_int(c.image_size) or c.image_size < 8 or c.image_size % 8:
        raise ValueError(f"image_size: expected a positive multiple of 8, got {c.image_size!r}")
    if not isinstance(c.pretrained_model_name_or_path, str) or not c.pretrained_model_name_or_path:
        raise TypeError(f"pretrained_model_name_or_path: expected a model id or a local folder (a string), got "
                        f"{c.pretrained_model_name_or_path!r}")
    for name in _BOOLS:
        if not isinstance(getattr(c, name), bool):
            raise TypeError(f"{name}: expected true or false, got {getattr(c, name)!r}")
    for name in _POSITIVE_INTS:
        if not _is_int(getattr(c, name)) or getattr(c, name) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {getattr(c, name)!r}")
    if not _is_int(c.k_max) or c.k_max < 2:
        raise ValueError(f"k_max: expected an integer >= 2 (the accountant chooses K in [2, k_max]), got {c.k_max!r}")
    if not _is_int(c.seed) or c.seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {c.seed!r}")
    if not isinstance(c.guidance_scale, numbers.Real) or isinstance(c.guidance_scale, bool):
        raise ValueError(f"guidance_scale: expected a number, got {c.guidance_scale!r}")
    for name in ("min_step_percent", "max_step_percent", "grad_clip"):
        if getattr(c, name) is not None:
            _scheduled(name, getattr(c, name), 0, 0)
    if c.grad_clip is not None and _scheduled("grad_clip", c.grad_clip, 0, 0) < 0:
        raise ValueError(f"grad_clip: expected a non-negative number or schedule, got {c.grad_clip!r}")
    if c.sqrt_anneal and not isinstance(c.max_step_percent, numbers.Real):
        try:
            _ = c.max_step_percent[1]
        except (TypeError, IndexError, KeyError) as e:
            raise ValueError(f"max_step_percent: with sqrt_anneal expected a number or a schedule, got "
                             f"{c.max_step_percent!r}") from e


def check_structured(config: CarvGuidanceConfig) -> None:
    """threestudio's ``OmegaConf.structured(Config(**cfg))`` type check (which converts what it can, ``"4"`` to 4,
    ``"no"`` to False), with its error as one ValueError naming the key, the value and the type."""
    try:
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover - threestudio always has OmegaConf
        return
    try:
        OmegaConf.structured(config)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "cfg"
        raise ValueError(f"{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None


def check_embeddings(emb: Any, B: int, width: int | None) -> None:
    """ValueError unless ``prompt_utils.get_text_embeddings`` gave ``[2B, L, D]`` with the UNet's ``D``."""
    if not isinstance(emb, Tensor) or emb.ndim != 3 or emb.shape[0] != 2 * B:
        got = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
        raise ValueError(f"prompt_utils: get_text_embeddings must return [2B, L, D] = [{2 * B}, L, D] (conditional "
                         f"rows, then unconditional), got {got}")
    if width is not None and emb.shape[-1] != width:
        raise ValueError(f"prompt_utils: text embeddings of width {emb.shape[-1]}, but the guidance's UNet takes "
                         f"{width}: the prompt processor and the guidance must load the same model "
                         f"(pretrained_model_name_or_path)")


def check_call(rgb: Any, prompt_utils: Any, elevation: Any, azimuth: Any, camera_distances: Any,
               rgb_as_latents: bool, latent_channels: int) -> int:
    """The batch size ``B`` of a guidance call, after checking its arguments (one-line errors naming them)."""
    if not isinstance(rgb, Tensor) or rgb.ndim != 4:
        raise ValueError(f"rgb: expected a tensor [B, H, W, C], got "
                         f"{tuple(rgb.shape) if isinstance(rgb, Tensor) else type(rgb).__name__}")
    B, C = rgb.shape[0], rgb.shape[-1]
    if rgb_as_latents and C != latent_channels:
        raise ValueError(f"rgb: with rgb_as_latents=True expected latents [B, H, W, {latent_channels}] (channels "
                         f"last), got {tuple(rgb.shape)}")
    if not rgb_as_latents and C != 3:
        hint = ("; for latents pass rgb_as_latents=True" if C == latent_channels else
                "; images are channels last, as threestudio renders them" if rgb.shape[1] == 3 else "")
        raise ValueError(f"rgb: expected images [B, H, W, 3] in [0, 1] (channels last), got "
                         f"{tuple(rgb.shape)}{hint}")
    if not callable(getattr(prompt_utils, "get_text_embeddings", None)):
        raise TypeError(f"prompt_utils: expected threestudio's PromptProcessorOutput or carv's PromptEmbeddings "
                        f"(teacher.encode_prompt(prompt)), got {type(prompt_utils).__name__}")
    for name, v in (("elevation", elevation), ("azimuth", azimuth), ("camera_distances", camera_distances)):
        if v is None and name == "camera_distances":
            continue
        try:
            shape = tuple(torch.as_tensor(v).shape)
        except (TypeError, ValueError, RuntimeError):
            shape = None
        if shape != (B,):
            raise ValueError(f"{name}: expected a tensor [B] with B = {B} (one per render in rgb), got "
                             f"{shape if shape is not None else type(v).__name__}")
    return B


def register() -> type:
    """Register carv's guidance with threestudio as ``"carv-stable-diffusion-guidance"`` (call it from a
    threestudio ``custom/`` extension's ``__init__.py``; calling it again returns the registered class). Needs
    threestudio importable."""
    try:
        import threestudio
        from threestudio.utils.base import BaseObject
    except ImportError as e:
        raise ImportError("register: threestudio is not importable; CarvGuidance works without it, but "
                          "registering needs it installed") from e
    known = getattr(threestudio, "__modules__", {})
    if REGISTRY_NAME in known:
        return known[REGISTRY_NAME]
    return threestudio.register(REGISTRY_NAME)(threestudio_class(BaseObject))


def threestudio_class(base_object: type) -> type:
    """The threestudio guidance class on threestudio's ``BaseObject`` (what :func:`register` registers).

    Its method order puts :class:`CarvGuidance` before ``BaseObject`` (so threestudio's ``do_update_step``
    dispatches to carv's :meth:`~CarvGuidance.update_step`, not to ``Updateable``'s empty one), and its
    ``__init__`` is ``BaseObject.__init__`` (threestudio's order: parse ``cfg`` into ``Config``, ``device =
    get_device()``, ``configure()``), whose ``configure`` builds the guidance from that config."""

    class ThreestudioCarvGuidance(CarvGuidance, base_object):
        Config = CarvGuidanceConfig

        def __init__(self, cfg: Any = None, *args, **kwargs):
            check_structured(parse_config(cfg))  # one line naming a misspelt key or a mistyped value
            base_object.__init__(self, cfg, *args, **kwargs)

        def configure(self, teacher: Any = None) -> None:
            self.setup(self.cfg, teacher=teacher, device=self.device)

    ThreestudioCarvGuidance.__qualname__ = ThreestudioCarvGuidance.__name__
    return ThreestudioCarvGuidance
