"""Noise draws for the ``R x K`` estimator: iid, antithetic pairs, common random numbers.

Every mode keeps each ``eps`` marginally standard normal, so the estimator stays unbiased:

- ``"iid"``: independent draws everywhere.
- ``"antithetic"``: within each row, draws come in pairs ``(eps, -eps)`` (``K`` even). The odd part of
  the integrand in ``eps`` cancels exactly inside a pair; the estimator pairs the timesteps too.
- ``"crn"``: common random numbers, the same ``K`` draws for every row (every data point or upstream
  sample). Differences between rows then carry no noise from the draws, which stabilises rankings
  in attribution; the mean over rows is still unbiased, but between-row averaging no longer reduces
  the draw noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from carv._rng import as_generator

__all__ = ["NOISE_MODES", "draw_noise"]

NOISE_MODES = ("iid", "antithetic", "crn")


def check_noise_mode(noise: str, K: int) -> None:
    if noise not in NOISE_MODES:
        raise ValueError(f"noise: expected one of {NOISE_MODES}, got {noise!r}")
    if noise == "antithetic" and K % 2:
        raise ValueError(f"K: antithetic noise pairs draws, so K must be even, got K={K}")


def draw_noise(
    R: int,
    K: int,
    shape: tuple[int, ...] | torch.Size,
    noise: str = "iid",
    generator: torch.Generator | int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of shape ``[R, K, *shape]`` laid out by ``noise``."""
    check_noise_mode(noise, K)
    g = as_generator(generator, device)
    shape = tuple(shape)
    if noise == "iid":
        return torch.randn((R, K, *shape), generator=g, device=device, dtype=dtype)
    if noise == "crn":
        return torch.randn((1, K, *shape), generator=g, device=device, dtype=dtype).expand(R, K, *shape)
    half = torch.randn((R, K // 2, 1, *shape), generator=g, device=device, dtype=dtype)
    return torch.cat([half, -half], dim=2).reshape(R, K, *shape)
