"""Upstream strata: where in ``[0, 1)^d`` the ``R`` upstream draws of each step sit (camera, label, latent).

The between-upstream component ``sigma_b^2`` of DESIGN.md section 2 (camera pose, class label, generator
latent) is untouched by ``K``. These samplers spread the upstream draws instead of drawing them iid, and
each keeps every draw *marginally uniform*, so each step's estimate stays unbiased (an average of
``f(u_i)`` with every ``u_i ~ U[0, 1)^d`` has mean ``E f`` whatever the dependence between the ``u_i``):

- :func:`stratified_unit`: one jittered point per stratum across the ``R`` draws of one step (Latin
  hypercube in ``d > 1``: every coordinate stratified, the columns paired at random). Independent across
  steps.
- :class:`UpstreamSampler` with ``mode="lattice"``: a randomly shifted Kronecker lattice across steps,
  ``u_m = (u_0 + m alpha) mod 1`` with ``u_0 ~ U[0, 1)^d`` drawn once and ``m`` counting every draw of the
  run (``alpha`` the generalised golden ratio). Each draw is marginally uniform (a uniform shift of any
  point is uniform), and consecutive draws, within a step and across steps, cover the space evenly: at
  ``R = 1`` successive cameras go round the circle by the golden angle.
- :func:`balanced_labels`: class labels ``floor(C u)`` from any of the above; with ``R`` a multiple of
  ``C`` and strata, every class appears exactly ``R / C`` times per step, and each position's label is
  still uniform over the classes.
- :func:`sobol_normal`: randomised quasi-Monte Carlo Gaussian latents (scrambled Sobol points from scipy
  mapped through the normal inverse CDF); each row is marginally ``N(0, I)``.

Apply a map to each coordinate (azimuth ``-180 + 360 u``, elevation ``lo + (hi - lo) u``, ...) to get the
upstream's own distribution. All functions take a ``torch.Generator`` (no global RNG state), and the
sampler's state (shift and counter) is saved and restored with a run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from carv._validate import check_positive_int

__all__ = ["UPSTREAM_MODES", "stratified_unit", "kronecker_alpha", "UpstreamSampler", "balanced_labels",
           "sobol_normal"]

UPSTREAM_MODES = ("iid", "strata", "lattice")


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")


def stratified_unit(n: int, dim: int, generator: torch.Generator) -> Tensor:
    """``[n, dim]`` float64 points in ``[0, 1)``: column ``j`` has one point in each stratum
    ``[i / n, (i + 1) / n)`` (jittered uniformly), in a random order per column (a Latin hypercube)."""
    check_positive_int(n, "n")
    check_positive_int(dim, "dim")
    _check_generator(generator)
    dev = generator.device
    jitter = torch.rand(n, dim, generator=generator, device=dev, dtype=torch.float64)
    order = torch.argsort(torch.rand(n, dim, generator=generator, device=dev), dim=0)  # a permutation per column
    return ((order.to(torch.float64) + jitter) / n).cpu()


def kronecker_alpha(dim: int) -> Tensor:
    """The generalised golden-ratio increments of the ``dim``-dimensional Kronecker lattice (R-sequence):
    ``alpha_j = phi_d^-(j+1)`` with ``phi_d`` the positive root of ``x^(d+1) = x + 1`` (``d = 1``: the
    golden ratio, so ``alpha = 0.618...``, the golden angle on the circle)."""
    check_positive_int(dim, "dim")
    x = 2.0
    for _ in range(64):  # fixed-point iteration, converges for every d >= 1
        x = (1.0 + x) ** (1.0 / (dim + 1))
    return torch.tensor([x ** -(j + 1) for j in range(dim)], dtype=torch.float64) % 1.0


class UpstreamSampler:
    """Marginally uniform points for the ``R`` upstream draws of each step, ``draw(R) -> [R, dim]``.

    ``mode``: ``"iid"`` (plain Monte Carlo), ``"strata"`` (:func:`stratified_unit` per step, independent
    across steps) or ``"lattice"`` (a randomly shifted Kronecker lattice across steps, see the module notes;
    the default of the apps). ``generator`` draws the lattice's shift once (at construction), and
    ``draw``'s ``generator`` the per-step randomness of the other modes.
    """

    def __init__(self, dim: int = 1, mode: str = "lattice", generator: torch.Generator | None = None):
        check_positive_int(dim, "dim")
        if mode not in UPSTREAM_MODES:
            raise ValueError(f"mode: expected one of {UPSTREAM_MODES}, got {mode!r}")
        self.dim, self.mode = dim, mode
        self.count = 0  # draws made so far (the lattice index of the next one)
        self.shift: Tensor | None = None
        if mode == "lattice":
            _check_generator(generator)
            self.shift = torch.rand(dim, generator=generator, device=generator.device, dtype=torch.float64).cpu()
        self.alpha = kronecker_alpha(dim)

    def draw(self, R: int, generator: torch.Generator | None = None) -> Tensor:
        """``[R, dim]`` float64 points in ``[0, 1)`` for one step (CPU)."""
        check_positive_int(R, "R")
        if self.mode == "lattice":
            m = torch.arange(self.count, self.count + R, dtype=torch.float64)
            u = (self.shift + m[:, None] * self.alpha) % 1.0
        else:
            _check_generator(generator)
            if self.mode == "strata":
                u = stratified_unit(R, self.dim, generator)
            else:
                u = torch.rand(R, self.dim, generator=generator, device=generator.device,
                               dtype=torch.float64).cpu()
        self.count += R
        return u

    def state_dict(self) -> dict:
        """JSON-serialisable state."""
        return {"mode": self.mode, "dim": self.dim, "count": self.count,
                "shift": None if self.shift is None else self.shift.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if (state["mode"], state["dim"]) != (self.mode, self.dim):
            raise ValueError(f"state: saved for mode={state['mode']!r}, dim={state['dim']}, "
                             f"this sampler has mode={self.mode!r}, dim={self.dim}")
        self.count = int(state["count"])
        self.shift = None if state["shift"] is None else torch.tensor(state["shift"], dtype=torch.float64)


def balanced_labels(u: Tensor, num_classes: int) -> Tensor:
    """Class labels ``floor(C u)`` (int64) from unit points ``u [n]`` (e.g. a column of
    :meth:`UpstreamSampler.draw`): uniform over ``0..C-1`` wherever ``u`` is uniform, and balanced across
    the batch wherever ``u`` is spread (strata: exactly ``n / C`` of each class when ``C`` divides ``n``)."""
    check_positive_int(num_classes, "num_classes")
    u = torch.as_tensor(u, dtype=torch.float64).reshape(-1)
    if u.numel() and not bool(((u >= 0) & (u < 1)).all()):
        raise ValueError(f"u: expected points in [0, 1), got values in [{float(u.min())}, {float(u.max())}]")
    return (u * num_classes).floor().clamp_max(num_classes - 1).to(torch.int64)


def sobol_normal(n: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """``[n, *shape]`` float32 Gaussian latents by randomised QMC: an Owen-scrambled Sobol point set of
    ``prod(shape)`` dimensions (scipy), seeded from ``generator``, mapped through the normal inverse CDF.
    Each row is marginally ``N(0, I)`` (scrambled Sobol points are uniform), so averages over the rows are
    unbiased; ``n`` a power of 2 keeps the Sobol balance properties (others work, less evenly)."""
    import warnings

    from scipy.stats import qmc

    check_positive_int(n, "n")
    _check_generator(generator)
    d = math.prod(shape)
    if d < 1 or d > 21201:
        raise ValueError(f"shape: Sobol points need 1 to 21201 dimensions, got {d} from {tuple(shape)}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    sob = qmc.Sobol(d, scramble=True, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "balance properties" warning for n not a power of 2
        u = sob.random(n)
    u = torch.from_numpy(u).clamp(1e-12, 1 - 1e-12)
    return torch.special.ndtri(u).to(torch.float32).reshape(n, *shape)
