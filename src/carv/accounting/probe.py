"""Variance components of the projected estimate (the parameter gradient) from one ``R x K`` batch:
:class:`ComponentProbe`."""

from __future__ import annotations

import torch
from torch import Tensor

from carv.accounting.components import ProbedComponents, VarianceComponents

__all__ = ["ComponentProbe"]


class ComponentProbe:
    """Variance components of the *projected* estimate (e.g. the parameter gradient) from one ``R x K``
    batch, with two extra vector-Jacobian products.

    :func:`variance_components` splits the variance of the per-draw values ``f`` (e.g. render-space
    residuals). The user pays for their image under the upstream's Jacobian, ``g_r = J_r^T fbar_r``, and
    the two spaces can split the variance very differently between the between- and the within-sample
    parts (so the accountant's ``K`` can be far off when it reads the cheap proxy). With ``values`` the
    weighted per-draw values ``[R, K, ...]`` of one batch, :meth:`cotangents` returns two ``[R, ...]``
    cotangents for the upstream output ``x``:

    - the *contrast* ``u_r = c_r fbar_r`` with fixed centred signs ``c`` (``sum c = 0``):
      ``E||sum_r c_r g_r||^2 = (sum c^2) Var(g_r)`` and ``Var(g_r) = sigma_b^2 + sigma_w^2 / K``;
    - the *within contrast* ``h_r = s_r sum_k a_k f_rk`` with fixed column weights ``a`` (``sum a = 0``) and an
      independent random sign ``s_r`` per row: ``E||sum_r J_r^T h_r||^2 = R (sum a^2) sigma_w^2``. For iid draws
      any such weights are exchangeable with a random split. Under carv's per-row (and global) strata a row's
      columns are in stratum order, and the weights are blocks ``(+1, -1, -1, +1)`` (``(1, -2, 1)`` where
      ``K`` leaves 3 or 6 columns) of neighbouring strata, which cancel the mean's constant and linear drift
      across the block: the contrast then measures the *within-stratum* variance, the ``sigma_w^2`` a stratified
      row mean pays (``Var(row mean) = sigma_w^2 / K``), up to the drift's curvature. A random split of the
      draws measures the spread across strata too (the iid ``sigma_w^2``, several times larger for a strongly
      ``t``-dependent residual); a split shared by every row adds cross-row terms (``E[h_r] != 0`` under
      strata), which the signs remove. Measured on distillation's start checkpoint (per-row strata, ``K = 8``,
      40 probes each, SE about 30%): the random shared split read ``sigma_w^2`` 1.9e6 (``R = 2``) and 4.1e6
      (``R = 4``) against about 9e5 for iid draws, which drove ``sigma_b^2`` to 0; these weights read
      ``sigma_b^2`` in line with iid draws'. ``K = 2`` has no drift-free contrast: ``(+1, -1)``.

    Push each through the upstream (``torch.autograd.grad(x, params, u, retain_graph=True)``) and pass
    the results to :meth:`components`, which returns ``(sigma_b^2, sigma_w^2)`` of the projected estimate:
    unbiased (before clipping ``sigma_b^2`` at 0) for iid draws; with stratified draws the within part is
    conservative, as for :func:`variance_components`.
    """

    def __init__(self, R: int, K: int):
        if not isinstance(R, int) or isinstance(R, bool) or R < 2:
            raise ValueError(f"R: the between-sample part needs R >= 2 upstream samples, got {R!r}")
        if not isinstance(K, int) or isinstance(K, bool) or K < 2:
            raise ValueError(f"K: the within-sample part needs K >= 2 draws per upstream sample, got {K!r}")
        self.R, self.K = R, K
        s = torch.tensor([1.0 if r % 2 == 0 else -1.0 for r in range(R)], dtype=torch.float64)
        self.contrast = s - s.mean()
        self.weights = _within_weights(K)

    def cotangents(self, values: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(u, h)``, each ``[R, ...]`` like the upstream output, from weighted per-draw values ``[R, K, ...]``."""
        if values.ndim < 2 or tuple(values.shape[:2]) != (self.R, self.K):
            raise ValueError(f"values: expected shape [R, K, ...] = [{self.R}, {self.K}, ...], "
                             f"got {tuple(values.shape)}")
        v = values.detach()
        c = self.contrast.to(v.device, v.dtype).reshape(self.R, *([1] * (v.ndim - 2)))
        u = c * v.mean(1)
        dev = "cpu" if generator is None else generator.device
        sign = torch.randint(0, 2, (self.R,), generator=generator, device=dev).to(v.device, v.dtype).mul_(2).sub_(1)
        a = self.weights.to(v.device, v.dtype).reshape(1, self.K, *([1] * (v.ndim - 2)))
        h = sign.reshape(c.shape) * (a * v).sum(1)
        return u, h

    def measure(self, x: Tensor, params, values: Tensor, generator: torch.Generator | None = None, *,
                retain_graph: bool = False, clip: bool = False) -> VarianceComponents:
        """The whole probe on one batch: :meth:`cotangents` of ``values`` (``[R, K, ...]``), each pushed through the
        upstream output ``x`` to ``params`` by a vector-Jacobian product, then :meth:`components` (signed by
        default, for :meth:`Allocator.observe`). ``retain_graph=True`` keeps ``x``'s graph for a backward pass
        still to come; parameters ``x`` does not depend on are skipped."""
        u, h = self.cotangents(values, generator)
        params = list(params)
        ju = torch.autograd.grad(x, params, u, retain_graph=True, allow_unused=True)
        jh = torch.autograd.grad(x, params, h, retain_graph=retain_graph, allow_unused=True)
        return self.components(ju, jh, clip=clip)

    def half_contrast(self, values: Tensor, halves: Tensor, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, int]:
        """``(h, n)``: the cotangent of the draws' pairs (columns ``2j, 2j + 1`` of each row) whose two timesteps fall
        in the same half of the proposal's CDF (``halves``, ``[R, K]`` bool), each pair's difference with an
        independent random sign, and ``n`` the number of such pairs. For iid draws the two of a same-half pair are
        exchangeable, so ``E||J^T h||^2 = 2 n sigma_s^2(2)``: the within-half variance, what one draw of a row of
        two per-row strata pays (:meth:`measure_halves`)."""
        v = values.detach()
        P = self.K // 2
        lo, hi = v[:, 0:2 * P:2], v[:, 1:2 * P:2]
        same = (halves[:, 0:2 * P:2] == halves[:, 1:2 * P:2]).to(v.device)
        dev = "cpu" if generator is None else generator.device
        sign = torch.randint(0, 2, (self.R, P), generator=generator, device=dev).to(v.device, v.dtype).mul_(2).sub_(1)
        w = (sign * same.to(v.dtype)).reshape(self.R, P, *([1] * (v.ndim - 2)))
        return (w * (lo - hi)).sum(1), int(same.sum())

    def measure_halves(self, x: Tensor, params, values: Tensor, halves: Tensor | None,
                       generator: torch.Generator | None = None, *, retain_graph: bool = False,
                       clip: bool = False) -> ProbedComponents | VarianceComponents:
        """:meth:`measure` plus a third vector-Jacobian product: ``(between, within, within_half)`` with the
        within-half variance ``sigma_s^2(2)`` of the projected estimate (:meth:`half_contrast`; None when no pair
        fell in one half). With the iid ``sigma_w^2`` it gives the share of the within part that two per-row strata
        of ``t`` remove, ``1 - sigma_s^2(2) / sigma_w^2`` (:func:`carv.accounting.within_at`,
        :attr:`carv.accounting.Allocator.strata`): one sample with two stratified draws has variance
        ``sigma_b^2 + sigma_s^2(2) / 2`` where iid draws have ``sigma_b^2 + sigma_w^2 / 2``. ``halves=None``:
        :meth:`measure` alone (two products), for callers that read the halves only on some probes."""
        if halves is None:
            return self.measure(x, params, values, generator, retain_graph=retain_graph, clip=clip)
        params = list(params)
        comps = self.measure(x, params, values, generator, retain_graph=True, clip=clip)
        h, n = self.half_contrast(values, halves, generator)
        if n == 0:
            return ProbedComponents(*comps)
        jh = torch.autograd.grad(x, params, h.to(x.dtype), retain_graph=retain_graph, allow_unused=True)
        return ProbedComponents(*comps, _sq_norm(jh) / (2.0 * n))

    def components(self, projected_contrast, projected_half, *, clip: bool = True) -> VarianceComponents:
        """``(sigma_b^2, sigma_w^2)`` from the projected cotangents (tensors, or sequences of tensors such as
        one gradient per parameter). ``clip=False`` keeps the signed (unbiased) between estimate: pass that to
        :meth:`Allocator.observe`, which averages many probes (see :func:`variance_components`)."""
        total = _sq_norm(projected_contrast) / float(self.contrast.pow(2).sum())  # Var(g_r)
        within = _sq_norm(projected_half) / (self.R * float(self.weights.pow(2).sum()))
        between = total - within / self.K
        return VarianceComponents(max(between, 0.0) if clip else between, within)


def _within_weights(K: int) -> Tensor:
    """Column weights of :class:`ComponentProbe`'s within contrast: consecutive blocks ``(+1, -1, -1, +1)``, the
    last one or two blocks ``(1, -2, 1)`` when ``K mod 4`` is 3 or 2 (a leftover column gets 0), each block
    summing to 0 with no linear drift (``sum_k a_k k = 0``); ``K = 2``: ``(+1, -1)``."""
    if K == 2:
        return torch.tensor([1.0, -1.0], dtype=torch.float64)
    sizes = {0: [4] * (K // 4), 1: [4] * (K // 4), 2: [4] * (K // 4 - 1) + [3, 3], 3: [4] * (K // 4) + [3]}[K % 4]
    blocks = [[1.0, -1.0, -1.0, 1.0] if n == 4 else [1.0, -2.0, 1.0] for n in sizes]
    w = [x for b in blocks for x in b]
    return torch.tensor(w + [0.0] * (K - len(w)), dtype=torch.float64)


def _sq_norm(v) -> float:
    if isinstance(v, Tensor):
        return float(v.detach().double().pow(2).sum())
    return sum(float(t.detach().double().pow(2).sum()) for t in v if t is not None)
