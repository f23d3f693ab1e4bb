"""Timestep weighting functions ``w(t)`` of the diffusion objectives, as tables over ``t = 0..T-1``.

One table serves both the objective (it multiplies each draw) and the free importance proposal
``q ~ p * w`` (DESIGN.md: the teacher's own weighting needs no pilot run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from carv.schedules import VPSchedule

__all__ = ["Weighting", "WEIGHTINGS", "weight_table"]

Weighting = str | Callable[[Tensor], Tensor]
WEIGHTINGS = ("sds", "uniform", "snr", "fantasia3d")


def weight_table(weighting: Weighting, schedule: VPSchedule) -> Tensor:
    """``w(t)`` for every timestep (float64, length ``T``).

    ``"sds"``: ``1 - alphabar_t`` (DreamFusion); ``"uniform"``: 1; ``"snr"``: ``alphabar_t / (1 - alphabar_t)``
    (the eps-loss weighting that makes the loss an x_0 error); ``"fantasia3d"``: ``sqrt(alphabar_t) (1 - alphabar_t)``
    (threestudio's ``weighting_strategy: fantasia3d``); or a callable of the integer timestep tensor.
    """
    T = schedule.num_timesteps
    ac = schedule.alphas_cumprod
    if callable(weighting):
        w = torch.as_tensor(weighting(torch.arange(T)), dtype=torch.float64)
        if w.shape != (T,):
            raise ValueError(f"weighting: the callable must return one value per timestep, shape ({T},), "
                             f"got {tuple(w.shape)}")
    elif weighting == "sds":
        w = 1.0 - ac
    elif weighting == "uniform":
        w = torch.ones(T, dtype=torch.float64)
    elif weighting == "snr":
        w = ac / (1.0 - ac)
    elif weighting == "fantasia3d":
        w = ac.sqrt() * (1.0 - ac)
    else:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS} or a callable of t, got {weighting!r}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weighting: w(t) must be finite and non-negative for every timestep")
    return w
