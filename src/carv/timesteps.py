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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    "ProposalSelector",
    "proposal_table",
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


def proposal_table(p: Tensor, importance: Tensor | None, floor: float = 0.0) -> Tensor:
    """The proposal ``q = (1 - floor) * normalise(p * importance) + floor * p`` (``q = p`` for ``importance=None``).

    ``p`` and ``importance`` are non-negative tables of the same length (float64); the one place where a proposal
    is made from an importance table (:meth:`TimestepSampler.set_importance`, :class:`ProposalSelector`)."""
    if importance is None:
        return p.clone()
    pi = p * importance
    if pi.sum() <= 0:
        raise ValueError("importance: p * importance sums to 0 over the support of p")
    return (1.0 - floor) * pi / pi.sum() + floor * p


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
        # rank[k] = #{breakpoints <= k / M}: with M a power of two, cpos * M and k / M are exact, so
        # cpos <= k / M exactly when ceil(cpos * M) <= k, and counting those is a histogram's running sum
        # (equal to searchsorted(cpos, k / M, right=True), at a fraction of its cost for the M + 1 edges)
        edge = torch.ceil(cpos * M).long().clamp_(0, M)
        rank = torch.cumsum(torch.bincount(edge, minlength=M + 1), 0).clamp_(max=P - 1)
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
            q = proposal_table(p, imp, self.floor)
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
    def row_strata(self) -> bool:
        """Whether each row's ``K`` draws hold one point in each of ``K`` equal strata of the proposal's CDF
        (``stratify`` ``"per_upstream"`` or ``"global"``): what :func:`carv.accounting.within_at` prices."""
        return self.stratify in ("per_upstream", "global")

    def half(self, t: Tensor) -> Tensor:
        """Whether each timestep lies in the upper half of the proposal's CDF (mid-bin), ``t``'s shape, bool: the
        halves of two per-row strata (:meth:`carv.accounting.ComponentProbe.half_contrast`)."""
        q = self._q
        cdf = torch.cumsum(q, 0) - q / 2
        return cdf[t.long().cpu()].to(t.device) >= 0.5

    @property
    def importance(self) -> Tensor | None:
        """The importance table in use (float64, length ``T``; None: ``q = p``), as :meth:`set_importance` took it."""
        return self._importance

    def importance_state(self) -> Tensor:
        """The table in use as a checkpoint holds it: a CPU copy, empty for ``q = p`` (a checkpoint with a fixed
        set of keys). A resumed run restores it with :meth:`load_importance_state` rather than rebuilding it from
        a learned proposal's statistics, which have moved since the table was set."""
        imp = self._importance
        return torch.zeros(0, dtype=torch.float64) if imp is None else imp.detach().cpu().clone()

    def load_importance_state(self, state: Tensor) -> None:
        """Set the table that :meth:`importance_state` saved (empty: ``q = p``)."""
        self.set_importance(None if state.numel() == 0 else state)

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

    @contextmanager
    def iid(self) -> Iterator[TimestepSampler]:
        """``with sampler.iid(): ...`` draws iid (``stratify="none"``) inside the block, then restores the mode.

        What a variance probe step uses: :class:`~carv.accounting.ComponentProbe` is unbiased for the components
        of iid draws, while under strata its within part carries the drift of the mean across neighbouring
        strata (DESIGN.md section 2). The step's estimate stays unbiased (iid draws from the same ``q``)."""
        old = self.stratify
        self.stratify = "none"
        try:
            yield self
        finally:
            self.stratify = old

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

def _draw_records(t: Tensor, sq_norm: Tensor, num_timesteps: int) -> tuple[Tensor, Tensor]:
    """Draws as the proposals record them: timesteps checked to lie in ``0..num_timesteps - 1`` (t = -1 would be
    credited to the last bin) and flattened to int64 on the CPU, one finite float64 squared norm per timestep."""
    check_timesteps(t, num_timesteps)
    t = t.detach().reshape(-1).cpu().long()
    v = sq_norm.detach().reshape(-1).cpu().to(torch.float64)
    if t.numel() != v.numel():
        raise ValueError(f"sq_norm: expected one value per timestep ({t.numel()}), got {v.numel()}")
    if not torch.isfinite(v).all():
        raise ValueError("sq_norm: contains NaN or inf")
    return t, v

class LearnedProposal:
    """The variance-optimal proposal ``q ~ p sqrt(E[||f||^2 | t])``, learned online.

    Feed it the per-draw squared norms of the *unweighted* integrand that the pipeline computes
    anyway (``update(t, sq_norm)``); it keeps an exponential moving average per bin of timesteps
    and returns an importance table ``sqrt(m2)`` for :meth:`TimestepSampler.set_importance`.

    :meth:`importance` with ``support=(t_min, t_max)`` (the sampler's) builds the table from the bins seen inside
    the support only: timesteps outside it get 0 (no mass; the sampler's ``p`` is 0 there anyway), the smoothing
    averages a seen bin with its *seen* neighbours inside the support (so nothing from outside is smoothed into the
    support's edge), and a bin inside the support that has no draws yet takes the linear interpolation of its
    nearest seen neighbours (the nearest one's value past the last seen bin). Before any bin of the support was
    seen it returns the ``prior`` (0 outside the support), or None. Its state is saved and restored with the run.
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
        self._record(*_draw_records(t, sq_norm, self.bin_of.numel()))

    def _record(self, t: Tensor, v: Tensor) -> None:
        """:meth:`update` on draws already checked by :func:`_draw_records`.

        A step's few draws are folded in with Python floats on the tables' memory: the same IEEE operations in the
        same order as the tensor path (bit-identical), without a dozen tensor calls of fixed overhead each."""
        if t.numel() <= 64:
            acc: dict[int, list] = {}
            for b, x in zip(self.bin_of[t].tolist(), v.tolist(), strict=True):
                a = acc.setdefault(b, [0.0, 0])
                a[0] += x
                a[1] += 1
            m2, mass = self.m2.numpy(), self.mass.numpy()
            for b, (x, n) in acc.items():
                kept = self.decay * float(mass[b])
                m2[b] = (kept * float(m2[b]) + x) / (kept + n)
                mass[b] = kept + n
            return
        b = self.bin_of[t]
        s = torch.bincount(b, weights=v, minlength=self.num_bins)
        n = torch.bincount(b, minlength=self.num_bins).to(torch.float64)
        # per-bin EMA in "mass": a bin updated rarely keeps its old estimate
        kept = self.decay * self.mass
        seen = n > 0
        self.m2 = torch.where(seen, (kept * self.m2 + s) / torch.where(seen, kept + n, 1.0), self.m2)
        self.mass = torch.where(seen, kept + n, self.mass)

    @property
    def ready(self) -> bool:
        return bool((self.mass > 0).any())

    def _support_mask(self, support: tuple[int, int] | None) -> Tensor:
        """Per-timestep mask of ``support`` (inclusive; None: every timestep)."""
        mask = torch.zeros(self.num_timesteps, dtype=torch.bool)
        lo, hi = (0, self.num_timesteps - 1) if support is None else support
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi < self.num_timesteps):
            raise ValueError(f"support: need integers 0 <= t_min <= t_max <= {self.num_timesteps - 1}, "
                             f"got {support!r}")
        mask[lo:hi + 1] = True
        return mask

    def importance(self, support: tuple[int, int] | None = None) -> Tensor | None:
        """Importance table (length ``T``, 0 outside ``support``), the prior before a bin of the support was seen
        (None without a prior). See the class doc."""
        in_t = self._support_mask(support)
        in_bin = torch.zeros(self.num_bins, dtype=torch.bool).index_fill_(0, self.bin_of[in_t], True)
        seen = (self.mass > 0) & in_bin
        if not seen.any():
            return None if self.prior is None else torch.where(in_t, self.prior, torch.zeros_like(self.prior))
        m2 = torch.where(seen, self.m2, torch.zeros_like(self.m2))
        if self.smoothing:  # a normalised convolution over the seen bins only
            k, pad = 2 * self.smoothing + 1, (self.smoothing, self.smoothing)
            num = torch.nn.functional.avg_pool1d(torch.nn.functional.pad(m2[None, None], pad), k, stride=1)[0, 0]
            den = torch.nn.functional.avg_pool1d(torch.nn.functional.pad(seen.double()[None, None], pad), k,
                                                 stride=1)[0, 0]
            m2 = torch.where(seen, num / den.clamp_min(1e-300), m2)
        idx = seen.nonzero().flatten()
        if idx.numel() < int(in_bin.sum()):  # unseen bins of the support: interpolate their seen neighbours
            b = torch.arange(self.num_bins)
            right = torch.searchsorted(idx, b).clamp(max=idx.numel() - 1)
            left = (right - 1).clamp(min=0)
            right_b, left_b = idx[right], idx[left]
            span = (right_b - left_b).clamp_min(1).double()
            frac = ((b - left_b).double() / span).clamp(0.0, 1.0)
            interp = m2[left_b] + frac * (m2[right_b] - m2[left_b])
            m2 = torch.where(seen, m2, torch.where(in_bin, interp, torch.zeros_like(m2)))
        table = m2.clamp_min(0).sqrt()[self.bin_of]
        return torch.where(in_t, table, torch.zeros_like(table))

    def state_dict(self) -> dict[str, Tensor]:
        return {"m2": self.m2.clone(), "mass": self.mass.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in ("m2", "mass"):
            if state[k].shape != (self.num_bins,):
                raise ValueError(f"state['{k}']: expected shape ({self.num_bins},), got {tuple(state[k].shape)}")
        self.m2, self.mass = state["m2"].to(torch.float64).clone(), state["mass"].to(torch.float64).clone()


class ProposalSelector:
    """Chooses the timestep proposal from the run's own draws (DESIGN.md: "Choosing a proposal without a pilot").

    Draws ``t ~ q`` with squared residual norms ``s`` (the unweighted ``||f||^2`` the step computes anyway) estimate
    the per-draw second moment that any other proposal ``q'`` would give, without drawing from it:

        M(q') = E_q[ p(t)^2 s / (q(t) q'(t)) ] = sum_t p(t)^2 E[s | t] / q'(t),

    an unbiased mean over the recent draws. The candidates are ``"uniform"`` (``q' = p``), ``"weight"`` (``q' ~ p w``,
    the teacher's weighting, when a table is given) and ``"learned"`` (:class:`LearnedProposal`, fed by
    :meth:`update`), each mixed with the sampler's ``floor`` as :func:`proposal_table` does. At :meth:`refresh` the
    candidate with the smallest ``M`` replaces the current one only when the paired difference (same draws) beats
    the current proposal's ``M`` by more than ``sigmas`` standard errors (and by at least ``min_gain`` of it: the
    learned candidate is fitted to the draws it is scored on, and a gain of a per cent or two is within that
    optimism); uniform stays a candidate, so importance sampling switches itself off where it does not pay. The
    learned candidate's table is re-read at every refresh.

    The window holds the last ``window`` draws with the ``q(t)`` that drew them; ``p`` and the candidates are the
    sampler's current ones, so each term is unbiased for the current objective whenever the proposal that drew it
    covered the current support (a support that narrows, as an annealed range does, keeps that; draws outside the
    current support are left out).

    **When to refresh.** :meth:`step` records a step's draws and refreshes when one is due: every ``every`` steps
    at first; after ``settle`` comparisons in a row (refreshes with at least ``min_draws`` draws in the window)
    that keep the current candidate the interval doubles, up to ``every_max`` (default ``8 * every``), and a switch
    brings it back to ``every``. A refresh re-reads the tables over the whole window (about a millisecond at
    ``T = 1000``), which on a cheap step would cost more than the comparison is worth once the choice has settled;
    the schedule depends on the draws only, never on timings, so the same seed refreshes at the same steps. The
    learned table an interval leaves in place is at most ``every_max`` steps old; its moving average remembers far
    longer than that (a bin's ``decay`` applies per draw that lands in it). Calling :meth:`refresh` directly
    bypasses the schedule.

    State (window, current choice, schedule; the switch history is kept in memory) is saved with the run
    (:meth:`state_dict`).
    """

    CANDIDATES = ("uniform", "weight", "learned")

    def __init__(self, num_timesteps: int, weight: Tensor | None = None, learned: LearnedProposal | None = None,
                 start: str = "uniform", window: int = 1024, sigmas: float = 2.0, min_draws: int = 64,
                 min_gain: float = 0.02, every: int = 10, every_max: int | None = None, settle: int = 2):
        check_positive_int(num_timesteps, "num_timesteps")
        check_positive_int(window, "window")
        check_positive_int(min_draws, "min_draws")
        check_positive_int(every, "every")
        check_positive_int(settle, "settle")
        if every_max is None:
            every_max = 8 * every
        if isinstance(every_max, bool) or not isinstance(every_max, int) or every_max < every:
            raise ValueError(f"every_max: expected an integer >= every ({every}), got {every_max!r}")
        if not (isinstance(sigmas, (int, float)) and math.isfinite(sigmas) and sigmas >= 0):
            raise ValueError(f"sigmas: expected a finite non-negative number, got {sigmas!r}")
        self.num_timesteps = num_timesteps
        self.weight = None if weight is None else _table(weight, num_timesteps, "weight")
        self.learned = learned
        self.candidates = tuple(c for c in self.CANDIDATES
                                if c == "uniform" or (c == "weight" and weight is not None)
                                or (c == "learned" and learned is not None))
        if start not in self.candidates:
            raise ValueError(f"start: expected one of the candidates {self.candidates}, got {start!r}")
        if not (isinstance(min_gain, (int, float)) and 0.0 <= min_gain < 1.0):
            raise ValueError(f"min_gain: expected a fraction in [0, 1), got {min_gain!r}")
        self.current, self.window, self.sigmas, self.min_draws = start, window, float(sigmas), min_draws
        self.min_gain = float(min_gain)
        self._buf = {k: torch.zeros(0, dtype=torch.float64) for k in ("t", "s", "q")}
        self._new: list[tuple[Tensor, Tensor, Tensor]] = []  # draws recorded since the window was last joined
        self._new_count = 0
        self.history: list[dict] = []
        self.every, self.every_max, self.settle = every, every_max, settle
        self.steps, self.interval, self.next_refresh, self.kept = 0, every, every, 0

    def table(self, name: str, support: tuple[int, int]) -> Tensor | None:
        """The importance table of candidate ``name`` on ``support`` (None: ``q = p``)."""
        if name == "uniform":
            return None
        if name == "weight":
            return self.weight
        if name == "learned":
            imp = self.learned.importance(support)
            # nothing (or only zeros) seen in the support yet: the weight table, or q = p
            return self.weight if imp is None or not bool((imp > 0).any()) else imp
        raise ValueError(f"name: expected one of {self.candidates}, got {name!r}")

    def update(self, t: Tensor, sq_norm: Tensor, sampler: TimestepSampler) -> None:
        """Record draws ``t`` (made by ``sampler`` as it is now) and their squared residual norms; feeds the learned
        candidate too."""
        t, s = _draw_records(t, sq_norm, self.num_timesteps)
        if self.learned is not None:
            self.learned._record(t, s)
        # joined into the window only when it is read (or has grown to twice its length): a step pays an append
        self._new.append((t, s, sampler.q[t]))
        self._new_count += t.numel()
        if self._new_count >= self.window:
            self._joined()

    def step(self, t: Tensor, sq_norm: Tensor, sampler: TimestepSampler) -> bool:
        """One training step's bookkeeping: :meth:`update` with its draws, then :meth:`advance`. Returns whether
        it refreshed (the sampler's table may have changed)."""
        self.update(t, sq_norm, sampler)
        return self.advance(sampler)

    def advance(self, sampler: TimestepSampler) -> bool:
        """Count one step and :meth:`refresh` when one is due (the schedule in the class docstring), for a caller
        that records draws with :meth:`update` elsewhere (threestudio's guidance records them at each call and
        counts steps in ``update_step``). Returns whether it refreshed."""
        self.steps += 1
        if self.steps < self.next_refresh:
            return False
        switches, compared = len(self.history), int(self._joined()["t"].numel()) >= self.min_draws
        self.refresh(sampler)
        if len(self.history) > switches:
            self.kept, self.interval = 0, self.every
        elif compared:  # a refresh before min_draws compared nothing: it is no evidence that the choice holds
            self.kept += 1
            if self.kept >= self.settle and self.interval < self.every_max:
                self.kept, self.interval = 0, min(2 * self.interval, self.every_max)
        self.next_refresh = self.steps + self.interval
        return True

    def _joined(self) -> dict[str, Tensor]:
        """The window: the last ``window`` draws, oldest first."""
        if self._new:
            t, s, q = (torch.cat([chunk[i] for chunk in self._new]) for i in range(3))
            for k, v in (("t", t.double()), ("s", s), ("q", q)):
                self._buf[k] = torch.cat([self._buf[k], v])[-self.window:]
            self._new, self._new_count = [], 0
        return self._buf

    def _tables(self, sampler: TimestepSampler) -> dict[str, Tensor | None]:
        """Every candidate's importance table on the sampler's support (read once per refresh)."""
        return {c: self.table(c, (sampler.t_min, sampler.t_max)) for c in self.candidates}

    def _terms(self, sampler: TimestepSampler, tables: dict[str, Tensor | None] | None = None) -> dict[str, Tensor]:
        """Per-draw terms ``p(t)^2 s / (q(t) q'(t))`` of every candidate, on the window's draws inside the support."""
        tables = self._tables(sampler) if tables is None else tables
        t, s, q0 = (self._joined()[k] for k in ("t", "s", "q"))
        t = t.long()
        p = sampler.p[t]
        keep = p > 0
        t, base = t[keep], (p * p * s / q0)[keep]
        return {c: base / proposal_table(sampler.p, tables[c], sampler.floor)[t] for c in self.candidates}

    def second_moments(self, sampler: TimestepSampler) -> dict[str, tuple[float, float]]:
        """``{candidate: (M, SE of M - M_current)}`` on the window's draws inside the sampler's support (the SE is of
        the paired difference against the current proposal; 0 for the current one)."""
        terms = self._terms(sampler)
        return {c: (float(x.mean()), _paired_se(x, terms[self.current])) for c, x in terms.items()}

    def refresh(self, sampler: TimestepSampler) -> str:
        """Compare the candidates on the window and set the current candidate's table on ``sampler``; returns its name.

        The best candidate (smallest ``M``) must beat the current one by more than ``sigmas`` SE of their paired
        difference for a switch; the switch then goes to the simplest candidate (uniform, weight, learned) that is
        not worse than the best by more than ``sigmas`` SE, so a learned table fitted to noise never displaces
        uniform sampling where the residual does not depend on ``t``."""
        tables = self._tables(sampler)
        if int(self._joined()["t"].numel()) >= self.min_draws:
            terms = self._terms(sampler, tables)
            m = {c: float(x.mean()) for c, x in terms.items()}
            best = min(m, key=m.get)
            gain = m[self.current] - m[best]
            if best != self.current and gain > max(self.sigmas * _paired_se(terms[self.current], terms[best]),
                                                   self.min_gain * m[self.current]):
                to = next(c for c in self.candidates
                          if c == best or m[c] - m[best] <= self.sigmas * _paired_se(terms[c], terms[best]))
                self.history.append({"draws": int(terms[best].numel()), "from": self.current, "to": to,
                                     "second_moments": m})
                self.current = to
        table, now = tables[self.current], sampler.importance
        unchanged = table is now if table is None or now is None else torch.equal(table, now)
        if not unchanged:  # the same table gives the same q (set_t_range keeps q in step with p): no rebuild
            sampler.set_importance(table)
        return self.current

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (the window, the index of the current candidate and the refresh schedule: steps, interval,
        next refresh, refreshes kept in a row); the learned candidate saves its own."""
        return {**{k: v.clone() for k, v in self._joined().items()},
                "current": torch.tensor(self.CANDIDATES.index(self.current)),
                "schedule": torch.tensor([self.steps, self.interval, self.next_refresh, self.kept])}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        current = self.CANDIDATES[int(state["current"])]
        if current not in self.candidates:
            raise ValueError(f"state['current']: {current!r} is not a candidate here ({self.candidates})")
        self._buf = {k: state[k].to(torch.float64).clone()[-self.window:] for k in ("t", "s", "q")}
        self._new, self._new_count = [], 0
        self.current = current
        if "schedule" in state:  # a state saved before the schedule existed refreshes every `every` steps
            steps, interval, next_refresh, kept = (int(v) for v in state["schedule"].tolist())
            if not (0 <= steps <= next_refresh and 1 <= interval <= self.every_max and kept >= 0):
                raise ValueError(f"state['schedule']: expected [steps, interval, next refresh, kept] with "
                                 f"1 <= interval <= every_max ({self.every_max}), got {state['schedule'].tolist()}")
            self.steps, self.interval, self.next_refresh, self.kept = steps, interval, next_refresh, kept


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
    """A constant, or a threestudio schedule at ``global_step`` (or ``epoch``), as threestudio's ``C()``
    (``threestudio/utils/misc.py``).

    ``spec`` is a number; ``[start_value, end_value, end_step]`` (starting at step 0); ``[start_step,
    start_value, end_value, end_step]``: the value moves linearly from ``start_value`` at ``start_step`` to
    ``end_value`` at ``end_step`` and stays there; or a piecewise schedule of 6 or more entries ``[start_step,
    v0, v1, step1, v2, step2, v3, step3, ...]``: linear from ``v0`` at ``start_step`` to ``v1`` at ``step1``,
    then to ``v2`` at ``step2``, and so on (a trailing odd entry is unused, as in threestudio). As in
    threestudio, an integer end step counts global steps and a float one counts epochs. Any sequence of numbers
    is taken (an OmegaConf ``ListConfig`` too).
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return float(spec)
    try:
        v = list(spec)
    except TypeError:
        v = None
    if v is None or len(v) not in (3, 4) and len(v) < 6 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ValueError(f"spec: expected a number, [start_value, end_value, end_step], [start_step, start_value, "
                         f"end_value, end_step] or a piecewise [start_step, v0, v1, step1, v2, step2, ...], "
                         f"got {spec!r}")
    if len(v) == 3:
        v = [0, *v]
    if len(v) >= 6:  # threestudio's segment choice: the last segment whose start step has been reached
        i = 3
        for j in range(3, len(v) - 2, 2):
            if global_step >= v[j]:
                i = j + 2
        v = [v[0], v[1], v[2], v[3]] if i == 3 else [v[i - 2], v[i - 3], v[i - 1], v[i]]
    start_step, start_value, end_value, end_step = v
    if end_step <= start_step:
        raise ValueError(f"spec: each end step must be after its start step, got {spec!r}")
    now = global_step if isinstance(end_step, int) else epoch
    frac = min(1.0, max(0.0, (now - start_step) / (end_step - start_step)))
    return float(start_value + (end_value - start_value) * frac)


# --------------------------------------------------------------------------- helpers
def _paired_se(x: Tensor, y: Tensor) -> float:
    """Standard error of ``mean(x - y)`` (0 for identical terms, inf with fewer than 2)."""
    n = int(x.numel())
    return float((x - y).std() / math.sqrt(n)) if n > 1 else float("inf")


def _table(v, T: int, name: str) -> Tensor:
    t = torch.as_tensor(v).detach().to("cpu", torch.float64)
    if t.shape != (T,):
        raise ValueError(f"{name}: expected a table of shape ({T},), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name}: entries must be finite and non-negative (min {t.min().item():.3g})")
    return t
