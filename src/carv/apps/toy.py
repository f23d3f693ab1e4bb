"""The embedded default problem: score distillation of a point set through a costly differentiable map.

Nothing is downloaded and every quantity is known: the teacher is an analytic Gaussian mixture on a
ring in 2-D (:class:`~carv.teachers.GaussianMixtureTeacher`), the parameters ``theta`` are ``N``
2-D points, and one *upstream sample* is ``x = g(theta, xi)``: the point set rotated by a random
angle ``xi`` (the "camera") and pushed through a fixed random residual MLP (the deliberately costly
differentiable map, standing in for a render). Each step's gradient is the SDS gradient pushed
back through ``g`` once per upstream sample, exactly as in text-to-3D.

:func:`run_demo` measures, side by side, the parameter-gradient variance and cost of uniform,
importance-sampled, stratified and combined timestep draws at several ``K`` and reports RE, ECM, the
fraction of the efficiency bound and the ``K`` the accountant recommends. The estimators, proposals
and accounting all come from the library; this module only wires them.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from carv.accounting import CostMeter, optimal_k, timed_estimate
from carv.bench.harness import Config, add_figures, measure, reference_mean
from carv.bench.report import markdown_table, plot_ecm_vs_k, plot_variance_vs_cost, print_table
from carv.objectives.sds import ScoreDistillation
from carv.objectives.weighting import weight_table
from carv.schedules import VPSchedule
from carv.teachers.base import Teacher
from carv.teachers.gaussian_mixture import GaussianMixtureTeacher
from carv.timesteps import LearnedProposal, TimestepSampler

__all__ = ["ToyConfig", "ToyProblem", "run_demo", "METHODS"]

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
    replicates: int = 150
    reference_estimates: int = 40
    reference_R: int = 32
    reference_K: int = 32
    pilot_steps: int = 40
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        for name in ("num_points", "width", "layers", "modes", "R", "replicates", "reference_estimates",
                     "reference_R", "reference_K", "pilot_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if not self.Ks or any(not isinstance(k, int) or k < 1 for k in self.Ks):
            raise ValueError(f"Ks: expected a non-empty list of positive integers, got {self.Ks!r}")
        if self.replicates < 2:
            raise ValueError(f"replicates: need at least 2, got {self.replicates}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: expected a positive integer or None, got {self.threads!r}")
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


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, json_path: str | Path | None = None,
             progress: bool = True, cfg: ToyConfig | None = None) -> dict:
    """Measure every method x K side by side on the toy problem; write a run folder; return the results."""
    cfg = cfg or ToyConfig()
    if quick:
        cfg.replicates = min(cfg.replicates, 60)
        cfg.reference_estimates = min(cfg.reference_estimates, 16)
        cfg.pilot_steps = min(cfg.pilot_steps, 20)
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prob = ToyProblem(cfg)
    torch.manual_seed(cfg.seed)  # nothing below draws from it; set for any third-party code

    # pilot: learn the variance-optimal proposal from the draws a production run makes anyway, and let the
    # accountant measure costs and (x-space) variance components to recommend K
    learned = LearnedProposal(cfg.num_timesteps, num_bins=50)
    pilot = ScoreDistillation(prob.teacher, prob.sampler("weight", "per_upstream"), K=8)
    meter = CostMeter()
    comps = []
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.pilot_steps):
        _, o = prob.gradient(pilot, cfg.R, g, meter)
        learned.update(o.draws.t, o.estimate.sq_norms)
        comps.append((o.estimate.between, o.estimate.within))
    between = sum(c[0] for c in comps) / len(comps)
    within = sum(c[1] for c in comps) / len(comps)
    k_accountant = optimal_k(between, within, meter.median("upstream"), meter.median("draw"), k_max=max(cfg.Ks))

    sds = {m: ScoreDistillation(prob.teacher, prob.sampler(p, s, learned)) for m, (p, s) in METHODS.items()}

    def estimate(c: Config, gen: torch.Generator, m: CostMeter) -> Tensor:
        est = sds[c.method]
        est.K = c.K
        return prob.gradient(est, c.R, gen, m)[0]

    ref_cfg = Config("learned+stratified", cfg.reference_R, cfg.reference_K)
    reference, ref_var = reference_mean(estimate, ref_cfg, cfg.reference_estimates, cfg.seed + 2, progress)
    configs = [Config(m, cfg.R, k) for m in METHODS for k in cfg.Ks]
    rows = measure(configs, estimate, reference, cfg.replicates, seed=cfg.seed + 3, state_dir=out / "state",
                   progress=progress, desc="side-by-side replicates")
    summary = add_figures(rows, baseline=("uniform", cfg.R, 1), k_max=max(cfg.Ks))
    best = max(rows, key=lambda r: r["ecm"])
    best_k = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["ecm"])["K"] for m in METHODS}
    result = {
        "command": "carv demo" + (" --quick" if quick else ""),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": asdict(cfg),
        "rows": rows,
        "summary": summary,
        "reference": {"method": ref_cfg.method, "R": ref_cfg.R, "K": ref_cfg.K, "estimates": cfg.reference_estimates,
                      "variance_of_reference": ref_var},
        "accountant": {"k": k_accountant, "between_x": between, "within_x": within,
                       "c_upstream_s": meter.median("upstream"), "c_draw_s": meter.median("draw"),
                       "note": "x-space components from the pilot's own draws (stratified: within is conservative)"},
        "best": {"method": best["method"], "R": best["R"], "K": best["K"], "ecm": best["ecm"]},
        "best_k_per_method": best_k,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    with open(out / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    cols = ("method", "R", "K", "variance", "variance_se", "cost_s", "re", "ecm", "bound_fraction")
    (out / "table.md").write_text(markdown_table(rows, cols) + "\n")
    plot_variance_vs_cost(rows, out / "variance_vs_cost.png", "toy SDS: parameter-gradient variance vs compute")
    plot_ecm_vs_k(rows, out / "ecm_vs_k.png", R=cfg.R, title=f"toy SDS: ECM vs K (R = {cfg.R}, baseline uniform K=1)")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    if progress:
        print_table(rows, cols, title="carv demo: SDS of a point set through a costly map (GMM teacher)",
                    highlight={(best["method"], best["R"], best["K"])})
        print(f"measured cost ratio c_up / c_draw = {summary['cost_ratio']:.2f}; "
              f"accountant's K (pilot, x-space) = {k_accountant}; "
              f"best measured: {best['method']} K={best['K']} ECM {best['ecm']:.2f}x")
        print(f"run folder: {out}")
    return result
