"""Compute-aware accounting: variance components, the optimal K, the efficiency bound, ECM, cost meters.

Notation (DESIGN.md section 2). One estimate uses ``R`` upstream samples and ``K`` draws each and costs
``C(R, K) = R (c_up + K c_draw)``. Its variance is ``sigma_b^2 / R + sigma_w^2 / (R K)`` with the
between-sample component ``sigma_b^2`` and the within-sample component ``sigma_w^2``. Work-normalised
variance ``Var * C = (sigma_b^2 + sigma_w^2 / K)(c_up + K c_draw)`` does not depend on ``R`` and is
minimised at ``K* = sqrt((c_up / c_draw)(sigma_w^2 / sigma_b^2))``; the best achievable value is the
efficiency bound ``(sigma_b sqrt(c_up) + sigma_w sqrt(c_draw))^2``.

Variances are traces of covariance matrices (sums over every trailing dimension).

One module per concept, all re-exported here:

- :mod:`~carv.accounting.components`: variance components of an ``[R, K, ...]`` batch;
- :mod:`~carv.accounting.algebra`: predicted and work-normalised variance, :func:`optimal_k`, :func:`allocate`,
  the efficiency bound, ECM, relative efficiency, fraction of bound;
- :mod:`~carv.accounting.meter`: stage timing (:class:`CostMeter`, :func:`timed_estimate`);
- :mod:`~carv.accounting.allocator`: the online choice of ``(R, K)`` (:class:`Allocator`, :class:`AutoK`);
- :mod:`~carv.accounting.probe`: parameter-space components (:class:`ComponentProbe`);
- :mod:`~carv.accounting.report`: what a run reports (:func:`accounting_summary`: the bound and carv's share of it);
- :mod:`~carv.accounting.accountant`: the per-step accounting loop around a user's own code (:class:`Accountant`).
"""

from carv.accounting.accountant import Accountant, AccountantStep
from carv.accounting.algebra import (
    allocate,
    ecm,
    efficiency_bound,
    fraction_of_bound,
    largest_r_within,
    optimal_k,
    predicted_variance,
    relative_efficiency,
    within_at,
    work_normalised_variance,
)
from carv.accounting.allocator import Allocator, AutoK, choose_next, nonnegative_mean, plan_step, winsorised_mean
from carv.accounting.components import (
    ProbedComponents,
    VarianceComponents,
    between_component,
    variance_components,
    within_row_variance,
)
from carv.accounting.meter import CostMeter, Stopwatch, timed_estimate
from carv.accounting.probe import ComponentProbe
from carv.accounting.report import (
    ACCOUNTING_KEYS,
    accounting_sentence,
    accounting_summary,
    bound_ecm,
    calibration_sentence,
)

__all__ = [
    "ACCOUNTING_KEYS",
    "accounting_summary",
    "accounting_sentence",
    "calibration_sentence",
    "bound_ecm",
    "ProbedComponents",
    "VarianceComponents",
    "variance_components",
    "predicted_variance",
    "within_at",
    "work_normalised_variance",
    "optimal_k",
    "allocate",
    "largest_r_within",
    "efficiency_bound",
    "ecm",
    "relative_efficiency",
    "fraction_of_bound",
    "CostMeter",
    "Stopwatch",
    "Allocator",
    "AutoK",
    "winsorised_mean",
    "nonnegative_mean",
    "plan_step",
    "choose_next",
    "ComponentProbe",
    "within_row_variance",
    "between_component",
    "timed_estimate",
    "Accountant",
    "AccountantStep",
]
