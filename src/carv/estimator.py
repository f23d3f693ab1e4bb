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

__all__ = ["Draws", "Estimate", "HierarchicalEstimator", "UsesEstimator", "reduce_draws", "check_upstream",
           "TEACHER_MEMORY_BUDGET", "ACTIVATION_FACTOR", "default_max_batch", "check_chunk_fits"]

# Memory-safe defaults for teacher batches. A teacher's activations are far larger than its input: the
# scenes teacher (3x32x32) peaks at about 1.5 MB per UNet row, ~130x its 12 KB input. Without a max_batch
# the R*K draws are chunked so that one chunk's estimated activations stay within TEACHER_MEMORY_BUDGET.
TEACHER_MEMORY_BUDGET = 1 << 30  # bytes of teacher activations one default chunk may take
ACTIVATION_FACTOR = 128          # assumed activation bytes per input byte of one teacher row


def _row_bytes(sample_shape, dtype: torch.dtype, guided: bool) -> int:
    numel = 1
    for s in sample_shape:
        numel *= int(s)
    return numel * torch.empty((), dtype=dtype).element_size() * ACTIVATION_FACTOR * (2 if guided else 1)


def default_max_batch(sample_shape, dtype: torch.dtype = torch.float32, guided: bool = False,
                      budget: int = TEACHER_MEMORY_BUDGET) -> int:
    """Draws per teacher chunk when none is given: ``budget`` over the estimated activation bytes of one draw
    (``ACTIVATION_FACTOR`` x its input bytes, doubled under classifier-free guidance), at least 1. Depends on
    the sample size only (never on the free memory), so a run's chunks, and hence its draws, are reproducible."""
    return max(1, budget // _row_bytes(sample_shape, dtype, guided))


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no usable CUDA context: no check
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for ln in f:
                    if ln.startswith("MemAvailable:"):
                        return int(ln.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_chunk_fits(rows: int, sample_shape, dtype: torch.dtype, device: torch.device, guided: bool,
                     name: str = "max_batch") -> None:
    """Raise ``MemoryError`` *before* allocating when one chunk of ``rows`` draws is estimated to need more
    memory than the device has free (noise, noised inputs and residuals: 4 copies of the input, plus the
    teacher's activations), naming ``name`` and what to do."""
    free = _free_bytes(device)
    if free is None:
        return
    per = _row_bytes(sample_shape, dtype, guided) + 4 * _row_bytes(sample_shape, dtype, False) // ACTIVATION_FACTOR
    need = rows * per
    if need > free:
        raise MemoryError(f"{name}: one chunk of {rows} teacher draws of shape {tuple(sample_shape)} needs about "
                          f"{need / 2**30:.1f} GiB (estimated), but only {free / 2**30:.1f} GiB is free on "
                          f"{device}; pass a smaller {name}" + (" (even one draw does not fit)" if rows == 1 else ""))


def check_upstream(x, name: str = "x") -> None:
    """Raise naming ``name`` unless ``x`` is a real floating-point ``[R, ...]`` tensor of finite values on a
    real device: bad input is reported as the input's fault before any teacher is called (a NaN in ``x``
    would otherwise come back as a NaN from the teacher, and a complex ``x`` would lose its imaginary part)."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"{name}: expected a tensor of shape [R, ...], got {getattr(x, 'shape', type(x).__name__)}")
    if x.is_complex() or not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a real floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got dtype {x.dtype}")
    if x.device.type == "meta":
        raise ValueError(f"{name}: is on the meta device (no data); carv draws timesteps and noise for real "
                         f"inputs, pass {name} on a real device (cpu, cuda, ...)")
    bad = ~torch.isfinite(x.detach().reshape(x.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{name}: the input holds NaN or inf in upstream sample(s) {rows[:20]} of {x.shape[0]} "
                         f"(before any teacher call)")


@dataclass
class Draws:
    """One batch of draws: ``t`` and ``weight`` are ``[R, K]``, ``eps`` is ``[R, K, *sample_shape]`` (None when
    the noise was drawn chunk by chunk and never held whole, see :func:`chunked_residual_estimate`)."""

    t: Tensor
    weight: Tensor
    eps: Tensor | None

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

        ``noise=False`` draws only the timesteps and weights (``eps`` is None); :meth:`draw_noise` then makes
        the noise of a range of columns at a time, so that ``R*K`` noises never need to be held at once.

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
        eps = draw_noise(R, K, sample_shape, self.noise, g, device, dtype) if noise else None
        return Draws(t=t, weight=w.to(dtype), eps=eps)

    def draw_noise(self, R: int, k: int, sample_shape: tuple[int, ...] | torch.Size, generator: torch.Generator,
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Noise ``[R, k, *sample_shape]`` for ``k`` more columns of every row, laid out by the noise mode
        (antithetic pairs stay inside a block when ``k`` is even; CRN shares the block's noises across rows)."""
        return draw_noise(R, k, sample_shape, self.noise, generator, device, dtype)

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
