"""Score distillation (SDS) through carv's hierarchical estimator.

For each upstream sample ``x_r`` (a render, an encoded image, a generator output) the gradient is

    grad_r = (1/K) sum_k v(t_rk) w(t_rk) (eps_hat(a_t x_r + s_t eps_rk, t_rk, c) - eps_rk)

and ``loss`` is a surrogate whose gradient with respect to ``x_r`` is ``grad_r / R``, so one
``loss.backward()`` pushes the estimate through the upstream computation once per upstream sample,
however large ``K`` is. The teacher is frozen and its Jacobian is skipped (as in DreamFusion).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from carv.estimator import Draws, Estimate, HierarchicalEstimator, UsesEstimator
from carv.objectives.weighting import Weighting, weight_table
from carv.schedules import VPSchedule, broadcast_to
from carv.teachers.base import Teacher, check_finite, repeat_cond
from carv.timesteps import TimestepSampler

__all__ = ["ScoreDistillation", "SDSOutput", "batched_teacher_eps", "residual_estimate"]


@dataclass
class SDSOutput:
    grad: Tensor        # [R, ...] per-upstream estimate of the SDS gradient
    loss: Tensor        # scalar surrogate: d loss / d x[r] = grad[r] / R
    estimate: Estimate  # per-upstream means + variance components + per-draw squared norms
    draws: Draws        # the (t, weight, eps) that were used


def batched_teacher_eps(teacher: Teacher, x_t: Tensor, t: Tensor, cond: Any, guidance_scale: float,
                        max_batch: int | None) -> Tensor:
    """``teacher.guided_eps`` in chunks of at most ``max_batch`` rows, checked for NaN/inf."""
    n = x_t.shape[0]
    if max_batch is None or n <= max_batch:
        eps = teacher.guided_eps(x_t, t, cond, guidance_scale)
    else:
        parts = []
        for i in range(0, n, max_batch):
            c = None if cond is None else (
                {k: v[i:i + max_batch] for k, v in cond.items()} if isinstance(cond, dict) else cond[i:i + max_batch])
            parts.append(teacher.guided_eps(x_t[i:i + max_batch], t[i:i + max_batch], c, guidance_scale))
        eps = torch.cat(parts)
    check_finite(eps, t, "teacher output")
    return eps


def residual_estimate(estimator: HierarchicalEstimator, schedule: VPSchedule, x: Tensor,
                      residual: Callable[[Tensor, Tensor, Tensor], Tensor],
                      generator: torch.Generator | int | None = None, keep_draws: bool = False) -> SDSOutput:
    """The piece every teacher-residual objective shares (SDS, distribution matching).

    Draw ``R x K`` ``(t, eps)`` through ``estimator``, noise ``x`` to ``x_t = a_t x + s_t eps``, evaluate
    ``residual(x_t, t, eps)`` (flat ``[R*K, ...]``, no grad) and reduce it (importance weights, mean over
    ``K``, finiteness check, variance components). ``loss`` is the surrogate whose gradient with respect
    to ``x[r]`` is ``grad[r] / R``, so one backward pass serves all ``K`` draws of an upstream sample.
    """
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"x: expected a tensor of shape [R, ...], got {getattr(x, 'shape', type(x).__name__)}")
    R, K = x.shape[0], estimator.K
    d = estimator.draw(R, x.shape[1:], generator, x.device, x.dtype)
    t, eps = d.t.reshape(-1), d.eps.reshape(R * K, *x.shape[1:])
    with torch.no_grad():
        x_t = schedule.add_noise(x.detach().repeat_interleave(K, 0), t, eps)
        f = residual(x_t, t, eps).reshape(R, K, *x.shape[1:])
        est = estimator.reduce(f, d, keep_draws=keep_draws)
    loss = (est.per_upstream * x).sum() / R
    return SDSOutput(grad=est.per_upstream, loss=loss, estimate=est, draws=d)


class ScoreDistillation(UsesEstimator):
    """SDS gradient estimator.

    Args:
        teacher: a frozen :class:`~carv.teachers.base.Teacher`.
        sampler: the :class:`~carv.TimestepSampler` (proposal, importance weights, stratification).
        K: draws per upstream sample.
        weighting: ``"sds"`` (``w = 1 - alphabar_t``), ``"uniform"`` (``w = 1``) or a callable of ``t``.
        guidance_scale: classifier-free guidance scale (1 = none).
        noise: ``"iid"``, ``"antithetic"`` or ``"crn"``.
        max_batch: largest teacher batch (the ``R*K`` draws are chunked to fit memory).
        distributed: split global strata across ``torch.distributed`` processes (see
            :class:`~carv.estimator.HierarchicalEstimator`); all-reduce the gradients as DDP does.
    """

    def __init__(self, teacher: Teacher, sampler: TimestepSampler, K: int = 1, weighting: Weighting = "sds",
                 guidance_scale: float = 1.0, noise: str = "iid", max_batch: int | None = None,
                 distributed: bool = False):
        if not isinstance(teacher, Teacher):
            raise TypeError(f"teacher: expected a carv Teacher, got {type(teacher).__name__}")
        if sampler.num_timesteps != teacher.schedule.num_timesteps:
            raise ValueError(f"sampler: has {sampler.num_timesteps} timesteps but the teacher's schedule has "
                             f"{teacher.schedule.num_timesteps}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale: expected a non-negative number, got {guidance_scale!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch: expected a positive integer or None, got {max_batch!r}")
        self.teacher = teacher
        self.estimator = HierarchicalEstimator(sampler, K, noise, distributed)
        self.w = weight_table(weighting, teacher.schedule)
        self.guidance_scale = float(guidance_scale)
        self.max_batch = max_batch

    def __call__(self, x: Tensor, cond: Any = None, generator: torch.Generator | int | None = None,
                 keep_draws: bool = False) -> SDSOutput:
        cond_k = repeat_cond(cond, self.K)

        def residual(x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:  # w(t) (eps_hat(x_t, t, c) - eps)
            eps_hat = batched_teacher_eps(self.teacher, x_t, t, cond_k, self.guidance_scale, self.max_batch)
            return broadcast_to(self.w.to(x_t.device, x_t.dtype)[t], x_t) * (eps_hat - eps)

        return residual_estimate(self.estimator, self.teacher.schedule, x, residual, generator, keep_draws)
