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
are not split into many small calls; ``None`` evaluates each block of draws in one call (all ``R K`` unless
they stream, see :func:`carv.estimator.residual_estimate`). A call whose estimated activations cannot fit the free
memory is refused before it is made (:class:`MemoryBudgetError`, naming ``max_batch``).

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

from typing import Any

import torch
from torch import Tensor

from carv._machine import MemoryBudgetError, check_fits
from carv.estimator import (
    HierarchicalEstimator,
    SDSOutput,
    UsesEstimator,
    residual_estimate,
)
from carv.objectives.weighting import Weighting, weight_table
from carv.schedules import broadcast_to
from carv.teachers.base import (
    Teacher,
    check_cond_batch,
    check_finite,
    guidance_scale_for,
    is_guided,
    repeat_cond,
    slice_cond,
)
from carv.timesteps import TimestepSampler

__all__ = ["NAN_POLICIES", "MemoryBudgetError", "ScoreDistillation", "SDSOutput", "batched_teacher_eps",
           "check_max_batch", "residual_estimate"]

NAN_POLICIES = ("raise", "skip")
AUTO_BATCH_ELEMENTS = 1 << 16  # max_batch="auto": input elements per network call beyond what K = 1 needs
# Assumed activation bytes per input byte of one network row, for the check before a teacher call: the scenes
# teacher (3x32x32) peaks at about 1.5 MB per UNet row, ~130x its 12 KB input (larger UNets need more, so the
# check only catches calls that certainly cannot fit; the allocator's own error remains for the rest).
ACTIVATION_FACTOR = 128


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
    ``cond``) replaces the teacher's own unconditional condition. A chunk whose estimated activations
    (:data:`ACTIVATION_FACTOR` times its input) cannot fit the free memory is refused before the call, naming
    ``max_batch``.
    """
    n = x_t.shape[0]
    rows = 2 if is_guided(guidance_scale, cond) else 1
    per = n if max_batch is None else max_batch // rows
    if per < 1:
        raise ValueError(f"max_batch: with guidance each draw is 2 network rows (conditional and "
                         f"unconditional), so max_batch must be >= 2, got {max_batch}")
    per = min(per, n)
    check_fits(per * rows * x_t[0].numel() * x_t.element_size() * ACTIVATION_FACTOR, x_t.device, "max_batch",
               f"a teacher call of {per * rows} network rows of shape {tuple(x_t.shape[1:])} "
               f"(max_batch={max_batch!r}); pass a smaller max_batch, e.g. 'auto'")
    if per >= n:
        eps = teacher.guided_eps(x_t, t, cond, guidance_scale, uncond)
    else:
        parts = []
        for i in range(0, n, per):
            parts.append(teacher.guided_eps(x_t[i:i + per], t[i:i + per], slice_cond(cond, i, i + per),
                                            guidance_scale, slice_cond(uncond, i, i + per)))
        eps = torch.cat(parts)
    check_finite(eps, t, "teacher output")
    return eps


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
            with ``K`` (see the module doc); None: one call per block of draws. On a large GPU raise it for throughput.
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
        if isinstance(x, Tensor) and x.ndim:  # residual_estimate checks x itself before any draw
            check_cond_batch(cond, x.shape[0], "cond")
            check_cond_batch(uncond, x.shape[0], "uncond")

        def residual(x_t: Tensor, t: Tensor, eps: Tensor, k: int) -> Tensor:  # w(t) (eps_hat(x_t, t, c) - eps)
            max_batch = self.teacher_batch(x, is_guided(self.guidance_scale, cond))
            eps_hat = batched_teacher_eps(self.teacher, x_t, t, repeat_cond(cond, k), self.guidance_scale,
                                          max_batch, repeat_cond(uncond, k))
            return broadcast_to(self.w.to(x_t.device, x_t.dtype)[t], x_t) * (eps_hat - eps)

        out = residual_estimate(self.estimator, self.teacher.schedule, x, residual, generator, keep_draws,
                                self.nan_policy)
        if out.skipped is not None:
            self.skipped_steps += 1
        return out
