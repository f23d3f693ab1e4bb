"""Adapter for diffusers UNets: ``UNet2DModel`` and ``UNet2DConditionModel`` with any scheduler that
has ``alphas_cumprod`` (DDPM, DDIM, PNDM, Euler, ...), so carv estimators drive real Stable Diffusion
teachers on GPU.

diffusers is an optional extra (``pip install carv[diffusers]``); it is imported only when a
:class:`DiffusersTeacher` is built. The adapter returns ``eps`` whatever the model predicts:

- ``epsilon``: the output itself;
- ``v_prediction`` (``v = a eps - s x_0``): ``eps = s x_t + a v``;
- ``sample`` (``x_0``): ``eps = (x_t - a x_0) / s``.

Models with learned variance (twice the input channels out) keep the first half.

Precision: the UNet may hold float16 / bfloat16 weights (threestudio's default is half precision). Inputs
are cast to the UNet's dtype and its output back to the caller's, and the conversions above run in the
caller's dtype, so float32 latents in give float32 noise out.

Conditioning: ``cond`` is ``encoder_hidden_states`` ``[B, L, D]`` (a conditional UNet), ``class_labels``
(a ``UNet2DModel``), or a dict of UNet keyword arguments (``{"encoder_hidden_states": ..., "class_labels":
..., "added_cond_kwargs": {...}}``); carv's objectives slice and repeat dicts of tensors like tensors.

:meth:`DiffusersTeacher.from_pipeline` builds the teacher from a Stable Diffusion 1.x / 2.x pipeline and
keeps its VAE and text encoder: :meth:`~DiffusersTeacher.encode_prompt` (view-dependent, threestudio's rule,
see :mod:`carv.teachers.prompts`) and :meth:`~DiffusersTeacher.encode_images` (the latent upstream step).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from carv.schedules import VPSchedule, broadcast_to
from carv.teachers.base import Teacher
from carv.teachers.prompts import DIRECTIONS, PromptEmbeddings, view_prompts

__all__ = ["DiffusersTeacher"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DiffusersTeacher(Teacher):
    """Wrap a diffusers UNet + scheduler as a carv :class:`Teacher`.

    Args:
        unet: ``UNet2DModel`` (``cond`` = ``class_labels``, or None) or ``UNet2DConditionModel``
            (``cond`` = ``encoder_hidden_states`` ``[B, L, D]``).
        scheduler: any diffusers scheduler with ``alphas_cumprod``.
        uncond: the unconditional condition for classifier-free guidance: an embedding ``[1, L, D]``
            (or ``[L, D]``) for a conditional UNet, or a class label (int) for a class-conditional
            ``UNet2DModel``. None disables guidance.
        prediction_type: override ``scheduler.config.prediction_type``.
        freeze: set ``requires_grad_(False)`` on the UNet (the teacher is frozen in score distillation;
            attribution passes ``freeze=False`` to differentiate through the parameters).
    """

    def __init__(self, unet: torch.nn.Module, scheduler: Any, uncond: Tensor | int | None = None,
                 prediction_type: str | None = None, freeze: bool = True):
        super().__init__()
        try:
            from diffusers import UNet2DConditionModel, UNet2DModel
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError("DiffusersTeacher needs diffusers: pip install 'carv[diffusers]'") from e
        if isinstance(unet, UNet2DConditionModel):
            self.kind = "condition"
        elif isinstance(unet, UNet2DModel):
            self.kind = "unet2d"
        else:
            hint = "; for a pipeline use DiffusersTeacher.from_pipeline(pipe)" if hasattr(unet, "unet") else ""
            raise TypeError(f"unet: expected a diffusers UNet2DModel or UNet2DConditionModel, "
                            f"got {type(unet).__name__}{hint}")
        self.unet = unet
        self.schedule = VPSchedule.from_diffusers(scheduler)
        cfg_pt = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
        self.prediction_type = prediction_type or cfg_pt
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        n_train = getattr(getattr(scheduler, "config", None), "num_train_timesteps", self.schedule.num_timesteps)
        if n_train != self.schedule.num_timesteps:
            raise ValueError(f"scheduler: num_train_timesteps={n_train} but alphas_cumprod has "
                             f"{self.schedule.num_timesteps} entries")
        self.uncond = None
        self.set_uncond(uncond)
        self.in_channels = unet.config.in_channels
        self.vae = self.text_encoder = self.tokenizer = None
        if freeze:
            self.unet.requires_grad_(False)

    def set_uncond(self, uncond: Tensor | int | None) -> None:
        """The unconditional condition guidance uses when the caller passes none (``[1, L, D]`` or ``[L, D]``
        for a conditional UNet, a class label for a ``UNet2DModel``; None disables guidance). Per-view
        negatives ``[B, L, D]`` are passed per call instead (``ScoreDistillation(..., uncond=...)``)."""
        if uncond is not None and self.kind == "condition":
            uncond = torch.as_tensor(uncond)
            if uncond.ndim == 2:
                uncond = uncond[None]
            if uncond.ndim != 3 or uncond.shape[0] != 1:
                raise ValueError(f"uncond: expected an embedding [1, L, D] or [L, D] (pass per-view negatives "
                                 f"[B, L, D] per call as uncond=...), got {tuple(uncond.shape)}")
            if "uncond" in self._buffers:
                self._buffers["uncond"] = uncond.detach()
            else:
                self.__dict__.pop("uncond", None)
                self.register_buffer("uncond", uncond.detach())
        else:
            self._buffers.pop("uncond", None)
            self.uncond = uncond

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's parameter dtype (inputs are cast to it)."""
        return next(self.unet.parameters()).dtype

    def _forward(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        dtype = self.dtype
        if isinstance(cond, dict):
            kwargs = _cast_floats(cond, dtype)
        elif self.kind == "condition":
            kwargs = {"encoder_hidden_states": None if cond is None else cond.to(dtype)}
        else:
            kwargs = {"class_labels": cond}
        if self.kind == "condition" and kwargs.get("encoder_hidden_states") is None:
            raise ValueError("cond: a UNet2DConditionModel needs encoder_hidden_states [B, L, D], got None")
        if x_t.ndim != 4 or x_t.shape[1] != self.in_channels:
            hint = (" (images? encode them to latents first: teacher.encode_images(rgb) for rgb in [0, 1])"
                    if x_t.ndim == 4 and x_t.shape[1] == 3 else "")
            raise ValueError(f"x_t: the UNet takes [B, {self.in_channels}, H, W], got {tuple(x_t.shape)}{hint}")
        out = self.unet(x_t.to(dtype), t, **kwargs).sample
        if out.shape[1] == 2 * self.in_channels:
            out = out[:, : self.in_channels]
        return out.to(x_t.dtype)

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        out = self._forward(x_t, t, cond)
        if self.prediction_type == "epsilon":
            return out
        a = broadcast_to(self.schedule.a(t, out.dtype), out)
        s = broadcast_to(self.schedule.s(t, out.dtype), out)
        if self.prediction_type == "v_prediction":
            return s * x_t + a * out
        return (x_t - a * out) / s

    def null_cond(self, cond: Any) -> Any:
        if self.uncond is None or cond is None:
            return None
        if isinstance(cond, dict):  # replace the text (or class) condition, keep every other UNet argument
            key = "encoder_hidden_states" if self.kind == "condition" else "class_labels"
            if key not in cond:
                return None
            return {**cond, key: self.null_cond(cond[key])}
        B = cond.shape[0]
        if self.kind == "condition":
            return self.uncond.to(cond.device, cond.dtype).expand(B, *self.uncond.shape[1:])
        return torch.full((B,), int(self.uncond), dtype=torch.long, device=cond.device)

    # ---------------------------------------------------------------- Stable Diffusion pipelines
    @classmethod
    def from_pipeline(cls, pipe: Any, negative_prompt: str = "", dtype: torch.dtype | None = None,
                      prediction_type: str | None = None, scheduler: Any = None,
                      device: torch.device | str | None = None) -> DiffusersTeacher:
        """A teacher from a diffusers Stable Diffusion 1.x / 2.x pipeline (epsilon or v-prediction).

        Keeps the pipeline's VAE, text encoder and tokenizer for :meth:`encode_images` and
        :meth:`encode_prompt`; the unconditional embedding for guidance is ``negative_prompt`` encoded.
        ``dtype`` casts the UNet, VAE and text encoder (e.g. ``torch.float16`` as threestudio's
        ``half_precision_weights``); inputs stay in the caller's dtype. ``scheduler`` replaces
        ``pipe.scheduler`` (any scheduler with ``alphas_cumprod``).
        """
        parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        missing = [k for k in parts if getattr(pipe, k, None) is None]
        if missing:
            raise TypeError(f"pipe: expected a diffusers Stable Diffusion pipeline with unet, vae, text_encoder, "
                            f"tokenizer and scheduler; {type(pipe).__name__} lacks {missing}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt: expected a string, got {type(negative_prompt).__name__}")
        if getattr(pipe.tokenizer, "pad_token", None) is None:
            raise ValueError(f"pipe.tokenizer: {type(pipe.tokenizer).__name__} has no pad_token, and prompts are "
                             f"padded to one length; set pipe.tokenizer.pad_token (Stable Diffusion 1.x pads with the "
                             f"eos_token, {getattr(pipe.tokenizer, 'eos_token', None)!r})")
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):
            if dtype is not None and next(part.parameters()).dtype != dtype:
                part.to(dtype=dtype)
            if device is not None:
                part.to(device)
            part.eval()
        teacher = cls(pipe.unet, scheduler if scheduler is not None else pipe.scheduler,
                      prediction_type=prediction_type)
        teacher.vae, teacher.text_encoder, teacher.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        teacher.vae.requires_grad_(False)
        teacher.text_encoder.requires_grad_(False)
        teacher.negative_prompt = negative_prompt
        teacher.set_uncond(teacher.encode_text([negative_prompt]))
        return teacher

    @classmethod
    def from_pretrained(cls, path: str, negative_prompt: str = "", dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, **kwargs) -> DiffusersTeacher:
        """:meth:`from_pipeline` on ``StableDiffusionPipeline.from_pretrained(path)`` (a local folder as
        ``save_pretrained`` writes it; nothing is downloaded when ``HF_HUB_OFFLINE=1``)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, use_safetensors=True,
                                                       **kwargs)
        return cls.from_pipeline(pipe, negative_prompt, dtype=dtype, device=device)

    def _need(self, what: str) -> None:
        if getattr(self, what) is None:
            raise ValueError(f"{what}: this DiffusersTeacher has none; build it with DiffusersTeacher.from_pipeline")

    @property
    def text_length(self) -> int:
        """Tokens per prompt: the tokenizer's ``model_max_length``, capped by the text encoder's
        ``max_position_embeddings`` (a tokenizer built from vocab/merges files has no length of its own)."""
        self._need("tokenizer")
        n = getattr(self.tokenizer, "model_max_length", None)
        limit = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", None)
        if n is not None and (not isinstance(n, int) or n < 1):
            n = None  # unset or meaningless: the text encoder's length
        if limit is not None and (n is None or n > limit):
            return int(limit)
        if n is None or n > 1_000_000:
            raise ValueError(f"tokenizer: model_max_length is {n!r} and the text encoder states no "
                             f"max_position_embeddings; set tokenizer.model_max_length")
        return int(n)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """Text-encoder hidden states ``[len(prompts), L, D]`` (float32), padded to the tokenizer's length."""
        self._need("text_encoder")
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a list of strings, got {prompts!r}")
        if len(prompts) == 0:
            raise ValueError("prompts: expected at least one prompt, got an empty list")
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.text_length, truncation=True,
                             return_tensors="pt")
        dev = next(self.text_encoder.parameters()).device
        return self.text_encoder(tok.input_ids.to(dev))[0].float()

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None, view_dependent: bool = True,
                      negative_prompts_vd: dict[str, str] | None = None, front_threshold: float = 45.0,
                      back_threshold: float = 45.0, overhead_threshold: float = 60.0) -> PromptEmbeddings:
        """Embeddings of ``prompt`` and ``negative_prompt`` (default: the teacher's), plain and per direction.

        With ``view_dependent`` the direction prompts are ``"<prompt>, side view"`` etc. (threestudio's rule,
        :mod:`carv.teachers.prompts`); ``negative_prompts_vd`` ({direction: text}) overrides the negative of
        some directions. Use ``emb.for_views(elevation, azimuth)`` for per-view ``(cond, uncond)``.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt: expected a string or None, got {type(negative_prompt).__name__}")
        for name, v in (("front_threshold", front_threshold), ("back_threshold", back_threshold),
                        ("overhead_threshold", overhead_threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}: expected an angle in degrees (a number), got {v!r}")
        neg = getattr(self, "negative_prompt", "") if negative_prompt is None else negative_prompt
        neg_vd = dict.fromkeys(DIRECTIONS, neg)
        for k, v in (negative_prompts_vd or {}).items():
            if k not in DIRECTIONS:
                raise ValueError(f"negative_prompts_vd: keys must be among {DIRECTIONS}, got {k!r}")
            if not isinstance(v, str):
                raise TypeError(f"negative_prompts_vd[{k!r}]: expected a string, got {type(v).__name__}")
            neg_vd[k] = v
        pos_vd = view_prompts(prompt) if view_dependent else [prompt] * len(DIRECTIONS)
        if not view_dependent:
            neg_vd = dict.fromkeys(DIRECTIONS, neg)
        emb = self.encode_text([prompt, neg, *pos_vd, *(neg_vd[d] for d in DIRECTIONS)])
        n = len(DIRECTIONS)
        return PromptEmbeddings(emb[0:1], emb[1:2], emb[2:2 + n], emb[2 + n:], front_threshold=front_threshold,
                                back_threshold=back_threshold, overhead_threshold=overhead_threshold,
                                prompt=prompt, negative_prompt=neg)

    def encode_images(self, rgb: Tensor, size: int | None = 512, chunk: int | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
        """VAE latents ``[B, 4, size/8, size/8]`` of images ``rgb [B, 3, H, W]``, floats in ``[0, 1]``
        (differentiable).

        Integer images (uint8 0-255) raise TypeError and values outside ``[0, 1]`` by more than 0.05 (``[-1, 1]``
        or 0-255 floats) raise ValueError: divide 0-255 images by 255, map ``[-1, 1]`` ones by ``(x + 1) / 2``.
        The images are resized (bilinear) to ``size`` (None keeps them), mapped to ``[-1, 1]``, encoded in
        the VAE's dtype, scaled by its ``scaling_factor`` and returned in ``rgb``'s dtype. With a
        ``generator`` the latents are sampled from the VAE's posterior (as threestudio does); without one
        they are its mean (deterministic). ``chunk`` encodes at most that many images at a time.
        """
        self._need("vae")
        if not isinstance(rgb, Tensor) or rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"rgb: expected images [B, 3, H, W] in [0, 1], got "
                             f"{tuple(rgb.shape) if isinstance(rgb, Tensor) else type(rgb).__name__}")
        check_device("rgb", rgb, self.vae)
        if rgb.shape[0] == 0:
            raise ValueError("rgb: expected at least one image, got a batch of 0")
        check_unit_images(rgb)
        if size is not None and (not isinstance(size, numbers.Integral) or isinstance(size, bool)
                                 or size < 8 or size % 8):
            raise ValueError(f"size: expected a positive multiple of 8 (the VAE halves the size 3 times) or None, "
                             f"got {size!r}")
        if size is None and min(rgb.shape[-2:]) < 8:
            raise ValueError(f"rgb: expected images of at least 8 x 8 px (or pass size=512), got "
                             f"{tuple(rgb.shape[-2:])}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk: expected a positive integer or None, got {chunk!r}")
        if size is not None and tuple(rgb.shape[-2:]) != (size, size):
            rgb = F.interpolate(rgb, (size, size), mode="bilinear", align_corners=False)
        vdtype = next(self.vae.parameters()).dtype
        step = chunk or rgb.shape[0]
        parts = []
        for i in range(0, rgb.shape[0], step):
            post = self.vae.encode((rgb[i:i + step] * 2.0 - 1.0).to(vdtype)).latent_dist
            parts.append(post.sample(generator) if generator is not None else post.mean)
        return (torch.cat(parts) * self.vae.config.scaling_factor).to(rgb.dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, 8h, 8w]`` in ``[0, 1]`` from VAE latents ``[B, 4, h, w]`` (the inverse of
        :meth:`encode_images`; differentiable), in ``latents``' dtype."""
        self._need("vae")
        if not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[1] != self.vae.config.latent_channels:
            raise ValueError(f"latents: expected [B, {self.vae.config.latent_channels}, h, w], got "
                             f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
        if not latents.is_floating_point():
            raise TypeError(f"latents: expected floating-point latents, got dtype {latents.dtype}")
        check_device("latents", latents, self.vae)
        vdtype = next(self.vae.parameters()).dtype
        img = self.vae.decode((latents / self.vae.config.scaling_factor).to(vdtype)).sample
        return (img * 0.5 + 0.5).clamp(0, 1).to(latents.dtype)


def check_device(name: str, x: Tensor, module: torch.nn.Module) -> None:
    """ValueError unless ``x`` is on the device of ``module``'s parameters."""
    where = next(module.parameters()).device
    if x.device != where:
        raise ValueError(f"{name}: on {x.device}, but the teacher's {type(module).__name__} is on {where}; move it "
                         f"with {name}.to({str(where)!r})")


def check_unit_images(rgb: Tensor, tol: float = 0.05) -> None:
    """TypeError unless ``rgb`` is floating point, ValueError unless its values lie in ``[0, 1]`` (within ``tol``)."""
    if not rgb.is_floating_point():
        raise TypeError(f"rgb: expected floating-point images in [0, 1], got dtype {rgb.dtype}"
                        + (" (0-255 images: pass rgb.float() / 255)" if rgb.dtype == torch.uint8 else ""))
    if rgb.numel() == 0:
        return
    bad = ~torch.isfinite(rgb.detach())
    if bool(bad.any()):
        rows = torch.nonzero(bad.flatten(1).any(1)).flatten().tolist() if rgb.ndim > 1 else [0]
        raise ValueError(f"rgb: expected finite floats in [0, 1], got {int(bad.sum())} NaN or inf value(s) in "
                         f"image(s) {rows[:20]} of {rgb.shape[0]}")
    lo, hi = (float(v) for v in torch.aminmax(rgb.detach()))
    if lo < -tol or hi > 1.0 + tol:
        fix = "divide by 255" if hi > 2.0 else "map [-1, 1] images by (x + 1) / 2" if lo < -tol else "clamp them"
        raise ValueError(f"rgb: expected floats in [0, 1], got values in [{lo:.4g}, {hi:.4g}] ({fix})")


def _cast_floats(cond: Any, dtype: torch.dtype) -> Any:
    if isinstance(cond, dict):
        return {k: _cast_floats(v, dtype) for k, v in cond.items()}
    if isinstance(cond, Tensor) and cond.is_floating_point():
        return cond.to(dtype)
    return cond
