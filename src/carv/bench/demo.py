"""``carv demo``: the side-by-side benchmark of the embedded toy problem (:mod:`carv.apps.toy`).

Parameter-gradient variance and cost of uniform, importance-sampled, stratified and combined timestep
draws at several ``K``, by interleaved replicates (:mod:`carv.bench.harness`): RE, ECM, the fraction of
the efficiency bound and the ``K`` the accountant recommends from a pilot.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from carv.accounting import CostMeter, optimal_k
from carv.apps.toy import METHODS, ToyConfig, ToyProblem
from carv.bench.harness import Config, add_figures, measure, reference_mean
from carv.bench.report import markdown_table, plot_ecm_vs_k, plot_variance_vs_cost, print_table
from carv.objectives.sds import ScoreDistillation
from carv.timesteps import LearnedProposal

__all__ = ["run_demo"]


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
