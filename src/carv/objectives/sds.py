"""Score distillation (SDS) through carv's hierarchical estimator.

For each upstream sample ``x_r`` (a render, an encoded image, a generator output) the gradient is

    grad_r = (1/K) sum_k v(t_rk) w(t_rk) (eps_hat(a_t x_r + s_t eps_rk, t_rk, c) - eps_rk)

and ``loss`` is a surrogate whose gradient with respect to ``x_r`` is ``grad_r / R``, so one
``loss.backward()`` pushes the estimate through the upstream computation once per upstream sample,
however large ``K`` is. The teacher is frozen and its Jacobian is skipped (as in DreamFusion).

Teacher batches. ``max_batch`` bounds the rows the network actually sees in one call, the guidance-doubled
rows included (with guidance each draw is two rows: conditional and unconditional). The default ``"auto"``
allows the larger of what the same step needs at ``K = 1`` (``R`` rows, ``2 R`` with guidance) and
:data:`AUTO_BATCH_ELEMENTS` input elements (4 rows of Stable Diffusion's ``4 x 64 x 64`` latents), so raising
``K`` adds network calls but hardly any network memory, while small inputs (a toy problem, a 32 px teacher)
are not split into many small calls; ``None`` evaluates all ``R K`` draws in one call.

Non-finite teacher outputs (NaN/inf, common with half-precision weights). ``nan_policy="raise"`` (the
default) raises :class:`~carv.teachers.base.NonFiniteTeacherError` naming the timesteps. ``"skip"`` drops
the whole step: the output has ``skipped`` set (the message), a zero gradient, and a loss whose gradient
is zero; the objective counts the skipped steps in ``skipped_steps``. The steps that are kept are ordinary
unbiased estimates (a step is kept or dropped as a whole, never edited); only if non-finite outputs
concentrate at some timesteps does dropping those steps tilt the run away from them, so fix the precision
when ``skipped_steps`` grows. Replacing NaNs by zeros (``nan_to_num``, as threestudio does) is not offered:
it silently biases the estimate toward zero at exactly the draws that failed.
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
from carv.teachers.base import (
    NonFiniteTeacherError,
    Teacher,
    check_finite,
    guidance_scale_for,
    is_guided,
    repeat_cond,
    slice_cond,
)
from carv.timesteps import TimestepSampler

__all__ = ["NAN_POLICIES", "ScoreDistillation", "SDSOutput", "batched_teacher_eps", "check_max_batch",
           "residual_estimate"]

NAN_POLICIES = ("raise", "skip")
AUTO_BATCH_ELEMENTS = 1 << 16  # max_batch="auto": input elements per network call beyond what K = 1 needs


@dataclass
class SDSOutput:
    grad: Tensor        # [R, ...] per-upstream estimate of the SDS gradient
    loss: Tensor        # scalar surrogate: d loss / d x[r] = grad[r] / R
    estimate: Estimate  # per-upstream means + variance components + per-draw squared norms
    draws: Draws        # the (t, weight, eps) that were used
    skipped: str | None = None  # nan_policy="skip": why this step was dropped (its gradient is zero)


MaxBatch = int | str | None


def check_max_batch(max_batch: MaxBatch) -> None:
    if max_batch is None or max_batch == "auto":
        return
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch: expected a positive integer, 'auto' or None, got {max_batch!r}")


def check_nan_policy(nan_policy: str) -> None:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy: expected one of {NAN_POLICIES} (replacing NaNs by zeros would bias the "
                         f"estimate, so it is not offered), got {nan_policy!r}")


def batched_teacher_eps(teacher: Teacher, x_t: Tensor, t: Tensor, cond: Any, guidance_scale: float,
                        max_batch: int | None, uncond: Any = None) -> Tensor:
    """``teacher.guided_eps`` in chunks whose network batch is at most ``max_batch`` rows, checked for NaN/inf.

    With guidance every draw costs two network rows (conditional and unconditional), so a chunk holds
    ``max_batch // 2`` draws; ``max_batch`` must then be at least 2. ``uncond`` (one row per draw, like
    ``cond``) replaces the teacher's own unconditional condition.
    """
    n = x_t.shape[0]
    rows = 2 if is_guided(guidance_scale, cond) else 1
    if max_batch is None or n * rows <= max_batch:
        eps = teacher.guided_eps(x_t, t, cond, guidance_scale, uncond)
    else:
        per = max_batch // rows
        if per < 1:
            raise ValueError(f"max_batch: with guidance each draw is 2 network rows (conditional and "
                             f"unconditional), so max_batch must be >= 2, got {max_batch}")
        parts = []
        for i in range(0, n, per):
            parts.append(teacher.guided_eps(x_t[i:i + per], t[i:i + per], slice_cond(cond, i, i + per),
                                            guidance_scale, slice_cond(uncond, i, i + per)))
        eps = torch.cat(parts)
    check_finite(eps, t, "teacher output")
    return eps


def residual_estimate(estimator: HierarchicalEstimator, schedule: VPSchedule, x: Tensor,
                      residual: Callable[[Tensor, Tensor, Tensor], Tensor],
                      generator: torch.Generator | int | None = None, keep_draws: bool = False,
                      nan_policy: str = "raise") -> SDSOutput:
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
    try:
        with torch.no_grad():
            x_t = schedule.add_noise(x.detach().repeat_interleave(K, 0), t, eps)
            f = residual(x_t, t, eps).reshape(R, K, *x.shape[1:])
            est = estimator.reduce(f, d, keep_draws=keep_draws)
    except NonFiniteTeacherError as e:
        if nan_policy != "skip":
            raise
        zero = torch.zeros_like(x, requires_grad=False)
        return SDSOutput(grad=zero, loss=(zero * x).sum(), estimate=Estimate(per_upstream=zero, R=R, K=K), draws=d,
                         skipped=str(e))
    loss = (est.per_upstream * x).sum() / R
    return SDSOutput(grad=est.per_upstream, loss=loss, estimate=est, draws=d)


class ScoreDistillation(UsesEstimator):
    """SDS gradient estimator.

    Args:
        teacher: a frozen :class:`~carv.teachers.base.Teacher`.
        sampler: the :class:`~carv.TimestepSampler` (proposal, importance weights, stratification); settable
            between steps (``sds.sampler = ...``), or move its range with ``sds.sampler.set_t_range(...)``.
        K: draws per upstream sample.
        weighting: ``"sds"`` (``w = 1 - alphabar_t``), ``"uniform"`` (``w = 1``), ``"fantasia3d"``
            (``sqrt(alphabar_t)(1 - alphabar_t)``), ``"snr"`` or a callable of ``t``.
        guidance_scale: classifier-free guidance scale, in ``guidance_convention``.
        noise: ``"iid"``, ``"antithetic"`` or ``"crn"``.
        max_batch: the most rows the teacher network sees in one call, guidance rows included; ``"auto"``
            (default): the larger of what ``K = 1`` needs and 65536 input elements, so memory hardly grows
            with ``K`` (see the module doc); None: no chunking. On a large GPU raise it for throughput.
        distributed: split global strata across ``torch.distributed`` processes (see
            :class:`~carv.estimator.HierarchicalEstimator`); all-reduce the gradients as DDP does.
        nan_policy: ``"raise"`` (default) or ``"skip"`` (drop the step and report it; see the module doc).
        guidance_convention: ``"dreamfusion"`` (carv's ``eps_u + s (eps_c - eps_u)``, default) or
            ``"threestudio"`` (``eps_c + s (eps_c - eps_u)``, i.e. carv's ``s + 1``).
    """

    def __init__(self, teacher: Teacher, sampler: TimestepSampler, K: int = 1, weighting: Weighting = "sds",
                 guidance_scale: float = 1.0, noise: str = "iid", max_batch: MaxBatch = "auto",
                 distributed: bool = False, nan_policy: str = "raise", guidance_convention: str = "dreamfusion"):
        if not isinstance(teacher, Teacher):
            hint = (" (for a diffusers pipeline use carv.teachers.DiffusersTeacher.from_pipeline(pipe))"
                    if hasattr(teacher, "unet") else "")
            raise TypeError(f"teacher: expected a carv Teacher, got {type(teacher).__name__}{hint}")
        if not isinstance(sampler, TimestepSampler):
            raise TypeError(f"sampler: expected a carv.TimestepSampler, got {type(sampler).__name__}")
        if sampler.num_timesteps != teacher.schedule.num_timesteps:
            raise ValueError(f"sampler: has {sampler.num_timesteps} timesteps but the teacher's schedule has "
                             f"{teacher.schedule.num_timesteps}")
        check_max_batch(max_batch)
        check_nan_policy(nan_policy)
        self.teacher = teacher
        self.estimator = HierarchicalEstimator(sampler, K, noise, distributed)
        self.w = weight_table(weighting, teacher.schedule)
        self.guidance_convention = guidance_convention
        self.guidance_scale = guidance_scale_for(guidance_scale, guidance_convention)  # in carv's convention
        self.max_batch = max_batch
        self.nan_policy = nan_policy
        self.skipped_steps = 0

    def teacher_batch(self, x: Tensor, guided: bool) -> int | None:
        """The largest network batch a call on upstream samples ``x`` ``[R, ...]`` may use (``max_batch`` resolved)."""
        if self.max_batch == "auto":
            R, per_row = x.shape[0], max(1, x[0].numel())
            return max(R * (2 if guided else 1), AUTO_BATCH_ELEMENTS // per_row)
        return self.max_batch

    def __call__(self, x: Tensor, cond: Any = None, generator: torch.Generator | int | None = None,
                 keep_draws: bool = False, uncond: Any = None) -> SDSOutput:
        """The SDS estimate for upstream samples ``x`` ``[R, ...]``.

        ``cond`` is one condition per upstream sample (``[R, ...]``, e.g. per-view text embeddings ``[R, L, D]``,
        or a dict of such tensors); ``uncond`` (same shape) is the unconditional condition per upstream sample
        for guidance (e.g. per-view negative embeddings), replacing the teacher's own.
        """
        cond_k, uncond_k = repeat_cond(cond, self.K), repeat_cond(uncond, self.K)
        max_batch = self.teacher_batch(x, is_guided(self.guidance_scale, cond)) if isinstance(x, Tensor) and x.ndim \
            else None  # residual_estimate names a bad x

        def residual(x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:  # w(t) (eps_hat(x_t, t, c) - eps)
            eps_hat = batched_teacher_eps(self.teacher, x_t, t, cond_k, self.guidance_scale, max_batch, uncond_k)
            return broadcast_to(self.w.to(x_t.device, x_t.dtype)[t], x_t) * (eps_hat - eps)

        out = residual_estimate(self.estimator, self.teacher.schedule, x, residual, generator, keep_draws,
                                self.nan_policy)
        if out.skipped is not None:
            self.skipped_steps += 1
        return out
