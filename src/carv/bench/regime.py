"""The regime sweep: carv's a-priori default against the plain estimator and the efficiency bound as the render :
draw cost ratio varies (DESIGN.md section 2, "What the bound says").

The variance of an estimator does not depend on what its stages cost, so each row's variance is measured once on
the real job (replicates against a high-sample reference, :func:`carv.bench.harness.measure`) and the cost of one
estimate is ``R (c_up + K c_draw)`` with the measured draw cost ``c_draw`` and a simulated upstream cost
``c_up = cost_ratio * c_draw`` (the measured upstream cost plus a simulated extra one, or less for ratios below the
native one). At each ratio the headline is what the app would choose given those costs (its own allocator), and
the bound is the efficiency bound of the headline estimator's fitted variance curve at those costs, as an ECM
against the measured plain estimator (``R = 2, K = 1``, uniform timesteps).

The variance curve (:func:`fit_variance_curve`): ``R Var = b + w_e / K + w_t / K^3``. The first two terms are
DESIGN.md's two components; the third is what per-upstream stratification of ``t`` leaves of the timestep-driven
part of the within variance (``K`` strata of width ``1/K``: a smooth mean's spread inside a stratum falls as
``1/K^2`` per draw, ``1/K^3`` per row mean). With iid draws the fit returns ``w_t = 0`` and the curve is the
two-component model; with strata the two-component fit misreads the curve (on distillation it reads ``w = 0`` from
rows at ``K >= 12``, whose within part the strata have already removed, and its bound then assumes a step of one
render and no draws). The bound is the curve's smallest ``Var * C`` over real ``K >= 1``
(:func:`curve_bound`), so the sweep measures the headline estimator at a grid of ``K`` too.

:func:`regime_row` is the arithmetic of one row, :func:`plot_regime_sweep` the figure and
:func:`write_regime_sweep` the merge into a benchmark's JSON (existing keys kept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from carv._runfolder import save_figure, update_json

__all__ = ["REGIME_KEYS", "fit_variance_curve", "curve_bound", "k_per_step", "mean_k", "mix_row", "regime_row",
           "plot_regime_sweep", "write_regime_sweep"]

REGIME_KEYS = ("cost_ratio", "headline_ecm", "headline_se", "bound_ecm", "bound_fraction", "K")


def fit_variance_curve(rows: Sequence[dict]) -> tuple[float, float, float]:
    """``(b, w_e, w_t)`` of ``R Var = b + w_e / K + w_t / K^3`` from measured rows (``R``, ``K``, ``variance``):
    non-negative least squares (:func:`scipy.optimize.nnls`) with each row weighted by ``1 / variance``, so every
    row counts relatively. Needs rows at 3 distinct ``K`` or more."""
    import numpy as np
    from scipy.optimize import nnls

    if len({int(r["K"]) for r in rows}) < 3:
        raise ValueError(f"rows: the variance curve needs rows at 3 distinct K or more, got K = "
                         f"{sorted({int(r['K']) for r in rows})}")
    A = np.array([[1.0, 1.0 / r["K"], 1.0 / r["K"] ** 3] for r in rows])
    y = np.array([r["R"] * r["variance"] for r in rows])
    if not (np.isfinite(y).all() and (y > 0).all()):
        raise ValueError("rows: every variance must be a positive number")
    sol, _ = nnls(A / y[:, None], np.ones(len(rows)))
    return float(sol[0]), float(sol[1]), float(sol[2])


def curve_bound(curve: Sequence[float], cost_upstream: float, cost_draw: float, k_max: float = 1e6) -> float:
    """The smallest ``Var * C = (b + w_e / K + w_t / K^3)(c_up + K c_draw)`` over real ``K`` in ``[1, k_max]``
    (bounded scalar minimisation; the function is unimodal in ``K``). With ``w_t = 0`` and ``K* >= 1`` this is
    :func:`carv.accounting.efficiency_bound`."""
    from scipy.optimize import minimize_scalar

    b, we, wt = (float(v) for v in curve)

    def wnv(k: float) -> float:
        return (b + we / k + wt / k ** 3) * (cost_upstream + k * cost_draw)

    res = minimize_scalar(lambda u: wnv(math.exp(u)), bounds=(0.0, math.log(k_max)), method="bounded",
                          options={"xatol": 1e-9})
    return min(float(res.fun), wnv(1.0))


def k_per_step(row: dict) -> int | float:
    """A seed's mean ``K`` per step: the allocator's ``K``, or ``K + share`` where it mixes in ``K + 1`` on a share
    of its steps (``row["mix"] = [R, K + 1, share]``)."""
    mix = row.get("mix")
    return row["K"] + mix[2] if mix else row["K"]


def mean_k(row: dict) -> str:
    """:func:`k_per_step` as text: the integer ``K``, or ``K + share`` to one decimal."""
    k = k_per_step(row)
    return str(k) if isinstance(k, int) else f"{k:.1f}"


def mix_row(lo: dict, hi: dict | None, share: float) -> dict:
    """The measured row of an allocator's plan with a mix (:meth:`carv.accounting.Allocator.mix_for`): the share
    ``share`` of steps at ``hi`` (``R``, ``K + 1``), the rest at ``lo`` (``R``, ``K``). A run's gradient noise is the
    mean of its steps' variances and its cost the mean of their costs, so the row has the mean variance, its SE
    (the two rows independent) and the fractional ``K + share``, whose cost ``R (c_up + (K + share) c_draw)`` in
    :func:`regime_row` is the mean step's. ``hi=None`` or ``share=0``: ``lo``."""
    if hi is None or share == 0:
        return lo
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share: expected a fraction in [0, 1], got {share!r}")
    if (hi["R"], hi["K"]) != (lo["R"], lo["K"] + 1):
        raise ValueError(f"hi: a mix runs (R, K + 1) = ({lo['R']}, {lo['K'] + 1}), got ({hi['R']}, {hi['K']})")
    return lo | {"K": lo["K"] + share, "variance": (1 - share) * lo["variance"] + share * hi["variance"],
                 "variance_se": math.hypot((1 - share) * lo["variance_se"], share * hi["variance_se"])}


def regime_row(cost_ratio: float, cost_draw_s: float, base: dict, head: dict, components: tuple[float, float],
               overhead: float = 0.0) -> dict:
    """One row of the sweep at ``cost_ratio``.

    ``base`` and ``head`` are measured rows (``R``, ``K``, ``variance``, ``variance_se``) of the plain estimator
    and of the headline (the app's choice at this ratio); ``components`` the headline estimator's variance curve
    (:func:`fit_variance_curve`, or the two components ``(sigma_b^2, sigma_w^2)``); ``overhead`` the fraction of
    its step cost the headline pays on top (probes, proposal refreshes). The SE of the ECM treats the two
    variances as independent (delta method).
    """
    if not (isinstance(cost_ratio, (int, float)) and math.isfinite(cost_ratio) and cost_ratio > 0):
        raise ValueError(f"cost_ratio: expected a positive number, got {cost_ratio!r}")
    if not (isinstance(cost_draw_s, (int, float)) and math.isfinite(cost_draw_s) and cost_draw_s > 0):
        raise ValueError(f"cost_draw_s: expected a positive number of seconds, got {cost_draw_s!r}")
    c_d = float(cost_draw_s)
    c_up = cost_ratio * c_d
    cost_base = base["R"] * (c_up + base["K"] * c_d)
    cost_head = head["R"] * (c_up + head["K"] * c_d) * (1.0 + overhead)
    wnv_base, wnv_head = base["variance"] * cost_base, head["variance"] * cost_head
    ecm = wnv_base / wnv_head
    rel = math.hypot(base["variance_se"] / base["variance"], head["variance_se"] / head["variance"])
    curve = tuple(components) + (0.0,) * (3 - len(components))
    bound = wnv_base / curve_bound(curve, c_up, c_d)
    return {"cost_ratio": float(cost_ratio), "headline_ecm": ecm, "headline_se": ecm * rel, "bound_ecm": bound,
            "bound_fraction": ecm / bound, "K": int(head["K"]), "R": int(head["R"]), "cost_draw_s": c_d,
            "overhead": overhead}


def plot_regime_sweep(rows: Sequence[dict], path: str | Path, title: str = "", plain: Sequence[int] = (2, 1),
                      label: str = "carv default (the app's own choice)", upstream: str = "render") -> None:
    """ECM of the headline (with its error bar) and the bound against the cost ratio (log axis); ``plain`` the
    plain estimator's ``(R, K)``, ``label`` the headline's legend entry, ``upstream`` what the upstream stage is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["cost_ratio"])
    x = [r["cost_ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    ax.plot(x, [r["bound_ecm"] for r in rows], "k--", label="efficiency bound")
    ax.errorbar(x, [r["headline_ecm"] for r in rows], yerr=[r["headline_se"] for r in rows], fmt="o-",
                color="tab:red", capsize=3, label=label)
    for i, r in enumerate(rows):  # below the point (off the bound's line), neighbours at two depths
        ks = "/".join(mean_k(q) for q in r.get("per_seed", [r]))  # each seed's own choice
        last = i == len(rows) - 1  # the rightmost label to the point's left, inside the axes
        ax.annotate(f"K={ks}", (r["cost_ratio"], r["headline_ecm"]), textcoords="offset points",
                    xytext=(-5 if last else 5, -13 if i % 2 == 0 else -24), ha="right" if last else "left",
                    fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, label=f"plain estimator (R = {plain[0]}, K = {plain[1]})")
    ax.set_xscale("log")
    ax.set_xlabel(f"{upstream} : draw cost ratio  c_up / c_draw")
    ax.set_ylabel("ECM against the plain estimator")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_regime_sweep(json_path: str | Path, rows: Sequence[dict], record: dict, native_ratio: float,
                       app_default: bool = True) -> dict:
    """Merge ``regime_sweep`` (the rows) and ``regime_sweep_record`` (command, machine, settings) into the benchmark
    JSON at ``json_path``, keeping its other keys. With ``app_default`` (the sweep ran the app's own default),
    ``headline_app_default`` is the row at the native cost ratio (the app's default as a user runs it, charged what
    the app pays), and the existing ``headline`` gets ``bound_fraction``: its value over the bound the pipeline
    allows at the native ratio (that row's bound). Without it (the sweep ran another configuration than the app's
    headline, on another state) only the rows are written."""
    def entries(data: dict) -> dict:
        out = {"regime_sweep": [{k: r[k] for k in REGIME_KEYS} | {k: v for k, v in r.items() if k not in REGIME_KEYS}
                                for r in rows],
               "regime_sweep_record": dict(record)}
        if not app_default:
            return out
        native = min(rows, key=lambda r: abs(math.log(r["cost_ratio"] / native_ratio)))
        out["headline_app_default"] = {"value": native["headline_ecm"], "se": native["headline_se"],
                                       "bound_ecm": native["bound_ecm"], "bound_fraction": native["bound_fraction"],
                                       "K": native["K"], "R": native.get("R"), "cost_ratio": native["cost_ratio"],
                                       "metric": "ecm", "source": "regime_sweep row at the native cost ratio"}
        if native.get("per_seed"):  # each seed's run makes its own choice
            out["headline_app_default"] |= {"R_by_seed": [r["R"] for r in native["per_seed"]],
                                            "K_by_seed": [k_per_step(r) for r in native["per_seed"]]}
        head = data.get("headline")
        if isinstance(head, dict) and isinstance(head.get("value"), (int, float)):
            out["headline"] = {**head, "bound_fraction": head["value"] / native["bound_ecm"],
                               "bound_fraction_source": "its value over the native regime_sweep row's bound_ecm"}
        return out

    return update_json(json_path, entries, "benchmark JSON")
