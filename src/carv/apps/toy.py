"""The embedded default problem: score distillation of a point set through a costly differentiable map.

Nothing is downloaded and every quantity is known: the teacher is an analytic Gaussian mixture on a
ring in 2-D (:class:`~carv.teachers.GaussianMixtureTeacher`), the parameters ``theta`` are ``N``
2-D points, and one *upstream sample* is ``x = g(theta, xi)``: the point set rotated by a random
angle ``xi`` (the "camera") and pushed through a fixed random residual MLP (the deliberately costly
differentiable map, standing in for a render). Each step's gradient is the SDS gradient pushed
back through ``g`` once per upstream sample, exactly as in text-to-3D.

:func:`carv.bench.demo.run_demo` (``carv demo``) measures, side by side, the parameter-gradient
variance and cost of uniform, importance-sampled, stratified and combined timestep draws at several
``K`` on this problem. The estimators, proposals and accounting all come from the library; this
module only wires them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from carv._validate import check_seed, check_threads
from carv.accounting import CostMeter, timed_estimate
from carv.objectives.sds import ScoreDistillation
from carv.objectives.weighting import weight_table
from carv.schedules import VPSchedule
from carv.teachers.base import Teacher
from carv.teachers.gaussian_mixture import GaussianMixtureTeacher
from carv.timesteps import LearnedProposal, TimestepSampler

__all__ = ["ToyConfig", "ToyProblem", "METHODS"]

# name -> (proposal, stratify)
METHODS = {
    "uniform": ("none", "none"),
    "importance": ("weight", "none"),
    "stratified": ("none", "per_upstream"),
    "importance+stratified": ("weight", "per_upstream"),
    "learned+stratified": ("learned", "per_upstream"),
}


@dataclass
class ToyConfig:
    num_points: int = 1024
    width: int = 256
    layers: int = 4
    modes: int = 6
    ring_radius: float = 1.5
    mode_std: float = 0.2
    num_timesteps: int = 1000
    floor: float = 0.1
    Ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    R: int = 2
    replicates: int = 20             # minimum per configuration; the first rounds fix each row's count
    rel_error: float = 0.08          # target relative standard error of each row's variance
    max_replicates: int = 1500
    baseline_factor: float = 10.0    # the baseline row's target is rel_error / sqrt(baseline_factor)
    amortise_steps: int = 300        # the pilot is charged to the learned rows as pilot cost / this many steps
    reference_estimates: int = 40
    reference_R: int = 32
    reference_K: int = 32
    pilot_steps: int = 40
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        check_seed(self.seed)
        for name in ("num_points", "width", "layers", "modes", "R", "replicates", "reference_estimates",
                     "reference_R", "reference_K", "pilot_steps", "max_replicates", "amortise_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if not self.Ks or any(not isinstance(k, int) or k < 1 for k in self.Ks):
            raise ValueError(f"Ks: expected a non-empty list of positive integers, got {self.Ks!r}")
        if self.replicates < 2:
            raise ValueError(f"replicates: need at least 2, got {self.replicates}")
        if self.max_replicates < self.replicates:
            raise ValueError(f"max_replicates: need at least replicates={self.replicates}, got {self.max_replicates}")
        if not (isinstance(self.rel_error, (int, float)) and 0 < self.rel_error < 1):
            raise ValueError(f"rel_error: expected a relative error in (0, 1), got {self.rel_error!r}")
        if not (isinstance(self.baseline_factor, (int, float)) and self.baseline_factor >= 1):
            raise ValueError(f"baseline_factor: expected a number >= 1, got {self.baseline_factor!r}")
        if self.threads is not None:
            check_threads(self.threads)
        if not 0 < self.floor <= 1:
            raise ValueError(f"floor: expected a number in (0, 1], got {self.floor}")


class PointSetTeacher(Teacher):
    """Applies a 2-D teacher to every point of a point set ``[B, N, 2]`` (the points are independent)."""

    def __init__(self, inner: Teacher):
        super().__init__()
        self.inner = inner
        self.schedule = inner.schedule

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        B, N = x_t.shape[:2]
        return self.inner.predict_eps(x_t.reshape(B * N, -1), t.repeat_interleave(N), cond).reshape(x_t.shape)


class CostlyMap(nn.Module):
    """Fixed random residual MLP on 2-D points: ``z <- z + V tanh(U z + b)`` repeated ``layers`` times."""

    def __init__(self, width: int, layers: int, generator: torch.Generator):
        super().__init__()
        self.U = nn.ParameterList()
        self.V = nn.ParameterList()
        self.b = nn.ParameterList()
        for _ in range(layers):
            self.U.append(nn.Parameter(torch.randn(2, width, generator=generator) * 0.5, requires_grad=False))
            self.V.append(nn.Parameter(torch.randn(width, 2, generator=generator) * (0.3 / math.sqrt(width)),
                                       requires_grad=False))
            self.b.append(nn.Parameter(torch.randn(width, generator=generator) * 0.5, requires_grad=False))

    def forward(self, z: Tensor) -> Tensor:
        for U, V, b in zip(self.U, self.V, self.b, strict=True):
            z = z + torch.tanh(z @ U + b) @ V
        return z


class ToyProblem:
    """Teacher, parameters and upstream map of the embedded default."""

    def __init__(self, cfg: ToyConfig):
        cfg.validate()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.schedule = VPSchedule.from_betas(1e-4, 0.02, cfg.num_timesteps)
        angles = torch.arange(cfg.modes) * (2 * math.pi / cfg.modes)
        means = cfg.ring_radius * torch.stack([angles.cos(), angles.sin()], -1)
        weights = torch.linspace(1.0, 3.0, cfg.modes)  # unequal, so the rotation "camera" matters
        self.gmm = GaussianMixtureTeacher(means, cfg.mode_std, weights, self.schedule)
        self.teacher = PointSetTeacher(self.gmm)
        self.map = CostlyMap(cfg.width, cfg.layers, g)
        self.theta = nn.Parameter(0.6 * torch.randn(cfg.num_points, 2, generator=g))
        self.w = weight_table("sds", self.schedule)

    def upstream(self, R: int, generator: torch.Generator) -> Tensor:
        """``x_r = g(theta, xi_r)``: rotate by a random angle, then the costly map. ``[R, N, 2]``."""
        phi = torch.rand(R, generator=generator) * (2 * math.pi)
        rot = torch.stack([torch.stack([phi.cos(), -phi.sin()], -1), torch.stack([phi.sin(), phi.cos()], -1)], -2)
        z = torch.einsum("rij,nj->rni", rot, self.theta)
        return self.map(z)

    def sampler(self, proposal: str, stratify: str, learned: LearnedProposal | None = None) -> TimestepSampler:
        T = self.cfg.num_timesteps
        if proposal == "none":
            return TimestepSampler(T, stratify=stratify)
        if proposal == "weight":
            return TimestepSampler(T, importance=self.w, floor=self.cfg.floor, stratify=stratify)
        if proposal == "learned":
            if learned is None or not learned.ready:
                raise ValueError("learned: the learned proposal has seen no draws yet; run the pilot first")
            return TimestepSampler(T, importance=learned.importance(), floor=self.cfg.floor, stratify=stratify)
        raise ValueError(f"proposal: expected 'none', 'weight' or 'learned', got {proposal!r}")

    def gradient(self, sds: ScoreDistillation, R: int, generator: torch.Generator,
                 meter: CostMeter | None = None) -> tuple[Tensor, Any]:
        """One estimate of the parameter gradient ``d/d theta``; times the upstream and teacher stages."""
        self.theta.grad = None
        _, out, _ = timed_estimate(lambda: self.upstream(R, generator), lambda x: sds(x, generator=generator), sds.K,
                                   meter)
        return self.theta.grad.detach().clone(), out
