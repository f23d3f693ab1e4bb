"""Held-out evaluation of teachers: denoising MSE and the best linear denoiser as a baseline.

Shared by every built-in teacher's reproduction script and tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from carv.schedules import VPSchedule
from carv.teachers.base import Teacher

__all__ = ["GaussianLinearTeacher", "heldout_denoising_mse"]


class GaussianLinearTeacher(Teacher):
    """The best *linear* noise predictor for data with the mean and covariance of ``images``.

    ``eps_hat(x_t) = s_t (a_t^2 C + s_t^2 I)^{-1} (x_t - a_t m)``: exact ``E[eps | x_t]`` if the data
    were Gaussian ``N(m, C)``. A baseline that a trained teacher must beat (``eps_hat = 0`` is far
    weaker: it scores 1.0). Ignores ``cond``.
    """

    def __init__(self, images: Tensor, schedule: VPSchedule):
        super().__init__()
        x = images.detach().flatten(1).double().cpu()
        self.shape = tuple(images.shape[1:])
        self.schedule = schedule
        self.mean = x.mean(0)
        self.cov = torch.cov(x.T)
        self._mats: dict[int, Tensor] = {}

    def _mat(self, t: int) -> Tensor:
        if t not in self._mats:
            a = float(self.schedule.alphas_cumprod[t]) ** 0.5
            s = (1.0 - float(self.schedule.alphas_cumprod[t])) ** 0.5
            eye = torch.eye(self.cov.shape[0], dtype=torch.float64)
            self._mats[t] = s * torch.linalg.inv(a * a * self.cov + s * s * eye)
        return self._mats[t]

    def predict_eps(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        x = x_t.flatten(1).double().cpu()
        t = t.reshape(-1).expand(x.shape[0]).cpu()
        out = torch.empty_like(x)
        for tv in t.unique().tolist():
            sel = t == tv
            a = float(self.schedule.alphas_cumprod[tv]) ** 0.5
            out[sel] = (x[sel] - a * self.mean) @ self._mat(tv).T
        return out.reshape(x_t.shape).to(x_t.device, x_t.dtype)


@torch.no_grad()
def heldout_denoising_mse(
    teacher: Teacher,
    images: Tensor,
    labels: Tensor | None,
    timesteps_per_image: int = 10,
    seed: int = 0,
    batch_size: int = 512,
) -> tuple[float, float]:
    """Mean and standard error of the per-draw eps-prediction MSE on ``images``.

    Each image is noised at the ``J = timesteps_per_image`` fixed, evenly spaced timesteps
    ``t_j = floor((j + 1/2) T / J)`` (a midpoint rule for uniform ``t``) with noise from ``seed``.
    ``eps_hat = 0`` scores 1.0 on average; :class:`GaussianLinearTeacher` is the stronger baseline.
    Returns ``(mean, standard error over draws)``.
    """
    if images.ndim != 4:
        raise ValueError(f"images: expected shape [N, C, H, W], got {tuple(images.shape)}")
    T = teacher.schedule.num_timesteps
    J = int(timesteps_per_image)
    if J < 1:
        raise ValueError(f"timesteps_per_image: expected a positive integer, got {timesteps_per_image!r}")
    grid = ((torch.arange(J, dtype=torch.float64) + 0.5) * T / J).floor().long()
    n = images.shape[0]
    p = next(iter(teacher.parameters()), None)
    device = p.device if p is not None else images.device
    t = grid.repeat(n).to(device)
    x0 = images.repeat_interleave(J, 0).to(device)
    cond = None if labels is None else labels.repeat_interleave(J, 0).to(device)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g).to(device, x0.dtype)
    per = []
    for s in range(0, x0.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        x_t = teacher.schedule.add_noise(x0[sl], t[sl], eps[sl])
        pred = teacher.predict_eps(x_t, t[sl], None if cond is None else cond[sl])
        per.append((pred - eps[sl]).pow(2).flatten(1).mean(1))
    per = torch.cat(per).double().cpu()
    return per.mean().item(), (per.std() / per.numel() ** 0.5).item()
