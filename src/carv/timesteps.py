"""Timestep distributions, importance proposals, inverse CDF and stratification.

The objective fixes a distribution ``p`` over the integer timesteps (uniform on ``t_min..t_max``
unless a ``base`` table is given). carv draws from a proposal ``q`` instead and returns the
importance weight ``v = p(t) / q(t)`` with every draw, so that ``E_q[v f] = E_p[f]`` for any ``f``:

    q = (1 - floor) * normalise(p * importance) + floor * p

With ``floor > 0`` the weights are bounded by ``1 / floor``.

Draws are made by mapping uniforms ``u`` in ``[0, 1)`` through ``q``'s inverse CDF (a
``searchsorted`` on the cumulative table). Stratification only changes how the ``u`` are made; each
``u`` is still marginally uniform, so each ``t`` is marginally ``q``-distributed and the weighted
mean stays unbiased:

- ``"none"``: iid uniforms.
- ``"per_upstream"``: each row of ``K`` draws takes one jittered point in each of ``K`` equal strata.
- ``"global"``: ``R*K`` strata over the whole batch, randomly assigned to rows (the only kind that
  helps at ``K = 1``). The assignment also gives every row one point in each of ``K`` coarse strata,
  so it includes ``"per_upstream"``; a row's ``K`` columns are in stratum order, which no estimator
  depends on (each row is averaged over its ``K`` draws). With ``world_size > 1`` the strata are split across processes
  (rank ``r`` takes strata ``r, r + W, r + 2W, ...``): each process's draws are then *not*
  marginally ``q``-distributed on their own, but the mean over all processes is unbiased, which is
  what an all-reduced gradient uses.
- ``"lattice"``: one random shift of an evenly spaced lattice over the whole batch,
  ``u_i = (u_0 + i / N) mod 1`` (VDM's low-discrepancy "antithetic time"), assigned to rows in order.
- ``"grid"``: the deterministic midpoints ``u_k = (k + 1/2) / K`` in every row (D-TRAK's evenly
  spaced timesteps). This is a quadrature rule, **not** an unbiased estimator: its error is
  deterministic (``O(1/K^2)`` for a smooth integrand). It exists as the peers' baseline.

The pure functions (:func:`stratified_uniform`, :func:`inverse_cdf`) compose with any table; the
:class:`TimestepSampler` holds the tables and the weights. Online proposals (:class:`LearnedProposal`,
:class:`SecondMomentResampler`) only supply an importance table; the reweighting stays in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from carv._rng import as_generator
from carv._validate import check_positive_int, check_timesteps

__all__ = [
    "STRATIFY_MODES",
    "TimestepDraws",
    "TimestepSampler",
    "stratified_uniform",
    "inverse_cdf",
    "GuideTable",
    "LearnedProposal",
    "SecondMomentResampler",
    "percent_range",
    "annealed_range",
    "scheduled_value",
]

STRATIFY_MODES = ("none", "per_upstream", "global", "lattice", "grid")


# --------------------------------------------------------------------------- pure functions
def stratified_uniform(
    R: int,
    K: int,
    stratify: str = "none",
    generator: torch.Generator | int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    rank: int = 0,
    world_size: int = 1,
    scale: float = 1.0,
) -> Tensor:
    """Uniforms ``u`` of shape ``[R, K]`` in ``[0, 1)``, each marginally ``U[0, 1)``, laid out by ``stratify``.

    ``scale`` multiplies the result (folded into the last op; the guide table wants ``u * M``).
    """
    check_positive_int(R, "R")
    check_positive_int(K, "K")
    if stratify not in STRATIFY_MODES:
        raise ValueError(f"stratify: expected one of {STRATIFY_MODES}, got {stratify!r}")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank, world_size: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size > 1 and stratify != "global":
        raise ValueError(f"world_size: strata are split across processes only with stratify='global', got {stratify!r}")
    g = as_generator(generator, device)
    if stratify == "none":
        u = torch.rand(R, K, generator=g, device=device, dtype=dtype)
        return u if scale == 1.0 else u.mul_(scale)
    if stratify == "grid":
        mid = torch.arange(K, device=device, dtype=dtype).add_(0.5).mul_(scale / K)
        return mid.expand(R, K).clone()
    if stratify == "per_upstream":
        jitter = torch.rand(R, K, generator=g, device=device, dtype=dtype)
        return jitter.add_(torch.arange(K, device=device, dtype=dtype)).mul_(scale / K)
    n = R * K
    if stratify == "lattice":
        shift = torch.rand((), generator=g, device=device, dtype=dtype)
        u = torch.remainder(torch.arange(n, device=device, dtype=dtype).div_(n).add_(shift), 1.0)
        return u.mul_(scale).reshape(R, K)
    # global: row r takes the fine strata k*R + pi(r), k = 0..K-1, with pi a random permutation of the rows:
    # the R*K slots cover the R*K fine strata once, each row holds one point in each of the K coarse strata
    # [k/K, (k+1)/K) (so it includes per-upstream stratification), and each row's K points are marginally
    # uniform within their coarse strata, so every row mean and the batch mean are unbiased. The order of
    # the K columns inside a row carries no meaning (estimators average over it). Cost: O(R) random numbers
    # beyond the jitter, instead of a permutation of all R*K draws.
    rows = torch.randperm(R, generator=g, device=device).to(dtype).mul_(world_size).add_(rank)
    cols = torch.arange(K, device=device, dtype=dtype).mul_(R * world_size)
    jitter = torch.rand(R, K, generator=g, device=device, dtype=dtype)
    return jitter.add_(rows[:, None]).add_(cols[None, :]).mul_(scale / (n * world_size))


def inverse_cdf(u: Tensor, cdf: Tensor) -> Tensor:
    """Smallest index ``i`` with ``cdf[i] > u`` (int64), for ``u`` in ``[0, 1)``.

    ``cdf`` is non-decreasing with ``cdf[-1] == 1`` up to rounding; zero-probability entries are never
    returned. A ``u`` at or above ``cdf[-1]`` (a normalised ``cumsum`` can end just below 1) maps to the last
    entry with positive probability, not to a zero-probability tail.
    """
    idx = torch.searchsorted(cdf, u.to(cdf.dtype).contiguous(), right=True)
    last = torch.searchsorted(cdf, cdf[-1:], right=False)  # first index where the cdf reaches its end
    return torch.minimum(idx, last)


class GuideTable:
    """Inverse CDF of a discrete distribution in O(1) per draw (a "guide table").

    ``torch.searchsorted`` costs a binary search per draw (several times a ``torch.randint`` of the
    same size on CPU). Here the timesteps with positive mass are ranked ``0..P-1`` and ``[0, 1)`` is
    cut into ``M`` equal bins (``M`` a power of two, at least ``2 / min q``), so at most one CDF
    breakpoint ``b_j`` falls inside any bin. With ``x = u * M`` in bin ``j`` and ``lo[j]`` the rank
    at the bin's left edge,

        rank = lo[j] + [x >= b_j] = floor(x + C[j]),   C[j] = lo[j] + 1 - b_j

    (``b_j = j + 1`` for a bin without a breakpoint), so a draw costs one gather, one add and one
    float-to-int conversion (plus a gather from rank to timestep when zero-mass timesteps sit inside
    the support). It equals ``inverse_cdf(u, cdf)`` except within float64 rounding (about ``1e-13``)
    of a breakpoint. If ``M`` would exceed ``max_bins`` (probabilities below ``2 / max_bins``), the
    few draws that land in a bin with several breakpoints are resolved by ``searchsorted``.
    """

    def __init__(self, cdf: Tensor, max_bins: int = 1 << 18):
        cdf64 = cdf.to(torch.float64)
        q = torch.diff(cdf64, prepend=cdf64.new_zeros(1))
        pos = (q > 0).nonzero().flatten()
        P = pos.numel()
        cpos = cdf64[pos]
        need = max(8 * P, math.ceil(2.0 / float(q[pos].min())))
        M = min(max_bins, 1 << max(4, (need - 1).bit_length()))
        j = torch.arange(M, dtype=torch.float64, device=cdf.device)
        rank = torch.searchsorted(cpos, torch.arange(M + 1, dtype=torch.float64, device=cdf.device) / M,
                                  right=True).clamp_(max=P - 1)
        lo, gap = rank[:-1], rank[1:] - rank[:-1]
        b = torch.where(gap >= 1, cpos[lo] * M, j + 1)
        C = lo.to(torch.float64) + 1.0 - b
        self.contiguous = bool(pos[-1] - pos[0] == P - 1)
        if self.contiguous:  # rank -> timestep is a shift: fold it into C
            C += float(pos[0])
        self.crowded = bool((gap > 1).any())
        if self.crowded:
            C = torch.where(gap > 1, torch.full_like(C, float("nan")), C)
        # a sentinel bin j = M for x == M exactly (x = u * M can round up to M, e.g. (jitter + K - 1) / K * M
        # with jitter = 1 - 2^-53): floor(M + C[M]) is the last rank, so from_scaled needs no extra clamp pass
        last = float(pos[-1]) if self.contiguous else float(P - 1)
        C = torch.cat([C, C.new_tensor([last + 0.5 - M])])
        self.M, self.C, self.cdf, self.pos = M, C, cdf64, pos

    def from_scaled(self, x: Tensor) -> Tensor:
        """Timesteps (int64) for ``x = u * M``."""
        shape = x.shape
        x = x.reshape(-1)
        j = x.to(torch.int32).clamp_(max=self.M)  # M: the sentinel bin
        y = torch.index_select(self.C, 0, j).add_(x)
        bad = torch.isnan(y) if self.crowded else None
        if bad is not None:
            y.masked_fill_(bad, 0.0)
        t = y.to(torch.int64)  # y >= 0, so truncation is the floor
        if not self.contiguous:
            t = torch.index_select(self.pos, 0, t)
        if bad is not None and bool(bad.any()):
            t[bad] = inverse_cdf(x[bad] / self.M, self.cdf)
        return t.reshape(shape)

    def __call__(self, u: Tensor) -> Tensor:
        return self.from_scaled(u.to(torch.float64) * self.M)


# --------------------------------------------------------------------------- sampler
@dataclass
class TimestepDraws:
    """``t`` (int64 ``[R, K]``) and the importance weights ``weight = p(t)/q(t)`` (``[R, K]``)."""

    t: Tensor
    weight: Tensor

    @property
    def R(self) -> int:
        return self.t.shape[0]

    @property
    def K(self) -> int:
        return self.t.shape[1]


Importance = Tensor | Callable[[Tensor], Tensor] | None


class TimestepSampler:
    """Draw integer timesteps from a proposal ``q`` with importance weights ``p/q`` (see module doc).

    Args:
        num_timesteps: size ``T`` of the teacher's timestep table.
        t_min, t_max: the support of ``p`` (inclusive; ``t_max=None`` means ``T-1``).
        base: non-negative table of length ``T`` for ``p`` (uniform if None), restricted to the support.
        importance: None (``q = p``), a non-negative table of length ``T``, or a callable of the timestep
            tensor ``arange(T)`` returning such a table.
        floor: mixing weight of ``p`` in ``q``; weights are bounded by ``1/floor`` when ``floor > 0``.
        stratify: one of ``"none"``, ``"per_upstream"``, ``"global"``, ``"lattice"``.
        device, dtype: where the draws and weights live.
    """

    def __init__(
        self,
        num_timesteps: int,
        t_min: int = 0,
        t_max: int | None = None,
        base: Tensor | None = None,
        importance: Importance = None,
        floor: float = 0.0,
        stratify: str = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        check_positive_int(num_timesteps, "num_timesteps")
        T = num_timesteps
        if t_max is None:
            t_max = T - 1
        if not (isinstance(t_min, int) and isinstance(t_max, int) and 0 <= t_min <= t_max < T):
            raise ValueError(f"t_min, t_max: need 0 <= t_min <= t_max <= {T - 1}, got t_min={t_min}, t_max={t_max}")
        if not (isinstance(floor, (int, float)) and 0.0 <= floor <= 1.0):
            raise ValueError(f"floor: expected a number in [0, 1], got {floor!r}")
        if stratify not in STRATIFY_MODES:
            raise ValueError(f"stratify: expected one of {STRATIFY_MODES}, got {stratify!r}")
        self.num_timesteps = T
        self.floor, self.stratify = float(floor), stratify
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self._base = None if base is None else _table(base, T, "base")
        self._importance: Tensor | None = None
        self._set_support(t_min, t_max)
        self.set_importance(importance)

    @classmethod
    def from_percent(cls, num_timesteps: int, min_step_percent: float = 0.02, max_step_percent: float = 0.98,
                     **kwargs) -> TimestepSampler:
        """A sampler whose support is given as fractions of ``T``, as threestudio's ``min_step_percent`` /
        ``max_step_percent`` (:func:`percent_range`: ``(0.02, 0.98)`` of 1000 is ``20..980``, inclusive, so the
        support is threestudio's ``randint(min_step, max_step + 1)``). Other arguments as the constructor's."""
        t_min, t_max = percent_range(num_timesteps, min_step_percent, max_step_percent)
        return cls(num_timesteps, t_min, t_max, **kwargs)

    def set_t_percent(self, min_step_percent: float, max_step_percent: float) -> None:
        """:meth:`set_t_range` with fractions of ``T`` (threestudio's ``set_min_max_steps``)."""
        self.set_t_range(*percent_range(self.num_timesteps, min_step_percent, max_step_percent))

    # ---------------------------------------------------------------- tables
    def _set_support(self, t_min: int, t_max: int) -> None:
        T = self.num_timesteps
        support = torch.zeros(T, dtype=torch.float64)
        support[t_min : t_max + 1] = 1.0
        p = support if self._base is None else self._base * support
        if p.sum() <= 0:
            raise ValueError(f"base: sums to 0 on the support t_min..t_max = {t_min}..{t_max}")
        self.t_min, self.t_max = t_min, t_max
        self._p = p / p.sum()

    def set_t_range(self, t_min: int, t_max: int) -> None:
        """Move the objective's support to ``t_min..t_max`` (inclusive), keeping ``base``, the importance
        table, the floor and the stratification.

        ``p`` becomes ``base`` (or uniform) restricted to the new range and ``q`` the same mixture over it,
        so draws after the call are unbiased for the objective on the new range. This is how a pipeline
        anneals its timestep range step by step (threestudio's ``max_step_percent`` schedule): it calls
        ``set_t_range`` before each step, and importance sampling and stratification work inside the
        current range. A no-op when the range does not change."""
        T = self.num_timesteps
        if not (isinstance(t_min, int) and isinstance(t_max, int) and not isinstance(t_min, bool)
                and not isinstance(t_max, bool) and 0 <= t_min <= t_max < T):
            raise ValueError(f"t_min, t_max: need integers 0 <= t_min <= t_max <= {T - 1}, "
                             f"got t_min={t_min!r}, t_max={t_max!r}")
        if (t_min, t_max) == (self.t_min, self.t_max):
            return
        old = (self.t_min, self.t_max, self._p)
        self._set_support(t_min, t_max)
        try:
            self.set_importance(self._importance)
        except ValueError:
            self.t_min, self.t_max, self._p = old
            raise

    def set_importance(self, importance: Importance) -> None:
        """Replace the importance table (recomputes ``q``, its CDF and the weights)."""
        p = self._p
        imp = None
        if importance is None:
            q = p.clone()
        else:
            if callable(importance) and not isinstance(importance, Tensor):
                importance = importance(torch.arange(self.num_timesteps))
            imp = _table(importance, self.num_timesteps, "importance")
            pi = p * imp
            if pi.sum() <= 0:
                raise ValueError("importance: p * importance sums to 0 over the support of p")
            q = (1.0 - self.floor) * pi / pi.sum() + self.floor * p
        zero = (q <= 0) & (p > 0)
        if zero.any():
            ts = zero.nonzero().flatten().tolist()
            raise ValueError(
                f"importance: q = 0 where p > 0 at timesteps {ts[:20]}{' ...' if len(ts) > 20 else ''}; "
                "the estimator would be biased. Make importance positive there or set floor > 0"
            )
        self._q, self._importance = q, imp
        cdf = torch.cumsum(q, 0)
        cdf = cdf / cdf[-1]
        w = torch.where(q > 0, p / q.clamp_min(1e-300), torch.zeros_like(q))
        self._cdf64, self._w64 = cdf, w
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[GuideTable, Tensor]] = {}
        self._cdf = cdf.to(self.device)
        self._guide, self._w = self._tables_on(self.device, self.dtype)

    @property
    def p(self) -> Tensor:
        """The objective's timestep distribution (float64, length ``T``)."""
        return self._p

    @property
    def q(self) -> Tensor:
        """The proposal actually sampled (float64, length ``T``)."""
        return self._q

    @property
    def weights(self) -> Tensor:
        """``p/q`` for every timestep (0 where ``q = 0``), float64."""
        return self._w64

    @property
    def max_weight(self) -> float:
        return float(self._w64.max())

    def expectation(self, f: Tensor) -> Tensor:
        """Exact ``E_p[f(t)]`` for a table ``f`` of shape ``[T, ...]``."""
        f = torch.as_tensor(f)
        p = self._p.to(f.device, f.dtype if f.dtype.is_floating_point else torch.float64)
        return torch.tensordot(p, f.to(p.dtype), dims=([0], [0]))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TimestepSampler:
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self._cdf = self._cdf64.to(self.device)
        self._guide, self._w = self._tables_on(self.device, self.dtype)
        return self

    def _tables_on(self, device: torch.device, dtype: torch.dtype) -> tuple[GuideTable, Tensor]:
        """The guide table and weights on ``device`` (built from the CPU float64 masters, cached per device;
        the sampler's own ``device`` and tables are never changed by a draw on another device)."""
        key = (torch.device(device), dtype)
        if key not in self._tables:
            if key[0].type == "meta":
                raise ValueError("device: the meta device holds no data, and timesteps are drawn from data "
                                 "(the proposal's CDF); pass inputs on a real device (cpu, cuda, ...)")
            self._tables[key] = (GuideTable(self._cdf64.to(key[0])), self._w64.to(key[0], dtype))
        return self._tables[key]

    # ---------------------------------------------------------------- drawing
    def sample(
        self,
        R: int,
        K: int = 1,
        generator: torch.Generator | int | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> TimestepDraws:
        """Draw ``[R, K]`` timesteps and their weights ``p(t)/q(t)`` on ``device`` (default: the sampler's).

        Drawing on another device uses cached copies of the tables there; the sampler itself is unchanged.
        """
        if device is None or torch.device(device) == self.device:
            guide, w, device = self._guide, self._w, self.device
        else:
            guide, w = self._tables_on(torch.device(device), self.dtype)
        x = stratified_uniform(R, K, self.stratify, generator, device, torch.float64, rank, world_size,
                               scale=guide.M)
        t = guide.from_scaled(x)
        return TimestepDraws(t=t, weight=torch.index_select(w, 0, t.reshape(-1)).reshape(t.shape))

    def __repr__(self) -> str:
        return (
            f"TimestepSampler(T={self.num_timesteps}, support={self.t_min}..{self.t_max}, "
            f"importance={'none' if torch.allclose(self._p, self._q) else 'yes'}, floor={self.floor}, "
            f"stratify={self.stratify!r}, max_weight={self.max_weight:.3g})"
        )


# --------------------------------------------------------------------------- online proposals
class LearnedProposal:
    """The variance-optimal proposal ``q ~ p sqrt(E[||f||^2 | t])``, learned online.

    Feed it the per-draw squared norms of the *unweighted* integrand that the pipeline computes
    anyway (``update(t, sq_norm)``); it keeps an exponential moving average per bin of timesteps,
    smooths across neighbouring bins and returns an importance table ``sqrt(m2)`` for
    :meth:`TimestepSampler.set_importance`. Bins never seen take the mean of the seen ones (or the
    ``prior`` table until anything is seen). Its state is saved and restored with the run.
    """

    def __init__(self, num_timesteps: int, num_bins: int = 50, decay: float = 0.95, smoothing: int = 1,
                 prior: Tensor | None = None):
        check_positive_int(num_timesteps, "num_timesteps")
        check_positive_int(num_bins, "num_bins")
        if num_bins > num_timesteps:
            raise ValueError(f"num_bins: at most num_timesteps={num_timesteps}, got {num_bins}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a number in [0, 1), got {decay}")
        if not (isinstance(smoothing, int) and smoothing >= 0):
            raise ValueError(f"smoothing: expected a non-negative integer (bins each side), got {smoothing!r}")
        self.num_timesteps, self.num_bins, self.decay, self.smoothing = num_timesteps, num_bins, decay, smoothing
        self.prior = None if prior is None else _table(prior, num_timesteps, "prior")
        self.m2 = torch.zeros(num_bins, dtype=torch.float64)
        self.mass = torch.zeros(num_bins, dtype=torch.float64)
        self.bin_of = (torch.arange(num_timesteps) * num_bins) // num_timesteps

    def update(self, t: Tensor, sq_norm: Tensor) -> None:
        check_timesteps(t, self.bin_of.numel())  # t = -1 would be credited to the last bin
        t = t.detach().reshape(-1).cpu().long()
        v = sq_norm.detach().reshape(-1).cpu().to(torch.float64)
        if t.numel() != v.numel():
            raise ValueError(f"sq_norm: expected one value per timestep ({t.numel()}), got {v.numel()}")
        if not torch.isfinite(v).all():
            raise ValueError("sq_norm: contains NaN or inf")
        b = self.bin_of[t]
        s = torch.zeros(self.num_bins, dtype=torch.float64).index_add_(0, b, v)
        n = torch.zeros(self.num_bins, dtype=torch.float64).index_add_(0, b, torch.ones_like(v))
        seen = n > 0
        # per-bin EMA in "mass": a bin updated rarely keeps its old estimate
        self.m2[seen] = (self.decay * self.mass[seen] * self.m2[seen] + s[seen]) / (
            self.decay * self.mass[seen] + n[seen]
        )
        self.mass[seen] = self.decay * self.mass[seen] + n[seen]

    @property
    def ready(self) -> bool:
        return bool((self.mass > 0).any())

    def importance(self) -> Tensor | None:
        """Importance table (length ``T``) or the prior (None if no prior) before anything was seen."""
        if not self.ready:
            return self.prior
        seen = self.mass > 0
        m2 = torch.where(seen, self.m2, self.m2[seen].mean())
        if self.smoothing:
            k = 2 * self.smoothing + 1
            padded = torch.nn.functional.pad(m2[None, None], (self.smoothing, self.smoothing), mode="replicate")
            m2 = torch.nn.functional.avg_pool1d(padded, k, stride=1)[0, 0]
        return m2.clamp_min(0).sqrt()[self.bin_of]

    def state_dict(self) -> dict[str, Tensor]:
        return {"m2": self.m2.clone(), "mass": self.mass.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in ("m2", "mass"):
            if state[k].shape != (self.num_bins,):
                raise ValueError(f"state['{k}']: expected shape ({self.num_bins},), got {tuple(state[k].shape)}")
        self.m2, self.mass = state["m2"].to(torch.float64).clone(), state["mass"].to(torch.float64).clone()


class SecondMomentResampler:
    """Peer baseline: improved-diffusion's loss-second-moment resampler, as a carv importance table.

    Keeps the last ``history`` losses per timestep; until every timestep has a full history the
    table is flat (``q = p``); then the importance is ``sqrt(mean(loss^2))`` per timestep. Use with
    ``TimestepSampler(..., floor=uniform_prob)`` to reproduce its mixing with the uniform distribution.
    """

    def __init__(self, num_timesteps: int, history: int = 10):
        check_positive_int(num_timesteps, "num_timesteps")
        check_positive_int(history, "history")
        self.num_timesteps, self.history = num_timesteps, history
        self.buf = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.count = torch.zeros(num_timesteps, dtype=torch.long)

    def update(self, t: Tensor, loss: Tensor) -> None:
        check_timesteps(t, self.buf.shape[0])
        t = t.detach().reshape(-1).cpu().long()
        v = loss.detach().reshape(-1).cpu().to(torch.float64)
        if t.numel() != v.numel():
            raise ValueError(f"loss: expected one value per timestep ({t.numel()}), got {v.numel()}")
        for ti, vi in zip(t.tolist(), v.tolist(), strict=True):
            self.buf[ti, self.count[ti] % self.history] = vi
            self.count[ti] += 1

    @property
    def ready(self) -> bool:
        return bool((self.count >= self.history).all())

    def importance(self) -> Tensor | None:
        if not self.ready:
            return None
        return self.buf.pow(2).mean(1).sqrt()

    def state_dict(self) -> dict[str, Tensor]:
        return {"buf": self.buf.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.buf, self.count = state["buf"].clone(), state["count"].clone()


# --------------------------------------------------------------------------- timestep ranges
def _fraction(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a fraction of the timesteps in [0, 1], got {v!r}")
    return float(v)


def percent_range(num_timesteps: int, lo: float, hi: float) -> tuple[int, int]:
    """Integer support ``(t_min, t_max)`` (inclusive) for the fractions ``lo <= hi`` of ``T`` timesteps.

    ``t = floor(fraction * T)`` clamped to ``T - 1``, threestudio's ``min_step_percent`` /
    ``max_step_percent`` convention: ``(0.02, 0.98)`` of 1000 is ``20..980``."""
    check_positive_int(num_timesteps, "num_timesteps")
    lo, hi = _fraction("lo", lo), _fraction("hi", hi)
    if lo > hi:
        raise ValueError(f"lo, hi: need lo <= hi, got lo={lo}, hi={hi}")
    T = num_timesteps
    return min(int(math.floor(lo * T + 1e-9)), T - 1), min(int(math.floor(hi * T + 1e-9)), T - 1)


def annealed_range(step: int, num_timesteps: int, start: tuple[float, float], end: tuple[float, float] | None = None,
                   anneal_steps: int | None = None) -> tuple[int, int]:
    """The timestep support at optimisation step ``step`` of a linearly annealed range.

    Both ends move linearly from the fractions ``start = (lo, hi)`` at step 0 to ``end`` at step
    ``anneal_steps`` and stay there (threestudio anneals ``max_step_percent`` this way; a decreasing
    ``hi`` is a DreamTime-like coarse-to-fine schedule). ``end=None`` keeps ``start``. Returns
    :func:`percent_range` of the interpolated fractions, for :meth:`TimestepSampler.set_t_range`.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected a non-negative integer, got {step!r}")
    if end is None:
        return percent_range(num_timesteps, *start)
    check_positive_int(anneal_steps, "anneal_steps")
    a = min(step / anneal_steps, 1.0)
    lo = (1 - a) * _fraction("start[0]", start[0]) + a * _fraction("end[0]", end[0])
    hi = (1 - a) * _fraction("start[1]", start[1]) + a * _fraction("end[1]", end[1])
    return percent_range(num_timesteps, lo, hi)


def scheduled_value(spec, global_step: int, epoch: int = 0) -> float:
    """A constant, or a threestudio-style linear schedule at ``global_step`` (or ``epoch``).

    ``spec`` is a number, ``[start_value, end_value, end_step]`` (starting at step 0) or ``[start_step,
    start_value, end_value, end_step]``: the value moves linearly from ``start_value`` at ``start_step`` to
    ``end_value`` at ``end_step`` and stays there. As in threestudio, an integer ``end_step`` counts global
    steps and a float ``end_step`` counts epochs (threestudio ``utils/misc.py: C``).
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return float(spec)
    if not isinstance(spec, (list, tuple)) or len(spec) not in (3, 4) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
        raise ValueError(f"spec: expected a number, [start_value, end_value, end_step] or [start_step, start_value, "
                         f"end_value, end_step], got {spec!r}")
    start_step, start_value, end_value, end_step = (0, *spec) if len(spec) == 3 else spec
    if end_step <= start_step:
        raise ValueError(f"spec: end_step must be after start_step, got {spec!r}")
    now = global_step if isinstance(end_step, int) else epoch
    frac = min(1.0, max(0.0, (now - start_step) / (end_step - start_step)))
    return float(start_value + (end_value - start_value) * frac)


# --------------------------------------------------------------------------- helpers
def _table(v, T: int, name: str) -> Tensor:
    t = torch.as_tensor(v).detach().to("cpu", torch.float64)
    if t.shape != (T,):
        raise ValueError(f"{name}: expected a table of shape ({T},), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name}: entries must be finite and non-negative (min {t.min().item():.3g})")
    return t
