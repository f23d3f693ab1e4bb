"""The Teacher protocol: a frozen noise predictor on a variance-preserving schedule.

A teacher answers one question: given a noised input ``x_t`` at integer timesteps ``t`` and an
optional condition, what is the noise ``eps``? Everything carv builds (score distillation, distribution
matching, attribution features) only needs :meth:`Teacher.predict_eps` and :attr:`Teacher.schedule`.

Classifier-free guidance is the one piece of logic shared by every teacher, so it lives here:
``eps_u + scale * (eps_c - eps_u)``, with the conditional and unconditional halves evaluated in one
batched call. A teacher supports guidance by returning the unconditional condition from
:meth:`Teacher.null_cond` (or the caller passes its own, e.g. one negative embedding per view).

Guidance conventions. carv (and DreamFusion, diffusers) write guidance as ``eps_u + s (eps_c - eps_u)``, so
``s = 1`` is the plain conditional model. threestudio writes ``eps_c + s (eps_c - eps_u)``, which is
``eps_u + (s + 1)(eps_c - eps_u)``: **carv at s + 1 equals threestudio at s** (threestudio's default 100 is
carv's 101). :func:`guidance_scale_for` converts a scale given in either convention to carv's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from carv.schedules import VPSchedule

__all__ = ["GUIDANCE_CONVENTIONS", "Teacher", "NonFiniteTeacherError", "check_finite", "guidance_scale_for",
           "is_guided", "check_cond_batch", "repeat_cond", "slice_cond"]

GUIDANCE_CONVENTIONS = ("dreamfusion", "threestudio")


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


def slice_cond(cond: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a condition (a tensor, a dict of conditions, or None)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: slice_cond(v, start, stop) for k, v in cond.items()}
    return cond[start:stop]


def check_cond_batch(cond: Any, batch: int, name: str = "cond") -> None:
    """Raise ``ValueError`` naming ``name`` (and the dict key) unless every tensor of ``cond`` (a tensor, a dict of
    them, or None) has ``batch`` rows: one condition per upstream sample."""
    if cond is None:
        return
    if isinstance(cond, dict):
        for k, v in cond.items():
            check_cond_batch(v, batch, f"{name}[{k!r}]")
        return
    if not isinstance(cond, Tensor):
        raise TypeError(f"{name}: expected a tensor [R, ...], a dict of them, or None, got {type(cond).__name__}")
    if cond.ndim == 0 or cond.shape[0] != batch:
        raise ValueError(f"{name}: expected one row per upstream sample, i.e. shape [{batch}, ...] (x has R = "
                         f"{batch}), got shape {tuple(cond.shape)}")


def guidance_scale_for(guidance_scale: float, convention: str = "dreamfusion") -> float:
    """carv's scale for ``guidance_scale`` given in ``convention``: ``"dreamfusion"`` (carv's own,
    ``eps_u + s (eps_c - eps_u)``) returns it unchanged, ``"threestudio"`` (``eps_c + s (eps_c - eps_u)``)
    returns ``s + 1``."""
    if convention not in GUIDANCE_CONVENTIONS:
        raise ValueError(f"guidance_convention: expected one of {GUIDANCE_CONVENTIONS}, got {convention!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
        raise ValueError(f"guidance_scale: expected a non-negative number, got {guidance_scale!r}")
    return float(guidance_scale) + (1.0 if convention == "threestudio" else 0.0)


def is_guided(guidance_scale: float, cond: Any) -> bool:
    """Whether :meth:`Teacher.guided_eps` runs the conditional and the unconditional branch (two network rows
    per draw) rather than the conditional model alone."""
    return guidance_scale != 1.0 and cond is not None


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

    def guided_eps(self, x_t: Tensor, t: Tensor, cond: Any = None, guidance_scale: float = 1.0,
                   uncond: Any = None) -> Tensor:
        """Noise prediction with classifier-free guidance ``eps_u + scale (eps_c - eps_u)``.

        ``uncond`` (same batch as ``cond``, e.g. a negative embedding per view) replaces :meth:`null_cond`."""
        if not is_guided(guidance_scale, cond):
            return self.predict_eps(x_t, t, cond)
        null = uncond if uncond is not None else self.null_cond(cond)
        if null is None:
            raise ValueError(
                f"guidance_scale: {type(self).__name__} has no unconditional branch, so only "
                f"guidance_scale=1.0 is allowed, got {guidance_scale}"
            )
        eps = self.predict_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_cond(cond, null))
        eps_c, eps_u = eps.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)
