"""``carv demo``: the side-by-side benchmark of the embedded toy problem (:mod:`carv.apps.toy`).

Parameter-gradient variance and cost of uniform, importance-sampled, stratified and combined timestep
draws at several ``K``, by interleaved replicates under the protocol of :mod:`carv.bench.harness`:

- a pilot (``pilot_steps`` estimates at ``K = 8``, weight-table proposal, strata) learns the proposal and
  gives the accountant its costs and components; its CPU seconds are charged to every row that uses
  what it produced (the learned rows, amortised over ``amortise_steps`` steps of use);
- the **headline** is fixed before measuring: carv's default as a user gets it, the learned proposal
  with per-upstream strata at the accountant's ``K`` from the pilot, measured on replicates that did not
  take part in choosing it; the best row over the grid is reported as an upper bound labelled with N;
- costs come from the pooled stage model (CPU seconds of this process), ECM error bars from a bootstrap
  over rounds, the reference's own variance is subtracted, and replicate counts follow a stated relative
  error (the baseline gets about ``baseline_factor`` times the replicates).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from carv._machine import loadavg, set_threads
from carv._runfolder import RunFolder, atomic_write_json, atomic_write_text
from carv.accounting import CostMeter, optimal_k
from carv.apps.toy import METHODS, ToyConfig, ToyProblem
from carv.bench.harness import (
    SMOKE_NOTE,
    Config,
    RelativeError,
    best_of_n,
    headline,
    measure,
    pooled_figures,
    reference_mean,
    run_record,
)
from carv.bench.report import markdown_table, plot_ecm_vs_k, plot_variance_vs_cost, print_table
from carv.objectives.sds import ScoreDistillation
from carv.timesteps import LearnedProposal

__all__ = ["run_demo"]


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, json_path: str | Path | None = None,
             progress: bool = True, cfg: ToyConfig | None = None, command: str | None = None,
             fresh: bool = False) -> dict:
    """Measure every method x K side by side on the toy problem; write a run folder; return the results.

    ``quick`` is a smoke run: fewer replicates at a looser relative error, the same protocol, and every
    ratio printed with "smoke run, not a measurement"."""
    cfg = cfg or ToyConfig()
    if quick:
        cfg.replicates = min(cfg.replicates, 8)
        cfg.rel_error = max(cfg.rel_error, 0.25)
        cfg.max_replicates = min(cfg.max_replicates, 80)
        cfg.reference_estimates = min(cfg.reference_estimates, 16)
        cfg.pilot_steps = min(cfg.pilot_steps, 20)
    cfg.validate()
    set_threads(cfg.threads)
    # the run folder: locked, with a manifest (carv._runfolder); fresh=True moves an earlier run aside first
    with RunFolder(out_dir, "carv demo", {**asdict(cfg), "quick": quick}, ("threads",), fresh=fresh):
        return _run_demo(Path(out_dir), quick, json_path, progress, cfg, command)


def _run_demo(out: Path, quick: bool, json_path: str | Path | None, progress: bool, cfg: ToyConfig,
              command: str | None) -> dict:
    load_start = loadavg()
    prob = ToyProblem(cfg)
    clock = time.process_time  # CPU seconds of this process: other jobs on a shared machine do not move them

    learned, acc = _pilot(prob, cfg, clock)
    k_max, k_accountant, pilot_s = max(cfg.Ks), acc["k"], acc.pop("pilot_s")
    charge = {"pilot (proposal + accountant), amortised": pilot_s / cfg.amortise_steps}

    sds = {m: ScoreDistillation(prob.teacher, prob.sampler(p, s, learned)) for m, (p, s) in METHODS.items()}

    def estimate(c: Config, gen: torch.Generator, m: CostMeter) -> Tensor:
        est = sds[c.method]
        est.K = c.K
        return prob.gradient(est, c.R, gen, m)[0]

    ref_cfg = Config("learned+stratified", cfg.reference_R, cfg.reference_K)
    reference, ref_var = reference_mean(estimate, ref_cfg, cfg.reference_estimates, cfg.seed + 2, progress)
    head_cfg = Config("learned+stratified", cfg.R, k_accountant)
    configs = [Config(m, cfg.R, k) for m in METHODS for k in cfg.Ks]
    if head_cfg not in configs:
        configs.append(head_cfg)
    base = Config("uniform", cfg.R, 1)
    spec = RelativeError(target=cfg.rel_error, n_min=cfg.replicates, n_max=cfg.max_replicates, baseline=base.key,
                         baseline_factor=cfg.baseline_factor)
    rows = measure(configs, estimate, reference, spec, seed=cfg.seed + 3, state_dir=out / "state",
                   progress=progress, desc="side-by-side replicates", clock=clock, reference_variance=ref_var,
                   keep_replicates=True)
    charges = {m: charge for m, (p, _) in METHODS.items() if p == "learned"}
    summary = pooled_figures(rows, baseline=(base.method, base.R, base.K), charges=charges, seed=cfg.seed,
                             k_max=k_max, smoke=quick)
    head = headline(rows, {"method": head_cfg.method, "R": head_cfg.R, "K": head_cfg.K},
                    chosen_by=f"a priori: carv's default (learned proposal + per-upstream strata) at the "
                              f"accountant's K from the {cfg.pilot_steps}-step pilot")
    grid = [r for r in rows if r["K"] in cfg.Ks]
    best = best_of_n(grid)
    best_k = {m: max((r for r in grid if r["method"] == m), key=lambda r: r["ecm"])["K"] for m in METHODS}
    result = {
        **run_record(command or ("carv demo" + (" --quick" if quick else "")
                                 + (f" --threads {cfg.threads}" if cfg.threads else "")), load_start),
        "smoke": SMOKE_NOTE if quick else None,
        "config": asdict(cfg),
        "headline": head,
        "best_of_n": best,
        "rows": rows,
        "summary": summary,
        "reference": {"method": ref_cfg.method, "R": ref_cfg.R, "K": ref_cfg.K, "estimates": cfg.reference_estimates,
                      "variance_of_reference": ref_var},
        "accountant": acc,
        "pilot": {"steps": cfg.pilot_steps, "cpu_s": pilot_s, "amortise_steps": cfg.amortise_steps,
                  "charged_per_estimate_s": pilot_s / cfg.amortise_steps,
                  "charged_to": sorted(charges)},
        "best_k_per_method": best_k,
    }
    _write_demo(out, result, grid, head_cfg, charge, cfg, quick, json_path, progress)
    return result


def _pilot(prob: ToyProblem, cfg: ToyConfig, clock) -> tuple[LearnedProposal, dict]:
    """The pilot: learn the variance-optimal proposal from the draws a production run makes anyway, and let the
    accountant measure costs and (x-space) variance components to recommend K (its cost is charged to the learned
    rows). Returns the proposal and the accountant's record (with the pilot's CPU seconds as ``pilot_s``)."""
    learned = LearnedProposal(cfg.num_timesteps, num_bins=50)
    pilot = ScoreDistillation(prob.teacher, prob.sampler("weight", "per_upstream"), K=8)
    meter = CostMeter(clock=clock)
    comps = []
    g = torch.Generator().manual_seed(cfg.seed + 1)
    t0 = clock()
    for _ in range(cfg.pilot_steps):
        _, o = prob.gradient(pilot, cfg.R, g, meter)
        learned.update(o.draws.t, o.estimate.sq_norms)
        comps.append((o.estimate.between, o.estimate.within))
    between = sum(c[0] for c in comps) / len(comps)
    within = sum(c[1] for c in comps) / len(comps)
    k_accountant = optimal_k(between, within, meter.median("upstream"), meter.median("draw"), k_max=max(cfg.Ks))
    pilot_s = clock() - t0
    return learned, {"k": k_accountant, "between_x": between, "within_x": within,
                     "c_upstream_s": meter.median("upstream"), "c_draw_s": meter.median("draw"),
                     "note": "x-space components from the pilot's own draws (stratified: within is conservative)",
                     "pilot_s": pilot_s}


def _write_demo(out: Path, result: dict, grid: list[dict], head_cfg: Config, charge: dict, cfg: ToyConfig,
                quick: bool, json_path: str | Path | None, progress: bool) -> None:
    """results.json, metrics.jsonl, table.md, the plots, the ``--json`` file and the console summary."""
    rows, summary, head, best = result["rows"], result["summary"], result["headline"], result["best_of_n"]
    k_accountant, pilot_s = result["accountant"]["k"], result["pilot"]["cpu_s"]
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cols = ("method", "R", "K", "n", "variance", "variance_se", "cost_s", "cost_wall_s", "re", "ecm", "ecm_se",
            "bound_fraction")
    atomic_write_text(out / "table.md", markdown_table(rows, cols, smoke=quick) + "\n")
    plot_variance_vs_cost(rows, out / "variance_vs_cost.png", "toy SDS: parameter-gradient variance vs compute",
                          cost_label="cost per estimate (CPU s, pooled stage model + charges)")
    plot_ecm_vs_k(grid, out / "ecm_vs_k.png", R=cfg.R, title=f"toy SDS: ECM vs K (R = {cfg.R}, baseline uniform K=1)")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, result)
    if progress:
        note = f" ({SMOKE_NOTE})" if quick else ""
        print_table(rows, [c for c in cols if c != "cost_wall_s"],  # the wall-clock check: in table.md
                    title="carv demo: SDS of a point set through a costly map (GMM teacher)",
                    highlight={(head_cfg.method, head_cfg.R, head_cfg.K)}, smoke=quick)
        print(f"cost ratio c_up / c_draw = {summary['cost_ratio']:.2f}{note}; accountant's K (pilot, x-space) = "
              f"{k_accountant}; pilot {pilot_s:.2f} CPU s, charged {charge[next(iter(charge))] * 1e3:.2f} ms per "
              f"estimate to the learned rows")
        print(f"headline (a priori): {head_cfg.method} K={head_cfg.K} ECM {head['value']:.2f}x "
              f"+- {head['se'] or 0:.2f}{note}")
        print(f"best of {best['n']} rows (upper bound): {best['config']['method']} K={best['config']['K']} "
              f"ECM {best['value']:.2f}x{note}")
        print(f"run folder: {out}")
