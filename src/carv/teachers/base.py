"""The Teacher protocol: a frozen noise predictor on a variance-preserving schedule.

A teacher answers one question: given a noised input ``x_t`` at integer timesteps ``t`` and an
optional condition, what is the noise ``eps``? Everything carv builds (score distillation, distribution
matching, attribution features) only needs :meth:`Teacher.predict_eps` and :attr:`Teacher.schedule`.

Classifier-free guidance is the one piece of logic shared by every teacher, so it lives here:
``eps_u + scale * (eps_c - eps_u)``, with the conditional and unconditional halves evaluated in one
batched call. A teacher supports guidance by returning the unconditional condition from
:meth:`Teacher.null_cond`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from carv.schedules import VPSchedule

__all__ = ["Teacher", "NonFiniteTeacherError", "check_finite"]


class NonFiniteTeacherError(FloatingPointError, ValueError):
    """The teacher produced NaN or inf; the message names the timesteps that did it."""


def check_finite(eps: Tensor, t: Tensor, what: str = "teacher output") -> None:
    """Raise :class:`NonFiniteTeacherError` naming the timesteps whose ``eps`` is NaN or inf."""
    flat = eps.reshape(eps.shape[0], -1) if eps.ndim > 1 else eps.reshape(-1, 1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if bool(bad.any()):
        ts = sorted({int(v) for v in t.reshape(-1)[bad.nonzero().flatten().cpu()].tolist()})
        shown = ts[:20]
        more = f" (and {len(ts) - 20} more)" if len(ts) > 20 else ""
        raise NonFiniteTeacherError(
            f"{what} is NaN or inf for {int(bad.sum())} of {bad.numel()} draws, at timesteps {shown}{more}"
        )


def concat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditions along the batch dimension (tensors, or dicts of tensors)."""
    if isinstance(a, dict):
        return {k: concat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b], 0)


def repeat_cond(cond: Any, repeats: int) -> Any:
    """Repeat each batch row of a condition ``repeats`` times (``[R, ...] -> [R*repeats, ...]``)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: repeat_cond(v, repeats) for k, v in cond.items()}
    return torch.repeat_interleave(cond, repeats, dim=0)


class Teacher(torch.nn.Module):
    """Base class for frozen noise predictors.

    Subclasses implement :meth:`predict_eps` (and :meth:`null_cond` to support guidance).
    """

    schedule: VPSchedule

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        raise NotImplementedError

    def null_cond(self, cond: Any) -> Any:
        """The unconditional counterpart of ``cond`` (same batch size), or ``None`` if unsupported."""
        return None

    def guided_eps(self, x_t: Tensor, t: Tensor, cond: Any = None, guidance_scale: float = 1.0) -> Tensor:
        """Noise prediction with classifier-free guidance ``eps_u + scale (eps_c - eps_u)``."""
        if guidance_scale == 1.0 or cond is None:
            return self.predict_eps(x_t, t, cond)
        null = self.null_cond(cond)
        if null is None:
            raise ValueError(
                f"guidance_scale: {type(self).__name__} has no unconditional branch, so only "
                f"guidance_scale=1.0 is allowed, got {guidance_scale}"
            )
        eps = self.predict_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_cond(cond, null))
        eps_c, eps_u = eps.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)
