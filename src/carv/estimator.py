"""The hierarchical estimator: ``R`` upstream samples x ``K`` cheap ``(t, eps)`` draws each.

    mu_hat = (1/R) sum_r [ (1/K) sum_k v(t_rk) f(x_r, t_rk, eps_rk) ]

:class:`HierarchicalEstimator` owns the draws (a :class:`~carv.timesteps.TimestepSampler` for ``t``
and a noise mode for ``eps``) and the reduction (importance weighting, the mean over ``K``, a
finiteness check and the variance components for the accountant). Objectives only compute
``f`` for the draws they are given, so sampling and weighting live in one place.

Every combination is unbiased: each ``(t, eps)`` is marginally ``(q, N(0, I))`` and carries the weight
``p(t)/q(t)``. With ``noise="antithetic"`` the two members of an ``(eps, -eps)`` pair share one
timestep (stratification then runs over the ``K/2`` pairs); with ``noise="crn"`` every row shares the
same ``K`` timesteps and noises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from carv.accounting import VarianceComponents, variance_components, within_row_variance
from carv.noise import check_noise_mode, draw_noise
from carv.teachers.base import check_finite
from carv.timesteps import TimestepSampler

__all__ = ["Draws", "Estimate", "HierarchicalEstimator", "UsesEstimator", "reduce_draws"]

@dataclass
class Draws:
    """One batch of draws: ``t`` and ``weight`` are ``[R, K]``, ``eps`` is ``[R, K, *sample_shape]``."""

    t: Tensor
    weight: Tensor
    eps: Tensor

    @property
    def R(self) -> int:
        return self.t.shape[0]

    @property
    def K(self) -> int:
        return self.t.shape[1]


@dataclass
class Estimate:
    """Result of reducing ``[R, K, ...]`` per-draw values.

    ``per_upstream`` (``[R, ...]``) is the weighted mean over the ``K`` draws of each upstream sample;
    ``mean`` is their mean. ``between`` / ``within`` are the variance components of the weighted
    values (traces; None when ``R < 2`` or ``K < 2``); ``sq_norms`` (``[R, K]``) are the squared norms of
    the *unweighted* values, which a learned proposal consumes. ``draws`` holds the weighted per-draw
    values only when asked for (``keep_draws=True``).
    """

    per_upstream: Tensor
    R: int
    K: int
    between: float | None = None
    within: float | None = None
    sq_norms: Tensor | None = None
    draws: Tensor | None = field(default=None, repr=False)

    @property
    def mean(self) -> Tensor:
        return self.per_upstream.mean(0)

    @property
    def variance(self) -> float | None:
        """Predicted variance (trace) of ``mean``: ``between / R + within / (R K)``."""
        if self.between is None or self.within is None:
            return None
        return self.between / self.R + self.within / (self.R * self.K)


def reduce_draws(values: Tensor, weight: Tensor, t: Tensor | None = None, stats: bool = True,
                 keep_draws: bool = False, what: str = "integrand") -> Estimate:
    """Weight ``[R, K, ...]`` values by ``weight`` (``[R, K]``), average over ``K``, and measure.

    Raises :class:`~carv.teachers.base.NonFiniteTeacherError` naming the timesteps if any value is
    NaN or inf (a silently averaged NaN would poison every later step).
    """
    if values.ndim < 2 or values.shape[:2] != weight.shape:
        raise ValueError(f"values: expected shape [R, K, ...] with [R, K] = {tuple(weight.shape)}, "
                         f"got {tuple(values.shape)}")
    R, K = weight.shape
    flat = values.reshape(R * K, -1)
    if t is not None:
        check_finite(flat, t.reshape(-1), what)
    sq = flat.detach().pow(2).sum(-1).reshape(R, K)
    weighted = values * weight.reshape(R, K, *([1] * (values.ndim - 2))).to(values.dtype)
    est = Estimate(per_upstream=weighted.mean(1), R=R, K=K, sq_norms=sq)
    if stats and R >= 2 and K >= 2:
        comps: VarianceComponents = variance_components(weighted, est.per_upstream)
        est.between, est.within = comps.between, comps.within
    elif stats and K >= 2:
        est.within = within_row_variance(weighted, est.per_upstream)[0]
    if keep_draws:
        est.draws = weighted
    return est


class HierarchicalEstimator:
    """Draw ``R x K`` ``(t, eps)`` pairs and reduce per-draw values into per-upstream means.

    Args:
        sampler: the timestep sampler (proposal, weights, stratification).
        K: draws per upstream sample.
        noise: ``"iid"``, ``"antithetic"`` (``K`` even) or ``"crn"``.
        distributed: split the strata across the processes of the default ``torch.distributed``
            group (needs ``stratify="global"``): every process draws its own interleaved share and
            together they cover ``[0, 1)`` once. Each process's estimate is then unbiased only after
            averaging over processes, which is exactly what an all-reduced (DDP) gradient does.
    """

    def __init__(self, sampler: TimestepSampler, K: int = 1, noise: str = "iid", distributed: bool = False):
        self.distributed = bool(distributed)
        self.sampler = sampler
        self.noise = noise
        self.K = K

    @property
    def sampler(self) -> TimestepSampler:
        return self._sampler

    @sampler.setter
    def sampler(self, sampler: TimestepSampler) -> None:
        """Replace the sampler between steps (e.g. an annealed timestep range); checked like the constructor's."""
        if not isinstance(sampler, TimestepSampler):
            raise TypeError(f"sampler: expected a carv.TimestepSampler, got {type(sampler).__name__}")
        if self.distributed and sampler.stratify != "global":
            raise ValueError(f"distributed: strata are split across processes only with stratify='global', "
                             f"the sampler has stratify={sampler.stratify!r}")
        old = getattr(self, "_sampler", None)
        if old is not None and sampler.num_timesteps != old.num_timesteps:
            raise ValueError(f"sampler: has {sampler.num_timesteps} timesteps but the one it replaces has "
                             f"{old.num_timesteps}")
        self._sampler = sampler

    @property
    def K(self) -> int:
        return self._K

    @K.setter
    def K(self, K: int) -> None:
        if not isinstance(K, int) or isinstance(K, bool) or K < 1:
            raise ValueError(f"K: expected a positive integer, got {K!r}")
        check_noise_mode(self.noise, K)
        self._K = K

    def draw(self, R: int, sample_shape: tuple[int, ...] | torch.Size, generator: torch.Generator | int | None = None,
             device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
             rank: int | None = None, world_size: int | None = None, noise: bool = True) -> Draws:
        """Timesteps, weights and noises for ``R`` upstream samples of shape ``sample_shape``.

        ``rank`` / ``world_size`` split global strata across processes explicitly; with
        ``distributed=True`` they default to the ``torch.distributed`` rank and world size.
        """
        from carv._rng import as_generator

        if rank is None and world_size is None:
            rank, world_size = _dist_rank_world() if self.distributed else (0, 1)
        elif rank is None or world_size is None:
            raise ValueError(f"rank, world_size: give both or neither, got rank={rank}, world_size={world_size}")
        if not isinstance(R, int) or isinstance(R, bool) or R < 1:
            raise ValueError(f"R: expected a positive integer, got {R!r}")
        K = self.K
        # the draws follow the inputs' device per call; the sampler's own tables stay where they are
        device = torch.device(device) if device is not None else self.sampler.device
        if device.type == "meta":
            raise ValueError("x: is on the meta device (no data); carv draws timesteps and noise for real "
                             "inputs, pass x on a real device (cpu, cuda, ...)")
        g = as_generator(generator, device)
        if self.noise == "crn":
            ts = self.sampler.sample(1, K, g, rank, world_size, device=device)
            t, w = ts.t.expand(R, K), ts.weight.expand(R, K)
        elif self.noise == "antithetic":
            ts = self.sampler.sample(R, K // 2, g, rank, world_size, device=device)
            t, w = ts.t.repeat_interleave(2, dim=1), ts.weight.repeat_interleave(2, dim=1)
        else:
            ts = self.sampler.sample(R, K, g, rank, world_size, device=device)
            t, w = ts.t, ts.weight
        eps = draw_noise(R, K, sample_shape, self.noise, g, device, dtype)
        return Draws(t=t, weight=w.to(dtype), eps=eps)

    def reduce(self, values: Tensor, draws: Draws, stats: bool = True, keep_draws: bool = False,
               what: str = "integrand") -> Estimate:
        return reduce_draws(values, draws.weight, draws.t, stats=stats, keep_draws=keep_draws, what=what)


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed: torch.distributed is not initialised; call init_process_group first "
                           "or build the estimator with distributed=False")
    return dist.get_rank(), dist.get_world_size()


class UsesEstimator:
    """Mixin for objectives that draw through ``self.estimator`` (a :class:`HierarchicalEstimator`).

    ``K`` (settable, so an accountant can re-choose it between steps) and ``sampler`` (settable, e.g. to anneal
    the timestep range) are the estimator's,
    so the objective never holds a second copy that could drift from what is actually drawn.
    """

    estimator: HierarchicalEstimator

    @property
    def K(self) -> int:
        return self.estimator.K

    @K.setter
    def K(self, K: int) -> None:
        self.estimator.K = K

    @property
    def sampler(self) -> TimestepSampler:
        return self.estimator.sampler

    @sampler.setter
    def sampler(self, sampler: TimestepSampler) -> None:
        self.estimator.sampler = sampler
