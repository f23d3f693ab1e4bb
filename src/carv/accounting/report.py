"""What a user reads about a run's compute: the bound the pipeline allows and what carv's setting gets.

:func:`accounting_summary` is the one pure function behind ``summary.json["accounting"]`` of every run (the apps,
the :class:`~carv.accounting.Accountant` API, the threestudio guidance's logged scalars), and
:func:`accounting_sentence` says it in words for the CLI's last lines.

With between share ``s = sigma_b^2 / (sigma_b^2 + sigma_w^2)`` and cost ratio ``rho = c_up / c_draw`` the efficiency
bound against the plain estimator (``R = 2, K = 1``) is (DESIGN.md section 2, "What the bound says")

    bound_ecm = (1 + rho) / (sqrt(s rho) + sqrt(1 - s))^2
              = (sigma_b^2 + sigma_w^2)(c_up + c_draw) / (sigma_b sqrt(c_up) + sigma_w sqrt(c_draw))^2,

and the chosen configuration ``(R, K)`` is predicted to reach ``predicted_ecm = (sigma_b^2 + sigma_w^2)(c_up +
c_draw) / ((sigma_b^2 + sigma_w^2 / K)(c_up + K c_draw))`` (``Var * C`` does not depend on ``R``), divided by
``1 + overhead`` when the run pays a further fraction ``overhead`` of its step cost (probes, proposal updates).
With a mix (:meth:`~carv.accounting.Allocator.mix_for`: a share ``a`` of the steps at ``(R', K')``) the
prediction is the mean variance of a step times the mean cost of a step. Where per-row strata of ``t`` remove a
share ``strata`` of the within part at ``K >= 2`` (:func:`~carv.accounting.within_at`), the bound is the smaller
of the iid curve's minimum over real ``K`` in ``[1, 2]`` and the stratified curve's over ``K >= 2``
(:func:`~carv.accounting.efficiency_bound`), and the prediction prices its ``K >= 2`` rows alike (key ``strata``:
the share the pair in use was priced at, 0 for the iid model's choice and for iid draws).
Both use the run's own components (under its proposal) and its measured stage costs; with an
:class:`~carv.accounting.Allocator` ``between`` is its estimate, the posterior mean given ``sigma_b^2 >= 0``
(:func:`~carv.accounting.nonnegative_mean`), and the costs are the meter's current medians (the calibration the
choices read is :func:`calibration_sentence`'s).
"""

from __future__ import annotations

import math

from carv._validate import check_share
from carv.accounting.algebra import efficiency_bound, mixed_step, optimal_k, work_normalised_variance

__all__ = ["ACCOUNTING_KEYS", "accounting_summary", "accounting_sentence", "bound_ecm", "calibration_sentence"]

ACCOUNTING_KEYS = ("cost_upstream_s", "cost_draw_s", "cost_ratio", "between", "within", "k_star", "bound_ecm",
                   "predicted_ecm", "bound_fraction", "R", "K", "mix", "strata", "proposal")


def bound_ecm(between: float, within: float, cost_upstream: float, cost_draw: float, strata: float = 0.0) -> float:
    """The efficiency bound as an ECM against the plain estimator (``R = 2, K = 1``): ``Var_plain C_plain / bound``
    (``strata``: the share of the within part per-row strata remove, :func:`~carv.accounting.algebra.within_at`)."""
    plain = work_normalised_variance(between, within, cost_upstream, cost_draw, 1)
    return plain / efficiency_bound(between, within, cost_upstream, cost_draw, strata)


def _number(name: str, v) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number or None, got {v!r}")
    return float(v)


def accounting_summary(between: float | None, within: float | None, cost_upstream_s: float | None,
                       cost_draw_s: float | None, R: int, K: int, proposal: str | None = None,
                       overhead: float = 0.0, k_max: int | None = None, mix=None, strata: float = 0.0) -> dict:
    """``summary.json["accounting"]``: the keys of :data:`ACCOUNTING_KEYS` (see the module doc).

    ``between`` (clipped at 0 here) and ``within`` are the run's variance components, ``cost_*_s`` its stage costs
    (seconds per upstream sample and per draw), ``(R, K)`` the configuration it runs and ``proposal`` the timestep
    proposal it ended with. Quantities that need a missing input (a run that measured no components) are None.
    ``k_max`` caps ``k_star`` (the allocator's own range). ``mix``: the allocator's ``(R', K', share)`` (the
    share of steps run at ``(R', K')`` instead, :meth:`~carv.accounting.Allocator.mix_for`) or None; reported
    as ``{"R", "K", "share"}``. ``strata``: the share of the within part that two per-row strata of ``t`` remove,
    as the pair in use was priced at (:attr:`~carv.accounting.Allocator.priced_strata`: 0 for the iid model's
    choice and for iid draws); the bound, ``k_star`` and the prediction then price ``K >= 2`` draws at
    ``sigma_w^2 (1 - strata)`` each (:func:`~carv.accounting.within_at`)."""
    check_share("strata", strata)
    for name, v in (("R", R), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if mix is not None:
        if not (isinstance(mix, (tuple, list)) and len(mix) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in mix[:2])
                and isinstance(mix[2], (int, float)) and 0.0 <= mix[2] <= 1.0):
            raise ValueError(f"mix: expected None or (R, K, share) with positive integers and a share in [0, 1], "
                             f"got {mix!r}")
        mix = {"R": int(mix[0]), "K": int(mix[1]), "share": float(mix[2])}
    b, w = _number("between", between), _number("within", within)
    c_up, c_d = _number("cost_upstream_s", cost_upstream_s), _number("cost_draw_s", cost_draw_s)
    ov = _number("overhead", overhead)
    if ov is None or ov < 0:
        raise ValueError(f"overhead: expected a non-negative fraction of the step cost, got {overhead!r}")
    for name, v in (("within", w), ("cost_upstream_s", c_up), ("cost_draw_s", c_d)):
        if v is not None and v < 0:
            raise ValueError(f"{name}: expected a non-negative number, got {v!r}")
    out = dict.fromkeys(ACCOUNTING_KEYS)
    out.update(cost_upstream_s=c_up, cost_draw_s=c_d, R=R, K=K, mix=mix, proposal=proposal, between=b, within=w)
    if c_up is not None and c_d:
        out["cost_ratio"] = c_up / c_d
    if b is None or w is None or c_up is None or not c_d:
        return out
    b = max(b, 0.0)
    out["between"] = b
    if b + w <= 0:
        return out
    out["strata"] = strata
    out["k_star"] = optimal_k(b, w, c_up, c_d, k_max=k_max, strata=strata) if (b > 0 or k_max is not None) else None
    out["bound_ecm"] = bound_ecm(b, w, c_up, c_d, strata)
    plain = work_normalised_variance(b, w, c_up, c_d, 1)
    var, cost = mixed_step(b, w, c_up, c_d, R, K, None if mix is None else (mix["R"], mix["K"], mix["share"]),
                           strata)
    out["predicted_ecm"] = plain / (var * cost * (1.0 + ov))
    out["bound_fraction"] = out["predicted_ecm"] / out["bound_ecm"]
    return out


def accounting_sentence(acc: dict) -> str:
    """The CLI's last line about compute, e.g. "this pipeline allows at most 1.8x over the plain estimator; carv's
    setting gets 1.7x (0.94 of the bound)"."""
    if acc.get("bound_ecm") is None:
        return ("the efficiency bound is unknown for this run: it measured no variance components "
                "(runs with the accountant measure them)")
    ratio = acc.get("cost_ratio")
    k_star = "unbounded" if acc.get("k_star") is None else acc["k_star"]
    where = f" (upstream : draw cost ratio {ratio:.1f}, K* = {k_star})" if ratio is not None else ""
    return (f"this pipeline allows at most {acc['bound_ecm']:.2f}x over the plain estimator{where}; "
            f"carv's setting (R = {acc['R']}, K = {acc['K']}{_mix_words(acc.get('mix'), acc['R'])}, proposal "
            f"{acc.get('proposal') or 'uniform'}) gets "
            f"{acc['predicted_ecm']:.2f}x ({acc['bound_fraction']:.2f} of the bound)")


def _mix_words(mix: dict | None, R: int) -> str:
    """"; K = 3 on 40% of the steps" for a mix at the pair's ``R``, else nothing."""
    if not mix:
        return ""
    what = f"K = {mix['K']}" if mix["R"] == R else f"R = {mix['R']}, K = {mix['K']}"
    return f"; {what} on {100 * mix['share']:.0f}% of the steps"


def calibration_sentence(calibration: dict | None) -> str | None:
    """The CLI's line about the cost ratios an allocator chose from (``Allocator.calibration``), with the flags
    that repeat those choices on another machine; None before any calibration."""
    if not calibration:
        return None
    up, probe = calibration["cost_ratio"], calibration["probe_ratio"]
    pinned = set(calibration.get("pinned", ()))
    how = ("pinned" if pinned == {"cost_ratio", "probe_ratio"} else
           f"measured {calibration['cost_upstream_s'] / calibration['cost_draw_s']:.3g} and "
           f"{calibration['cost_probe_s'] / calibration['cost_draw_s']:.3g}, quantised"
           + (f"; {', '.join(sorted(pinned))} pinned" if pinned else "")
           + f"; --cost-ratio {up:.6g} --probe-ratio {probe:.6g} makes the same choices on another machine")
    return f"the accountant chose from costs in draws: render {up:.3g}, variance probe {probe:.3g} ({how})"
