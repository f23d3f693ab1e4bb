"""Variance-preserving noise schedules.

A schedule is the table ``alphabar_t`` for the integer timesteps ``0..T-1``. Everything else
(``a_t = sqrt(alphabar_t)``, ``s_t = sqrt(1 - alphabar_t)``, the SNR, noising) is derived from it.
The table is kept in float64 on the CPU; lookups move it once to the device of the timestep tensor
and cache it there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["VPSchedule", "broadcast_to"]


def broadcast_to(v: Tensor, x: Tensor) -> Tensor:
    """Reshape ``v`` (shape ``[*B]``) to ``[*B, 1, ..., 1]`` so it broadcasts against ``x`` (``[*B, ...]``)."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class VPSchedule:
    """Discrete variance-preserving schedule ``x_t = a_t x_0 + s_t eps``.

    Build it with :meth:`from_betas`, :meth:`cosine`, :meth:`from_alphas_cumprod` or
    :meth:`from_diffusers`.
    """

    def __init__(self, alphas_cumprod: Tensor):
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if ac.numel() < 1:
            raise ValueError("alphas_cumprod: expected at least one timestep, got an empty tensor")
        if not torch.isfinite(ac).all() or (ac <= 0).any() or (ac > 1).any():
            raise ValueError(
                "alphas_cumprod: every entry must be finite and in (0, 1]; "
                f"got min {ac.min().item():.3g}, max {ac.max().item():.3g}"
            )
        self._ac = ac
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_betas(
        cls,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_timesteps: int = 1000,
        kind: str = "linear",
    ) -> VPSchedule:
        """DDPM betas: ``"linear"`` in beta, or ``"scaled_linear"`` (linear in sqrt(beta), Stable Diffusion)."""
        _check_num_timesteps(num_timesteps)
        if not (0 < beta_start <= beta_end < 1):
            raise ValueError(
                f"beta_start, beta_end: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
            )
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"kind: expected 'linear' or 'scaled_linear', got {kind!r}")
        return cls(torch.cumprod(1.0 - betas, 0))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> VPSchedule:
        """Nichol & Dhariwal's cosine schedule, with betas clipped at ``max_beta``."""
        _check_num_timesteps(num_timesteps)

        def f(i: float) -> float:
            return math.cos((i / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)], dtype=torch.float64
        )
        return cls(torch.cumprod(1.0 - betas, 0))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> VPSchedule:
        return cls(alphas_cumprod)

    @classmethod
    def from_diffusers(cls, scheduler) -> VPSchedule:
        """Take ``alphas_cumprod`` from any diffusers scheduler that has it (DDPM, DDIM, PNDM, ...)."""
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise TypeError(
                f"scheduler: {type(scheduler).__name__} has no 'alphas_cumprod'; "
                "use a variance-preserving scheduler such as DDPMScheduler or DDIMScheduler"
            )
        return cls(ac)

    # ------------------------------------------------------------------ tables
    @property
    def num_timesteps(self) -> int:
        return self._ac.numel()

    @property
    def alphas_cumprod(self) -> Tensor:
        """``alphabar_t`` for ``t = 0..T-1`` (float64, CPU)."""
        return self._ac

    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (
                self._ac.sqrt().to(device, dtype),
                (1.0 - self._ac).sqrt().to(device, dtype),
            )
        return self._cache[key]

    def _lookup(self, t: Tensor, which: int, dtype: torch.dtype | None) -> Tensor:
        t = self._check_t(t)
        return self._tables(t.device, dtype or torch.get_default_dtype())[which][t]

    def _check_t(self, t) -> Tensor:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"t: expected an integer timestep tensor, got dtype {t.dtype}")
        # the range check reads values, which torch.func transforms (vmap/grad) forbid: skip it there
        if t.numel() and not _is_functorch_wrapped(t) and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"t: timesteps must lie in 0..{self.num_timesteps - 1}, got range "
                f"{int(t.min())}..{int(t.max())}"
            )
        return t.long()

    def a(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``sqrt(alphabar_t)``, same shape and device as ``t``."""
        return self._lookup(t, 0, dtype)

    def s(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``sqrt(1 - alphabar_t)``, same shape and device as ``t``."""
        return self._lookup(t, 1, dtype)

    def snr(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return self.a(t, dtype) ** 2 / self.s(t, dtype) ** 2

    def add_noise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``a_t x0 + s_t eps``; ``t`` has the leading shape of ``x0``."""
        a, s = self.a(t, x0.dtype), self.s(t, x0.dtype)
        return broadcast_to(a, x0) * x0 + broadcast_to(s, x0) * eps

    def __repr__(self) -> str:
        ac = self._ac
        return f"VPSchedule(T={self.num_timesteps}, alphabar[0]={ac[0]:.5f}, alphabar[-1]={ac[-1]:.3g})"


def _is_functorch_wrapped(t: Tensor) -> bool:
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def _check_num_timesteps(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_timesteps: expected a positive integer, got {n!r}")
