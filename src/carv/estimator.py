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

Memory. When the ``R K`` noises of one call would take more than :data:`DRAW_MEMORY_BUDGET` bytes,
:func:`residual_estimate` streams: :meth:`HierarchicalEstimator.draw` with ``noise=False``
draws every timestep and weight (``R K`` scalars) but no noise, and :meth:`Draws.next_noise` then draws the noise
of ``block`` columns of every row at a time (:meth:`HierarchicalEstimator.block_columns`), which
:class:`StreamingReduction` folds into the same :class:`Estimate`. Which draws a seed gives depends only on
``R``, ``K``, the sample shape and dtype (the block width is a function of these, never of ``max_batch`` or the
free memory); when the noise fits the budget the whole ``[R, K, ...]`` noise is one block, drawn exactly as
before streaming existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from carv._machine import check_fits
from carv.accounting import VarianceComponents, between_component, variance_components, within_row_variance
from carv.noise import check_noise_mode, draw_noise
from carv.schedules import VPSchedule
from carv.teachers.base import NonFiniteTeacherError, check_finite
from carv.timesteps import TimestepSampler

__all__ = ["DRAW_MEMORY_BUDGET", "Draws", "Estimate", "HierarchicalEstimator", "StreamingReduction", "UsesEstimator",
           "check_upstream", "reduce_draws", "SDSOutput", "residual_estimate"]

DRAW_MEMORY_BUDGET = 32 << 20  # bytes of noise one block of draws may hold; larger R*K draws are streamed


def check_upstream(x, name: str = "x") -> None:
    """Raise naming ``name`` unless ``x`` is a real floating-point ``[R, ...]`` tensor of finite values on a real
    device, so that bad input is reported as the input's fault before any teacher is called (a NaN in ``x``
    would come back as the teacher's NaN; a complex ``x`` would silently lose its imaginary part)."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"{name}: expected a tensor of shape [R, ...], got {getattr(x, 'shape', type(x).__name__)}")
    if x.is_complex() or not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a real floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {x.dtype}")
    if x.device.type == "meta":
        raise ValueError(f"{name}: is on the meta device (no data); carv draws timesteps and noise for real "
                         f"inputs, pass {name} on a real device (cpu, cuda, ...)")
    if not bool(torch.isfinite(x.detach()).all()):
        bad = ~torch.isfinite(x.detach().reshape(x.shape[0], -1)).all(dim=1)
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{name}: the input holds NaN or inf in upstream sample(s) {rows[:20]} of {x.shape[0]} "
                         f"(found before any teacher call)")

@dataclass
class Draws:
    """One batch of draws: ``t`` and ``weight`` are ``[R, K]``, ``eps`` is ``[R, K, *sample_shape]``, or None when
    it is drawn block by block (``draw(noise=False)``): then :meth:`next_noise` gives the next columns' noise."""

    t: Tensor
    weight: Tensor
    eps: Tensor | None
    _stream: Callable[[int], Tensor] | None = field(default=None, repr=False)
    _cursor: int = field(default=0, repr=False)

    @property
    def R(self) -> int:
        return self.t.shape[0]

    @property
    def K(self) -> int:
        return self.t.shape[1]

    def next_noise(self, k: int) -> Tensor:
        """The noise ``[R, k, *sample_shape]`` of the next ``k`` columns of every row (columns in order, each
        once; antithetic blocks need ``k`` even). From ``eps`` when it is held, else drawn now."""
        if not isinstance(k, int) or k < 1 or self._cursor + k > self.K:
            raise ValueError(f"k: expected 1..{self.K - self._cursor} more columns, got {k!r}")
        k0, self._cursor = self._cursor, self._cursor + k
        return self.eps[:, k0:k0 + k] if self.eps is not None else self._stream(k)


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


class StreamingReduction:
    """:func:`reduce_draws` of ``[R, K, ...]`` values given a block of columns at a time (:meth:`add`), holding only
    ``[R, ...]`` running moments and the ``[R, K]`` squared norms, never the ``R K`` values.

    The per-row means and within-row sums of squares are combined across blocks exactly (Chan et al.'s pairwise
    update, in float64), so the result equals :func:`reduce_draws` of the concatenated blocks up to rounding; it
    depends on the block widths only through rounding, never on how a teacher chunked its calls.
    """

    def __init__(self, R: int, K: int, sample_shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
                 device: torch.device, stats: bool = True, what: str = "integrand"):
        self.R, self.K, self.shape, self.dtype, self.stats, self.what = R, K, tuple(sample_shape), dtype, stats, what
        self.n = 0
        self.mean = torch.zeros(R, max(1, _numel(sample_shape)), dtype=torch.float64, device=device)
        self.m2 = torch.zeros(R, dtype=torch.float64, device=device)
        self.sq = torch.empty(R, K, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype,
                              device=device)

    def add(self, values: Tensor, weight: Tensor, t: Tensor | None = None) -> None:
        """Fold in the next block: ``values`` ``[R, k, ...]`` with its ``weight`` and ``t`` (``[R, k]``)."""
        R, k = weight.shape
        if R != self.R or values.shape[:2] != weight.shape or self.n + k > self.K:
            raise ValueError(f"values: expected the next [R, k, ...] block with R = {self.R} and at most "
                             f"{self.K - self.n} more columns, got {tuple(values.shape)}")
        flat = values.reshape(R, k, -1)
        if t is not None:
            check_finite(flat.reshape(R * k, -1), t.reshape(-1), self.what)
        self.sq[:, self.n:self.n + k] = flat.detach().pow(2).sum(-1).to(self.sq.dtype)
        y = (flat.detach() * weight.reshape(R, k, 1).to(flat.dtype)).double()
        mb = y.mean(1)
        m2b = (y - mb[:, None]).pow(2).sum((1, 2))
        n_tot = self.n + k
        delta = mb - self.mean
        self.mean += delta * (k / n_tot)
        self.m2 += m2b + delta.pow(2).sum(-1) * (self.n * k / n_tot)
        self.n = n_tot

    def result(self) -> Estimate:
        if self.n != self.K:
            raise ValueError(f"values: {self.n} of the K = {self.K} columns were added")
        per_upstream = self.mean.to(self.dtype).reshape(self.R, *self.shape)
        est = Estimate(per_upstream=per_upstream, R=self.R, K=self.K, sq_norms=self.sq)
        if self.stats and self.K >= 2:
            est.within = float(self.m2.sum()) / (self.R * (self.K - 1))
            if self.R >= 2:
                est.between = between_component(self.mean, est.within, self.K)
        return est


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


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

    def block_columns(self, R: int, sample_shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32,
                      budget: int | None = None) -> int:
        """How many columns of the ``R x K`` draws one block holds: ``K`` when their noise fits ``budget`` bytes
        (default :data:`DRAW_MEMORY_BUDGET`), else as many as fit (at least 1, even with antithetic noise).
        A function of the sizes only, so a seed gives the same draws on every machine and at every ``max_batch``."""
        budget = DRAW_MEMORY_BUDGET if budget is None else budget
        per_column = R * _numel(sample_shape) * dtype.itemsize
        if per_column * self.K <= budget:
            return self.K
        k = max(1, budget // max(1, per_column))
        return max(2, k - k % 2) if self.noise == "antithetic" else k

    def draw(self, R: int, sample_shape: tuple[int, ...] | torch.Size, generator: torch.Generator | int | None = None,
             device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
             rank: int | None = None, world_size: int | None = None, noise: bool = True) -> Draws:
        """Timesteps, weights and noises for ``R`` upstream samples of shape ``sample_shape``.

        ``noise=False`` draws the timesteps and weights only (``eps`` is None); :meth:`Draws.next_noise` then
        draws the noise of the next columns from the same generator, so ``R K`` noises are never held at once.
        Drawing all ``K`` columns in one :meth:`Draws.next_noise` call gives exactly the ``eps`` of ``noise=True``.

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
        shape, mode = tuple(sample_shape), self.noise
        if not noise:
            return Draws(t=t, weight=w.to(dtype), eps=None,
                         _stream=lambda k: draw_noise(R, k, shape, mode, g, device, dtype))
        return Draws(t=t, weight=w.to(dtype), eps=draw_noise(R, K, shape, mode, g, device, dtype))

    def reduce(self, values: Tensor, draws: Draws, stats: bool = True, keep_draws: bool = False,
               what: str = "integrand") -> Estimate:
        return reduce_draws(values, draws.weight, draws.t, stats=stats, keep_draws=keep_draws, what=what)


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed: torch.distributed is not initialised; call init_process_group first "
                           "or build the estimator with distributed=False")
    return dist.get_rank(), dist.get_world_size()


@dataclass
class SDSOutput:
    grad: Tensor        # [R, ...] per-upstream estimate of the SDS gradient
    loss: Tensor        # scalar surrogate: d loss / d x[r] = grad[r] / R
    estimate: Estimate  # per-upstream means + variance components + per-draw squared norms
    draws: Draws        # the (t, weight, eps) that were used
    skipped: str | None = None  # nan_policy="skip": why this step was dropped (its gradient is zero)


Residual = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def residual_estimate(estimator: HierarchicalEstimator, schedule: VPSchedule, x: Tensor, residual: Residual,
                      generator: torch.Generator | int | None = None, keep_draws: bool = False,
                      nan_policy: str = "raise") -> SDSOutput:
    """The piece every teacher-residual objective shares (SDS, distribution matching).

    Draw ``R x K`` ``(t, eps)`` through ``estimator``, noise ``x`` to ``x_t = a_t x + s_t eps``, evaluate
    ``residual(x_t, t, eps, k)`` (flat ``[R*k, ...]`` for ``k`` columns of every row, row-major, no grad; so
    ``repeat_cond(cond, k)`` gives each draw its upstream sample's condition) and reduce it (importance weights,
    mean over ``K``, finiteness check, variance components). ``loss`` is the surrogate whose gradient with
    respect to ``x[r]`` is ``grad[r] / R``, so one backward pass serves all ``K`` draws of an upstream sample.

    ``x`` is checked first (:func:`~carv.estimator.check_upstream`: real floating point, finite, on a real
    device), so bad input is never blamed on the teacher. Memory: when the ``R K`` noises exceed
    :data:`~carv.estimator.DRAW_MEMORY_BUDGET` the draws are streamed in blocks of columns
    (:meth:`~carv.estimator.HierarchicalEstimator.block_columns`): noise, noised inputs and residuals exist for
    one block at a time, so memory stays bounded however large ``K`` is; ``draws.eps`` is then None. Below the
    budget everything is one block, bit for bit what it was before streaming. ``keep_draws=True`` needs every
    weighted draw at once, so it never streams (and is refused before allocating when that cannot fit).
    """
    check_upstream(x)
    R, K, shape = x.shape[0], estimator.K, tuple(x.shape[1:])
    block = K if keep_draws else estimator.block_columns(R, shape, x.dtype)
    if keep_draws:
        check_fits(5 * R * K * x[0].numel() * x.element_size(), x.device, "keep_draws",
                   f"holding all R*K = {R * K} draws of shape {shape} (keep_draws=True)")
    d = estimator.draw(R, shape, generator, x.device, x.dtype, noise=block == K)
    x0 = x.detach()
    try:
        with torch.no_grad():
            if block == K:
                t, eps = d.t.reshape(-1), d.eps.reshape(R * K, *shape)
                x_t = schedule.add_noise(x0.repeat_interleave(K, 0), t, eps)
                f = residual(x_t, t, eps, K).reshape(R, K, *shape)
                est = estimator.reduce(f, d, keep_draws=keep_draws)
            else:
                acc = StreamingReduction(R, K, shape, x.dtype, x.device)
                for k0 in range(0, K, block):
                    k = min(block, K - k0)
                    t, eps = d.t[:, k0:k0 + k].reshape(-1), d.next_noise(k).reshape(R * k, *shape)
                    x_t = schedule.add_noise(x0.repeat_interleave(k, 0), t, eps)
                    f = residual(x_t, t, eps, k).reshape(R, k, *shape)
                    acc.add(f, d.weight[:, k0:k0 + k], d.t[:, k0:k0 + k])
                    del x_t, eps, f
                est = acc.result()
    except NonFiniteTeacherError as e:
        if nan_policy != "skip":
            raise
        zero = torch.zeros_like(x, requires_grad=False)
        return SDSOutput(grad=zero, loss=(zero * x).sum(), estimate=Estimate(per_upstream=zero, R=R, K=K), draws=d,
                         skipped=str(e))
    loss = (est.per_upstream * x).sum() / R
    return SDSOutput(grad=est.per_upstream, loss=loss, estimate=est, draws=d)


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
