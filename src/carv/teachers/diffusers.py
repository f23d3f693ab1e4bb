"""Adapter for diffusers UNets: ``UNet2DModel`` and ``UNet2DConditionModel`` with any scheduler that
has ``alphas_cumprod`` (DDPM, DDIM, PNDM, Euler, ...), so carv estimators drive real Stable Diffusion
teachers on GPU.

diffusers is an optional extra (``pip install carv[diffusers]``); it is imported only when a
:class:`DiffusersTeacher` is built. The adapter returns ``eps`` whatever the model predicts:

- ``epsilon``: the output itself;
- ``v_prediction`` (``v = a eps - s x_0``): ``eps = s x_t + a v``;
- ``sample`` (``x_0``): ``eps = (x_t - a x_0) / s``.

Models with learned variance (twice the input channels out) keep the first half.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from carv.schedules import VPSchedule, broadcast_to
from carv.teachers.base import Teacher

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
            raise TypeError(f"unet: expected a diffusers UNet2DModel or UNet2DConditionModel, "
                            f"got {type(unet).__name__}")
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
        if uncond is not None and self.kind == "condition":
            uncond = torch.as_tensor(uncond)
            if uncond.ndim == 2:
                uncond = uncond[None]
            if uncond.ndim != 3 or uncond.shape[0] != 1:
                raise ValueError(f"uncond: expected an embedding [1, L, D] or [L, D], got {tuple(uncond.shape)}")
            self.register_buffer("uncond", uncond.detach())
        else:
            self.uncond = uncond
        self.in_channels = unet.config.in_channels
        if freeze:
            self.unet.requires_grad_(False)

    def _forward(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        if self.kind == "condition":
            if cond is None:
                raise ValueError("cond: a UNet2DConditionModel needs encoder_hidden_states [B, L, D], got None")
            out = self.unet(x_t, t, encoder_hidden_states=cond.to(x_t.dtype)).sample
        else:
            out = self.unet(x_t, t, class_labels=cond).sample
        if out.shape[1] == 2 * self.in_channels:
            out = out[:, : self.in_channels]
        return out

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
        B = cond.shape[0]
        if self.kind == "condition":
            return self.uncond.to(cond.device, cond.dtype).expand(B, *self.uncond.shape[1:])
        return torch.full((B,), int(self.uncond), dtype=torch.long, device=cond.device)
