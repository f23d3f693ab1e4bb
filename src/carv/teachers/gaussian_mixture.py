"""An analytic teacher: the exact noise prediction for a Gaussian-mixture data distribution.

Data ``x_0 ~ sum_k w_k N(m_k, sigma_k^2 I)``. Under ``x_t = a x_0 + s eps`` the noised marginal is
``sum_k w_k N(a m_k, (a^2 sigma_k^2 + s^2) I)``, whose score is known in closed form; the optimal
(MMSE) noise prediction is ``eps_hat = -s * grad log p_t(x_t)``:

    eps_hat(x_t, t) = s * sum_k gamma_k(x_t) (x_t - a m_k) / (a^2 sigma_k^2 + s^2)

with responsibilities ``gamma_k`` computed by log-sum-exp in float64. ``cond`` (optional, int64
``[B]``) selects one component (class-conditional teacher); ``-1`` means the whole mixture, which
is the unconditional branch used for classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from carv.schedules import VPSchedule
from carv.teachers.base import Teacher

__all__ = ["GaussianMixtureTeacher"]


class GaussianMixtureTeacher(Teacher):
    """Exact eps-prediction for ``sum_k w_k N(means[k], std[k]^2 I)`` on ``schedule``.

    Args:
        means: ``[n_components, *event_shape]``.
        std: scalar or ``[n_components]`` standard deviations.
        weights: ``[n_components]`` non-negative mixture weights (normalised here); None = equal.
        schedule: the :class:`VPSchedule`.
    """

    def __init__(self, means: Tensor, std: float | Tensor, weights: Tensor | None, schedule: VPSchedule):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means: expected shape [n_components, *event_shape], got {tuple(means.shape)}")
        n = means.shape[0]
        std = torch.as_tensor(std, dtype=torch.float64)
        if std.ndim == 0:
            std = std.expand(n).clone()
        if std.shape != (n,) or (std <= 0).any() or not torch.isfinite(std).all():
            raise ValueError(f"std: expected a positive scalar or {n} positive values, got {std.tolist()}")
        if weights is None:
            weights = torch.ones(n, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (n,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights: expected {n} non-negative values with a positive sum, got {weights.tolist()}")
        if not isinstance(schedule, VPSchedule):
            raise TypeError(f"schedule: expected a carv.VPSchedule, got {type(schedule).__name__}")
        self.register_buffer("means", means)
        self.register_buffer("std", std)
        self.register_buffer("weights", weights / weights.sum())
        self.schedule = schedule
        self.event_shape = tuple(means.shape[1:])

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if tuple(x_t.shape[1:]) != self.event_shape:
            want = ", ".join(map(str, self.event_shape))
            raise ValueError(f"x_t: expected shape [B, {want}], got {tuple(x_t.shape)}")
        B = x_t.shape[0]
        x = x_t.reshape(B, 1, -1).to(torch.float64)
        m = self.means.reshape(1, self.num_components, -1).to(x.device)
        a = self.schedule.a(t, torch.float64).reshape(B, 1, 1).to(x.device)
        s = self.schedule.s(t, torch.float64).reshape(B, 1, 1).to(x.device)
        var = a**2 * self.std.to(x.device).reshape(1, -1, 1) ** 2 + s**2  # [B, n, 1]
        diff = x - a * m  # [B, n, D]
        D = diff.shape[-1]
        logp = (torch.log(self.weights.to(x.device)).reshape(1, -1)
                - 0.5 * (diff.pow(2).sum(-1) / var[..., 0]) - 0.5 * D * torch.log(var[..., 0]))
        if cond is not None:
            cond = torch.as_tensor(cond, device=x.device).reshape(B)
            if cond.dtype.is_floating_point or int(cond.max()) >= self.num_components or int(cond.min()) < -1:
                raise ValueError(f"cond: expected component indices in -1..{self.num_components - 1}, "
                                 f"got {cond.tolist()[:10]}")
            onehot = torch.nn.functional.one_hot(cond.clamp_min(0), self.num_components).bool()
            keep = onehot | (cond < 0)[:, None]
            logp = logp.masked_fill(~keep, float("-inf"))
        gamma = torch.softmax(logp, dim=1)[..., None]  # [B, n, 1]
        eps = s[:, 0] * (gamma * diff / var).sum(1)
        return eps.reshape(x_t.shape).to(x_t.dtype)

    def null_cond(self, cond: Any) -> Any:
        if cond is None:
            return None
        return torch.full_like(torch.as_tensor(cond), -1)

    def sample(self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None) -> Tensor:
        """Exact samples of the data distribution (or of component ``cond``)."""
        if cond is None:
            cond = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.event_shape), generator=generator, dtype=torch.float64)
        idx = torch.as_tensor(cond).long()
        return (self.means[idx] + self.std[idx].reshape(-1, *[1] * len(self.event_shape)) * z).float()
