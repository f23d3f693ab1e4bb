"""Gradient features for diffusion data attribution (D-TRAK / journey-TRAK style), through carv's estimator.

The feature of an example ``(x0, c)`` is the randomly projected gradient, with respect to the teacher's
parameters ``theta``, of its weighted diffusion loss averaged over timesteps and noises:

    phi(x0) = P^T  E_{t ~ p, eps ~ N(0, I)} [ grad_theta  w(t) || eps_theta(a_t x0 + s_t eps, t, c) - eps ||^2 / D ]

(``D`` pixels, so the loss is a per-pixel mean). Practitioners estimate the expectation with a handful of
draws per example: D-TRAK's evenly spaced grid, journey-TRAK's few iid timesteps, one fresh noise per
example. Here the draws come from :class:`~carv.HierarchicalEstimator` (each example is one upstream
sample, with ``K`` draws), which owns the timesteps, the importance weights ``p/q`` and the noise
(iid, or common random numbers shared by every example):

    phi_hat(x0) = P^T grad_theta  (1/K) sum_k v(t_k) L(theta; x0, c, t_k, eps_k)

so one backward per example gives the average of the ``K`` per-draw gradients (linearity), and the
projection ``P`` (dense Gaussian, fixed seed, TRAK-style) is applied once per example, amortised over
its draws. Every stochastic estimator is unbiased for ``phi``; the ``"grid"`` sampler is the peers'
(biased) quadrature.

Functional pieces, usable with ``torch.func`` and attribution libraries (e.g. dattri's
``AttributionTask``, whose loss functions take ``(params, data)``):

- :meth:`GradientFeatures.draw_loss` ``(params, x0, label, t, eps) -> scalar``: the loss of one draw;
- :meth:`GradientFeatures.mc_loss` ``(params, batch) -> scalar``: the MC-averaged loss of one example,
  ``batch = (x0 [C,H,W], label [], t [K], eps [K,C,H,W], weight [K])`` as made by
  :meth:`GradientFeatures.draw` (vmap it over examples for a batch);
- :meth:`GradientFeatures.gradients` / :meth:`GradientFeatures.per_draw_gradients`: ``vmap(grad(.))``
  over examples (and draws), chunked to bound memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from carv._rng import as_generator
from carv._validate import check_positive_int
from carv.accounting import CostMeter
from carv.estimator import HierarchicalEstimator, UsesEstimator, reduce_draws
from carv.objectives.weighting import Weighting, weight_table
from carv.teachers.base import NonFiniteTeacherError, Teacher
from carv.timesteps import TimestepSampler

__all__ = ["GradientFeatures", "GaussianProjection", "AttributionBatch", "cosine_scores", "OUTPUTS",
           "dtrak_timesteps", "dtrak_draws", "journey_trak_draws", "JOURNEY_TRAK_NUM_TIMESTEPS"]

# the function whose gradient is the feature: "loss" (the weighted diffusion loss; TRAK / journey-TRAK) or
# "squared_norm" (D-TRAK's default "mean-squared-l2-norm": the per-pixel mean of eps_theta(x_t, t, c)^2,
# no target and no weighting)
OUTPUTS = ("loss", "squared_norm")

AttributionBatch = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # x0, label, t, eps, weight (one or many examples)


class GaussianProjection:
    """TRAK-style random projection ``g -> g @ P`` with ``P`` ``[num_params, dim]`` of iid ``N(0, 1/dim)``.

    ``P`` is generated once from ``seed`` (in row blocks, so the same seed gives the same matrix on any
    machine) and kept in memory (``4 * num_params * dim`` bytes). Linear, so averaging per-draw gradients
    before or after projecting gives the same feature.
    """

    def __init__(self, num_params: int, dim: int = 256, seed: int = 0, block: int = 65536):
        for name, v in (("num_params", num_params), ("dim", dim), ("block", block)):
            check_positive_int(v, name)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.num_params, self.dim, self.seed = num_params, dim, seed
        g = torch.Generator().manual_seed(seed)
        scale = 1.0 / math.sqrt(dim)
        self.matrix = torch.cat([torch.randn(min(block, num_params - s), dim, generator=g).mul_(scale)
                                 for s in range(0, num_params, block)])

    def __call__(self, g: Tensor) -> Tensor:
        if g.shape[-1] != self.num_params:
            raise ValueError(f"g: expected last dimension {self.num_params} (parameters), got {tuple(g.shape)}")
        return g.to(self.matrix.dtype) @ self.matrix


class GradientFeatures(UsesEstimator):
    """Projected, MC-averaged per-example gradients of the weighted diffusion loss.

    Args:
        teacher: a frozen teacher whose ``model`` is an ``nn.Module`` called as ``model(x_t, t, cond)``
            (:class:`~carv.teachers.unet.UNetTeacher`).
        sampler: the :class:`~carv.TimestepSampler` (proposal, importance weights, stratification).
        K: draws (evaluations) per example.
        noise: ``"iid"`` (independent draws per example) or ``"crn"`` (the same ``K`` draws for every
            example); ``"antithetic"`` also works.
        weighting: the loss weighting ``w(t)`` (``"uniform"`` is the DDPM / D-TRAK loss).
        params: ``"all"`` or a list of parameter-name prefixes (e.g. ``["up.7", "conv_out"]``): the
            parameters the gradient is taken with respect to (the others stay fixed).
        proj_dim, proj_seed: the random projection (``proj_dim=None``: no projection, raw gradients).
        max_batch: most example-draws in one ``vmap`` call (examples and draws are chunked to fit).
        projection: reuse an existing :class:`GaussianProjection` (ignores ``proj_dim``/``proj_seed``), so
            that several estimators share one matrix.
        output: the function differentiated per draw: ``"loss"`` (above) or ``"squared_norm"`` (D-TRAK's
            default, ``||eps_theta(a_t x0 + s_t eps, t, c)||^2 / D``; ``weighting`` is then not applied).
    """

    def __init__(self, teacher: Teacher, sampler: TimestepSampler, K: int = 1, noise: str = "iid",
                 weighting: Weighting = "uniform", params: str | Sequence[str] = "all", proj_dim: int | None = 256,
                 proj_seed: int = 0, max_batch: int = 256, projection: GaussianProjection | None = None,
                 output: str = "loss"):
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        self.output = output
        model = getattr(teacher, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"teacher: expected a teacher with an nn.Module `model` (UNetTeacher), "
                            f"got {type(teacher).__name__}")
        if sampler.num_timesteps != teacher.schedule.num_timesteps:
            raise ValueError(f"sampler: has {sampler.num_timesteps} timesteps but the teacher's schedule has "
                             f"{teacher.schedule.num_timesteps}")
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch: expected a positive integer, got {max_batch!r}")
        self.model, self.schedule = model, teacher.schedule
        self.estimator = HierarchicalEstimator(sampler, K, noise)
        self.w = weight_table(weighting, teacher.schedule).float()
        names = [n for n, _ in model.named_parameters()]
        if params == "all":
            chosen = names
        else:
            if isinstance(params, str) or not all(isinstance(p, str) for p in params):
                raise ValueError(f"params: expected 'all' or a list of parameter-name prefixes, got {params!r}")
            chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in params)]
            if not chosen:
                raise ValueError(f"params: no parameter matches the prefixes {list(params)}; "
                                 f"names look like {names[:3]} ... {names[-2:]}")
        full = {n: p.detach() for n, p in model.named_parameters()}
        self.params = {n: full[n] for n in chosen}
        self.frozen = {n: v for n, v in full.items() if n not in self.params}
        self.frozen.update({n: b.detach() for n, b in model.named_buffers()})
        self.num_params = sum(p.numel() for p in self.params.values())
        if projection is not None:
            if not isinstance(projection, GaussianProjection) or projection.num_params != self.num_params:
                raise ValueError(f"projection: expected a GaussianProjection of {self.num_params} parameters, "
                                 f"got {getattr(projection, 'num_params', type(projection).__name__)}")
            self.projection = projection
        else:
            self.projection = None if proj_dim is None else GaussianProjection(self.num_params, proj_dim, proj_seed)
        self.max_batch = max_batch
        self.proj_batch = 64

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self.num_params if self.projection is None else self.projection.dim

    # ------------------------------------------------------------------ the functional losses
    def draw_loss(self, params: dict[str, Tensor], x0: Tensor, label: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``w(t) ||eps_theta(a_t x0 + s_t eps, t, c) - eps||^2 / D`` for one example and one draw (scalar);
        with ``output="squared_norm"``, ``||eps_theta(a_t x0 + s_t eps, t, c)||^2 / D`` (D-TRAK)."""
        x_t = self.schedule.add_noise(x0[None], t[None], eps[None])
        eps_hat = functional_call(self.model, {**self.frozen, **params}, (x_t, t[None], label[None]))[0]
        if self.output == "squared_norm":
            return eps_hat.pow(2).mean()
        w = torch.index_select(self.w.to(eps.device), 0, t.reshape(1))[0]  # plain indexing fails under nested vmap
        return w * (eps_hat - eps).pow(2).mean()

    def mc_loss(self, params: dict[str, Tensor], batch: AttributionBatch) -> Tensor:
        """MC-averaged loss of one example over its ``K`` draws: ``(1/K) sum_k v(t_k) L(t_k, eps_k)`` (scalar).

        ``batch = (x0 [C,H,W], label [], t [K], eps [K,C,H,W], weight [K])``. Works under ``torch.func``
        (``grad``, ``vmap`` over examples); the importance weights are applied by the estimator's reduction.
        """
        x0, label, t, eps, weight = batch
        per_draw = vmap(self.draw_loss, in_dims=(None, None, None, 0, 0))(params, x0, label, t, eps)  # [K]
        return reduce_draws(per_draw[None], weight[None], stats=False).per_upstream[0]

    # ------------------------------------------------------------------ draws
    def draw(self, x0: Tensor, labels: Tensor, generator: torch.Generator | int | None = None) -> AttributionBatch:
        """The estimator's draws for every example: ``(x0, labels, t [N,K], eps [N,K,C,H,W], weight [N,K])``."""
        x0, labels = _check_examples(x0, labels)
        d = self.estimator.draw(x0.shape[0], x0.shape[1:], generator, x0.device, x0.dtype)
        return x0, labels, d.t, d.eps, d.weight

    # ------------------------------------------------------------------ gradients
    def _flat(self, grads: dict[str, Tensor], lead: int) -> Tensor:
        return torch.cat([grads[n].reshape(*grads[n].shape[:lead], -1) for n in self.params], -1)

    def gradients(self, batch: AttributionBatch) -> Tensor:
        """Per-example gradients of :meth:`mc_loss`, flattened: ``[N, num_params]`` (not projected)."""
        return torch.cat(list(self._gradient_chunks(batch, project=False)))

    def _gradient_chunks(self, batch: AttributionBatch, project: bool, times: dict | None = None):
        """Yield per-example averaged gradients in chunks (projected if asked), timing the two stages.

        Examples x draws are chunked so that one ``vmap`` call sees at most ``max_batch`` draws (the mean
        over ``K`` is assembled from chunk means); the projection runs on groups of at least ``proj_batch``
        examples, since each call streams the whole projection matrix through memory.
        """
        x0, labels, t, eps, weight = batch
        N, K = t.shape
        per_call = max(1, min(K, self.max_batch))  # draws per vmap call
        ex = max(1, self.max_batch // per_call)    # examples per vmap call
        f = vmap(grad(self.mc_loss), in_dims=(None, 0))
        pending: list[Tensor] = []
        for s in range(0, N, ex):
            sl = slice(s, s + ex)
            t0 = time.perf_counter()
            acc = None
            for c in range(0, K, per_call):
                cl = slice(c, c + per_call)
                kc = t[sl, cl].shape[1]
                g = self._flat(f(self.params, (x0[sl], labels[sl], t[sl, cl], eps[sl, cl], weight[sl, cl])), 1)
                g = g if kc == K else g * (kc / K)  # the mean over K draws from means over chunks
                acc = g if acc is None else acc + g
            _check_finite(acc, t[sl], s)
            if times is not None:
                times["draw"] += time.perf_counter() - t0
            pending.append(acc)
            if not project or self.projection is None:
                yield pending.pop()
            elif sum(p.shape[0] for p in pending) >= self.proj_batch or s + ex >= N:
                t1 = time.perf_counter()
                out = self.projection(torch.cat(pending))
                pending.clear()
                if times is not None:
                    times["upstream"] += time.perf_counter() - t1
                yield out

    def per_draw_gradients(self, batch: AttributionBatch) -> Tensor:
        """Unweighted per-draw gradients of :meth:`draw_loss`: ``[N, K, num_params]`` (memory-heavy; for pilots
        and tests). ``vmap`` over examples and over draws."""
        x0, labels, t, eps, _ = batch
        f = vmap(vmap(grad(self.draw_loss), in_dims=(None, None, None, 0, 0)), in_dims=(None, 0, 0, 0, 0))
        K = t.shape[1]
        ex = max(1, self.max_batch // K)
        out = [self._flat(f(self.params, x0[s:s + ex], labels[s:s + ex], t[s:s + ex], eps[s:s + ex]), 2)
               for s in range(0, t.shape[0], ex)]
        return torch.cat(out)

    def per_draw_sq_norms(self, batch: AttributionBatch) -> Tensor:
        """``||grad_theta L(t_k, eps_k)||^2`` per draw (``[N, K]``, unweighted): what a learned proposal eats."""
        x0, labels, t, eps, w = batch
        K = t.shape[1]
        per = max(1, min(K, self.max_batch))
        out = []
        for s in range(0, t.shape[0]):
            row = []
            for c in range(0, K, per):
                sl = (slice(s, s + 1), slice(c, c + per))
                g = self.per_draw_gradients((x0[s:s + 1], labels[s:s + 1], t[sl], eps[sl], w[sl]))
                row.append(g.pow(2).sum(-1))
            out.append(torch.cat(row, 1))
        return torch.cat(out)

    # ------------------------------------------------------------------ features
    def project(self, g: Tensor) -> Tensor:
        return g if self.projection is None else self.projection(g)

    def __call__(self, x0: Tensor, labels: Tensor, generator: torch.Generator | int | None = None,
                 meter: CostMeter | None = None) -> Tensor:
        """Features ``[N, dim]``: draw, differentiate the MC-averaged loss per example, project once.

        With ``meter``, the per-draw teacher forward/backward is timed as stage ``"draw"`` (per draw) and
        the once-per-example projection as ``"upstream"`` (per example).
        """
        return self.features_of(self.draw(x0, labels, generator), meter)

    def features_of(self, batch: AttributionBatch, meter: CostMeter | None = None) -> Tensor:
        """Features ``[N, dim]`` of a batch made by :meth:`draw` (slice it to process examples in parts:
        with ``noise="crn"`` the parts keep sharing the same draws)."""
        times = {"draw": 0.0, "upstream": 0.0}
        feats = torch.cat(list(self._gradient_chunks(batch, project=True, times=times)))
        if meter is not None:
            N, K = batch[2].shape
            meter.add("draw", times["draw"], count=N * K)
            meter.add("upstream", times["upstream"], count=N)
        return feats


def dtrak_timesteps(K: int, num_timesteps: int = 1000) -> Tensor:
    """D-TRAK's timesteps for ``K`` (its ``t_strategy="uniform"``): ``range(0, T, T // K)``, so ``t = 0`` at
    ``K = 1``, and ``len(range(...))`` may exceed ``K`` when ``T % K != 0`` (e.g. 17 timesteps at ``K = 16``;
    D-TRAK sums them all and divides by ``K``)."""
    check_positive_int(K, "K")
    if K > num_timesteps:
        raise ValueError(f"K: at most num_timesteps={num_timesteps}, got {K}")
    return torch.arange(0, num_timesteps, num_timesteps // K)


def dtrak_draws(x0: Tensor, labels: Tensor, K: int, num_timesteps: int = 1000, e_seed: int = 0,
                batch_size: int = 16) -> AttributionBatch:
    """The draws of a D-TRAK user (sail-sg/D-TRAK ``grad_unconditional.py``), as an :data:`AttributionBatch`.

    Timesteps :func:`dtrak_timesteps`; for each timestep ``t`` the noise is drawn from a generator seeded
    ``e_seed * 1000 + t``, one ``[batch_size, C, H, W]`` draw per data-loader batch (unshuffled), so the
    example at position ``j`` of any batch gets row ``j`` for that ``t``: common random numbers across
    batches, fixed by the seed (rerunning gives the same features; ``e_seed`` is the only source of
    randomness). Weights are ``len(timesteps) / K`` (D-TRAK's sum over the timesteps divided by ``K``).
    """
    x0, labels = _check_examples(x0, labels)
    check_positive_int(batch_size, "batch_size")
    ts = dtrak_timesteps(K, num_timesteps)
    N = x0.shape[0]
    pos = torch.arange(N) % batch_size
    eps = torch.empty(N, len(ts), *x0.shape[1:], dtype=x0.dtype)
    for k, t in enumerate(ts.tolist()):
        g = torch.Generator().manual_seed(e_seed * 1000 + t)
        rows = torch.randn(batch_size, *x0.shape[1:], generator=g, dtype=x0.dtype)
        eps[:, k] = rows[pos]
    t = ts.to(torch.long).expand(N, -1).clone()
    weight = torch.full((N, len(ts)), len(ts) / K, dtype=x0.dtype)
    return x0, labels, t, eps.to(x0.device), weight


# journey-TRAK's featurizing default (MadryLab/journey-TRAK examples/featurize_cifar10.py and featurize_mscoco.py,
# TrakConfig.num_timesteps; 20 in featurize_cifar10_parallel.py)
JOURNEY_TRAK_NUM_TIMESTEPS = 5


def journey_trak_draws(x0: Tensor, labels: Tensor, K: int, num_timesteps: int = 1000,
                       generator: torch.Generator | int | None = None, start_tstep: int = 0,
                       end_tstep: int | None = None) -> AttributionBatch:
    """The draws of a journey-TRAK user when featurizing (Georgiev et al. 2023, "The Journey, Not the
    Destination"; MadryLab/journey-TRAK), as an :data:`AttributionBatch`.

    What its code does: ``examples/featurize_cifar10.py`` (and ``featurize_mscoco.py``) draws, per data-loader
    batch, ``np.random.choice(np.arange(start_tstep, end_tstep), size=[batch, num_timesteps], replace=True)``:
    ``K = num_timesteps`` timesteps iid uniform on ``start_tstep..end_tstep - 1`` (default ``0..999``), fresh for
    every example (nothing shared across examples or batches). ``diffusion_trak/gradient_computers.py``
    (``_compute_per_sample_grad_featurizing``) loops over the ``K`` timestep columns and ``vmap``s the gradient
    over the batch with ``randomness="different"``; ``diffusion_trak/modelout_functions.py``
    (``_get_output_featurizing``) draws one fresh ``torch.randn`` noise per example and timestep and returns
    ``F.mse_loss(noise_pred, noise)``: the unweighted per-pixel DDPM loss (``GradientFeatures`` with
    ``weighting="uniform"``, ``output="loss"``). The per-timestep gradients are summed (``_accumulate_vectorize``);
    here the weights are 1, i.e. their mean, which is the sum divided by ``K``: a constant factor that cosine
    scores ignore, kept off so that the features are on the scale of the other estimators'. Not reproduced: its
    CIFAR-10 loader (``examples/utils.py``, ``get_cifar_loader``) also flips each image at random
    (``transforms.RandomHorizontalFlip``) while featurizing; a flipped digit is another image.

    ``generator`` (a ``torch.Generator`` on the CPU, a seed, or None) stands in for numpy's and torch's global
    generators (carv touches no global RNG): the timesteps ``torch.randint(start_tstep, end_tstep, (N, K))``
    are drawn from it first, then the noise ``torch.randn(N, K, C, H, W)``.
    """
    x0, labels = _check_examples(x0, labels)
    check_positive_int(K, "K")
    check_positive_int(num_timesteps, "num_timesteps")
    end = num_timesteps if end_tstep is None else end_tstep
    if not (isinstance(start_tstep, int) and isinstance(end, int) and 0 <= start_tstep < end <= num_timesteps):
        raise ValueError(f"start_tstep, end_tstep: expected 0 <= start_tstep < end_tstep <= {num_timesteps}, "
                         f"got {start_tstep}, {end_tstep}")
    g = as_generator(generator)
    N = x0.shape[0]
    t = torch.randint(start_tstep, end, (N, K), generator=g)
    eps = torch.randn(N, K, *x0.shape[1:], generator=g, dtype=x0.dtype)
    weight = torch.ones(N, K, dtype=x0.dtype)
    return x0, labels, t.to(x0.device), eps.to(x0.device), weight.to(x0.device)


def cosine_scores(query: Tensor, train: Tensor) -> Tensor:
    """Attribution scores ``[Q, N]``: cosine similarity of each query feature with each training feature."""
    if query.ndim != 2 or train.ndim != 2 or query.shape[1] != train.shape[1]:
        raise ValueError(f"query, train: expected [Q, d] and [N, d] features, got {tuple(query.shape)} and "
                         f"{tuple(train.shape)}")
    q = torch.nn.functional.normalize(query.double(), dim=1)
    n = torch.nn.functional.normalize(train.double(), dim=1)
    return q @ n.T


def _check_finite(g: Tensor, t: Tensor, first: int) -> None:
    """NaN/inf cannot be located inside ``vmap``; check each example's averaged gradient and name its draws."""
    bad = ~torch.isfinite(g).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        ts = sorted({int(v) for v in t[rows].flatten().tolist()})
        raise NonFiniteTeacherError(f"gradient feature is NaN or inf for examples {[first + r for r in rows][:10]}, "
                                    f"whose draws used timesteps {ts[:20]}")


def _check_examples(x0, labels) -> tuple[Tensor, Tensor]:
    if not isinstance(x0, Tensor) or x0.ndim < 2:
        got = getattr(x0, "shape", type(x0).__name__)
        raise ValueError(f"x0: expected a tensor of examples [N, C, H, W], got {got}")
    if not isinstance(labels, Tensor) or labels.shape[:1] != x0.shape[:1] or labels.dtype.is_floating_point:
        raise ValueError(f"labels: expected integer labels with one row per example ({x0.shape[0]}), "
                         f"got {getattr(labels, 'shape', type(labels).__name__)}")
    return x0, labels
