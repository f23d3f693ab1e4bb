"""A diffusion attribution task for dattri (TRAIS-Lab/dattri), whose ``(t, eps)`` draws are data.

dattri's :class:`dattri.task.AttributionTask` differentiates ``loss_func(params, data)`` per example under
``vmap(grad(.), randomness="different")``: a loss that drew its own timesteps and noise would get independent
draws per example, so neither common random numbers (every example sharing the same draws) nor stratified
timesteps would survive. Here the draws are part of each example's data, made beforehand by carv's estimator
(:meth:`~carv.objectives.attribution.GradientFeatures.draw`, or the peers' :func:`~carv.objectives.attribution.
dtrak_draws` / :func:`~carv.objectives.attribution.journey_trak_draws`): one example is
``(x0 [C,H,W], label [], t [K], eps [K,C,H,W], weight [K])`` and its loss is
:meth:`~carv.objectives.attribution.GradientFeatures.mc_loss`, the importance-weighted mean over its ``K`` draws
of the weighted diffusion loss. Nothing is random inside the loss, so vmap's randomness setting is moot.

    feats = GradientFeatures(teacher, TimestepSampler(1000, stratify="per_upstream"), K=8, noise="crn",
                             proj_dim=None)
    task = diffusion_task(feats)
    train = draws_loader(feats, x_train, y_train, generator=0)
    test = draws_loader(feats, x_query, y_query, generator=0)   # crn: the same draws as the training examples
    scores = TRAKAttributor(task=task, correct_probability_func=unit_probability, device="cpu") ...

dattri is an optional dependency (``pip install carv[attribution]``); checkpoints are passed as state dicts,
so dattri never unpickles a file.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from carv.objectives.attribution import AttributionBatch, GradientFeatures

__all__ = ["diffusion_task", "draws_dataset", "draws_loader", "unit_probability"]


def _dattri_task_class():
    try:
        from dattri.task import AttributionTask
    except ImportError as e:  # an optional dependency
        raise ImportError("diffusion_task needs dattri: pip install 'carv[attribution]' (dattri>=0.3)") from e
    return AttributionTask


def diffusion_task(features: GradientFeatures, checkpoints: list[dict[str, Tensor]] | None = None):
    """A :class:`dattri.task.AttributionTask` whose loss (and target) is ``features.mc_loss(params, example)``.

    ``features`` fixes the teacher's network, the loss weighting and the output function; its ``params`` must be
    ``"all"`` (dattri takes the gradient with respect to every parameter). ``checkpoints``: state dicts of the
    network (default: the teacher's current weights), e.g. several for an ensemble.
    """
    if not isinstance(features, GradientFeatures):
        raise TypeError(f"features: expected a GradientFeatures, got {type(features).__name__}")
    n_all = sum(1 for _ in features.model.parameters())
    if len(features.params) != n_all:
        raise ValueError(f"features: dattri differentiates every parameter; build the GradientFeatures with "
                         f"params='all' (it has {len(features.params)} of {n_all} parameter tensors)")
    if checkpoints is None:
        checkpoints = [{k: v.detach().clone() for k, v in features.model.state_dict().items()}]
    if not isinstance(checkpoints, list) or not checkpoints or not all(isinstance(c, dict) for c in checkpoints):
        raise TypeError(f"checkpoints: expected a non-empty list of state dicts, got {type(checkpoints).__name__}")
    AttributionTask = _dattri_task_class()

    def loss_func(params: dict[str, Tensor], data: AttributionBatch) -> Tensor:
        return features.mc_loss(params, tuple(data))

    # dattri takes the parameters that require grad; the teacher's are frozen, so it gets a trainable copy (the loss
    # receives the parameters explicitly and only uses the copy's structure)
    model = copy.deepcopy(features.model).requires_grad_(True)
    return AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints)


def draws_dataset(features: GradientFeatures, x0: Tensor, labels: Tensor,
                  generator: torch.Generator | int | None = None, batch: AttributionBatch | None = None
                  ) -> TensorDataset:
    """The examples with their draws as a dataset of ``(x0, label, t, eps, weight)`` rows.

    The draws are ``features.draw(x0, labels, generator)``, or ``batch`` (any :data:`AttributionBatch`, e.g.
    from :func:`~carv.objectives.attribution.dtrak_draws`) when given."""
    x0_, labels_, t, eps, weight = batch if batch is not None else features.draw(x0, labels, generator)
    if t.shape[0] != x0_.shape[0] or eps.shape[:2] != t.shape or weight.shape != t.shape:
        raise ValueError(f"batch: expected t [N, K], eps [N, K, ...] and weight [N, K] for {x0_.shape[0]} examples, "
                         f"got {tuple(t.shape)}, {tuple(eps.shape)}, {tuple(weight.shape)}")
    return TensorDataset(x0_, labels_, t, eps, weight)


def draws_loader(features: GradientFeatures, x0: Tensor, labels: Tensor,
                 generator: torch.Generator | int | None = None, batch_size: int = 16,
                 batch: AttributionBatch | None = None) -> DataLoader:
    """:func:`draws_dataset` in an unshuffled :class:`~torch.utils.data.DataLoader` (dattri requires the order)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return DataLoader(draws_dataset(features, x0, labels, generator, batch), batch_size=batch_size, shuffle=False)


def unit_probability(params, data) -> Tensor:
    """``correct_probability_func`` for dattri's ``TRAKAttributor`` on a diffusion loss: probability 0, so TRAK's
    reweighting ``Q = 1 - p`` is 1 for every example (D-TRAK's choice: a regression-type output has no
    correct-class probability)."""
    return torch.zeros((), dtype=data[3].dtype, device=data[3].device)
