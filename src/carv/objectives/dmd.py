"""Distribution-matching distillation (DMD, DMD2) through carv's hierarchical estimator.

A one-step generator ``x = G_theta(z, c)`` is pulled toward the teacher's distribution by the
gradient of ``KL(p_fake,t || p_real,t)`` averaged over noise levels. For each generator sample
``x_r`` (the *upstream* stage) and each of ``K`` draws ``(t, eps)``:

    grad_r = (1/K) sum_k v(t_rk) w(t_rk, ...) (eps_real(x_t, t, c) - eps_fake(x_t, t, c)),
    x_t = a_t x_r + s_t eps_rk

``eps_real`` is the frozen teacher with classifier-free guidance, ``eps_fake`` a score model trained
online on the generator's own samples (:class:`DenoisingLoss`). Since ``eps = -s_t * score``, a
descent step moves ``x`` along ``w (score_real - score_fake)``: toward the teacher's distribution and
away from the generator's. This is score distillation with the drawn noise ``eps`` replaced by the
fake score's prediction, so both objectives share :func:`carv.estimator.residual_estimate`
(draws, noising, importance weights, reduction, surrogate loss); each only says what its residual is.

Weighting ``w``: a table of ``t`` (``"sds"``, ``"uniform"``, ``"snr"`` or a callable, see
:func:`~carv.objectives.weighting.weight_table`), or ``"dmd"``: DMD's per-draw normalisation
``1 / mean|eps_real - eps|`` (the paper's ``(p_real - p_fake) / mean|x - p_real|`` written in noise
space; the ``s_t / a_t`` factors cancel). The normalisation is a fixed function of ``(x, t, eps)``, so
every carv estimator stays unbiased for the same expectation; it has no table, so importance sampling
with it uses a learned proposal (:class:`carv.LearnedProposal`) rather than ``q ~ p w``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from carv.estimator import HierarchicalEstimator, SDSOutput, UsesEstimator, residual_estimate
from carv.objectives.sds import batched_teacher_eps, check_nan_policy
from carv.objectives.weighting import Weighting, weight_table
from carv.schedules import VPSchedule, broadcast_to
from carv.teachers.base import Teacher, check_cond_batch, repeat_cond
from carv.timesteps import TimestepSampler

__all__ = ["DistributionMatching", "DenoisingLoss", "DMD_WEIGHTINGS"]

DMD_WEIGHTINGS = ("dmd", "sds", "uniform", "snr")


class DistributionMatching(UsesEstimator):
    """Distribution-matching gradient estimator for one-step generators.

    Args:
        teacher: the frozen real-score :class:`~carv.teachers.base.Teacher`.
        fake_score: the online fake-score model, wrapped as a Teacher (only ``guided_eps`` at scale 1
            is used, under ``no_grad``; train its module separately with :class:`DenoisingLoss`).
        sampler: the :class:`~carv.TimestepSampler` (proposal, importance weights, stratification).
        K: draws per generator sample.
        weighting: ``"dmd"`` (per-draw normalisation, see module doc), a weight-table name or a callable of ``t``.
        guidance_scale: classifier-free guidance on the real score (1 = none); the fake score is unguided.
        noise: ``"iid"``, ``"antithetic"`` or ``"crn"``.
        max_batch: largest network batch, guidance rows included (the ``R*K`` draws are chunked to fit memory).
        nan_policy: ``"raise"`` (default) or ``"skip"`` (drop the step whole and report it, as
            :class:`~carv.objectives.sds.ScoreDistillation`).
    """

    def __init__(self, teacher: Teacher, fake_score: Teacher, sampler: TimestepSampler, K: int = 1,
                 weighting: Weighting = "dmd", guidance_scale: float = 1.0, noise: str = "iid",
                 max_batch: int | None = None, nan_policy: str = "raise"):
        for name, v in (("teacher", teacher), ("fake_score", fake_score)):
            if not isinstance(v, Teacher):
                raise TypeError(f"{name}: expected a carv Teacher, got {type(v).__name__}")
        T = teacher.schedule.num_timesteps
        if fake_score.schedule.num_timesteps != T or not torch.equal(fake_score.schedule.alphas_cumprod,
                                                                      teacher.schedule.alphas_cumprod):
            raise ValueError("fake_score: its schedule differs from the teacher's; both scores must be on one schedule")
        if not isinstance(sampler, TimestepSampler):
            raise TypeError(f"sampler: expected a carv.TimestepSampler, got {type(sampler).__name__}")
        if sampler.num_timesteps != T:
            raise ValueError(f"sampler: has {sampler.num_timesteps} timesteps but the teacher's schedule has {T}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale: expected a non-negative number, got {guidance_scale!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch: expected a positive integer or None, got {max_batch!r}")
        check_nan_policy(nan_policy)
        if isinstance(weighting, str) and weighting not in DMD_WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {DMD_WEIGHTINGS} or a callable of t, got {weighting!r}")
        self.teacher, self.fake_score = teacher, fake_score
        self.estimator = HierarchicalEstimator(sampler, K, noise)
        self.weighting = weighting
        self.w = None if weighting == "dmd" else weight_table(weighting, teacher.schedule)
        self.guidance_scale = float(guidance_scale)
        self.max_batch = max_batch
        self.nan_policy = nan_policy
        self.skipped_steps = 0

    def weight(self, t: Tensor, eps: Tensor, eps_real: Tensor) -> Tensor:
        """``w`` per draw, shaped to broadcast against ``eps``."""
        if self.w is None:  # DMD: 1 / mean |x - x0_real| * (s_t / a_t) = 1 / mean |eps_real - eps|
            return 1.0 / (eps_real - eps).abs().flatten(1).mean(1).clamp_min(1e-6).reshape(-1, *[1] * (eps.ndim - 1))
        return broadcast_to(self.w.to(eps.device, eps.dtype)[t], eps)

    def __call__(self, x: Tensor, cond: Any = None, generator: torch.Generator | int | None = None,
                 keep_draws: bool = False) -> SDSOutput:
        """``x``: generator samples ``[R, ...]`` (with grad); ``loss.backward()`` gives the generator gradient."""
        if isinstance(x, Tensor) and x.ndim:
            check_cond_batch(cond, x.shape[0], "cond")  # residual_estimate names a bad x

        def residual(x_t: Tensor, t: Tensor, eps: Tensor, k: int) -> Tensor:  # w (eps_real - eps_fake)
            cond_k = repeat_cond(cond, k)
            eps_real = batched_teacher_eps(self.teacher, x_t, t, cond_k, self.guidance_scale, self.max_batch)
            eps_fake = batched_teacher_eps(self.fake_score, x_t, t, cond_k, 1.0, self.max_batch)
            return self.weight(t, eps, eps_real) * (eps_real - eps_fake)

        out = residual_estimate(self.estimator, self.teacher.schedule, x, residual, generator, keep_draws,
                                self.nan_policy)
        self.skipped_steps += out.skipped is not None
        return out


class DenoisingLoss:
    """The fake score's objective on (detached) generator samples ``x``:

        E_{t ~ p, eps} [ lambda(t) mean ||eps_phi(a_t x + s_t eps, t, c) - eps||^2 ]

    with ``(t, eps)`` drawn through carv's estimator (one draw per sample; ``p`` is the sampler's base
    distribution and its importance weights keep the loss unbiased under any proposal).

    Args:
        schedule: the noise schedule shared with the teacher.
        sampler: timestep sampler (default: uniform over all timesteps, as in DDPM training).
        weighting: ``lambda(t)``: a weight-table name or callable (default ``"uniform"``).
    """

    def __init__(self, schedule: VPSchedule, sampler: TimestepSampler | None = None,
                 weighting: Weighting = "uniform"):
        if not isinstance(schedule, VPSchedule):
            raise TypeError(f"schedule: expected a carv.VPSchedule, got {type(schedule).__name__}")
        sampler = sampler if sampler is not None else TimestepSampler(schedule.num_timesteps)
        if sampler.num_timesteps != schedule.num_timesteps:
            raise ValueError(f"sampler: has {sampler.num_timesteps} timesteps but the schedule has "
                             f"{schedule.num_timesteps}")
        self.schedule = schedule
        self.estimator = HierarchicalEstimator(sampler, 1)
        self.lam = weight_table(weighting, schedule)

    def __call__(self, model: nn.Module, x: Tensor, cond: Any = None,
                 generator: torch.Generator | int | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim < 2:
            raise ValueError(f"x: expected a tensor of shape [B, ...], got {getattr(x, 'shape', type(x).__name__)}")
        d = self.estimator.draw(x.shape[0], x.shape[1:], generator, x.device, x.dtype)
        t, eps = d.t[:, 0], d.eps[:, 0]
        x_t = self.schedule.add_noise(x.detach(), t, eps)
        err = (model(x_t, t, cond) - eps).pow(2).flatten(1).mean(1)
        return (d.weight[:, 0] * self.lam.to(x.device, x.dtype)[t] * err).mean()
