"""The regime sweep on the main text-to-3D job: carv's default against the plain estimator and the efficiency bound
at render : draw cost ratios 1, native, 10 and 30 (issue 24; DESIGN.md section 2, "What the bound says").

For each seed: the app's default run (``carv text-to-3d`` with that seed) is trained to the middle snapshot
(``--snapshot-step``, resumable) and, at that snapshot, with nothing the app does not pay (no warm-up, no pilot):

- the app's estimator is its own sampler as the run left it (proposal chosen by its ProposalSelector from its own
  draws, per-upstream strata), at the (R, K) its own allocator picks from its own components when the render
  costs ``cost_ratio`` draws (:meth:`carv.accounting.Allocator.choose`, probe costs charged as the app pays them);
- replicate variances (against a high-sample reference, the reference's own variance removed) of that estimator at
  every ratio's (R, K), of uniform reuse at the same (R, K), and of the plain estimator (uniform, R = 2, K = 1);
- cost of one estimate ``R (c_up + K c_draw)`` with the measured draw cost and ``c_up = cost_ratio * c_draw``.

Rows pool the seeds' variances (each seed its own snapshot and reference). Written to ``--json`` as
``regime_sweep`` (keys kept) with the plot beside it. Resumable: rerun the same command.

    nice -n 10 python benchmarks/regime_sweep_text_to_3d.py --out /work/runs/issue-24/regime-t3d \\
        --json docs/text_to_3d_bench.json --seeds 0 1 2 --replicates 90 --baseline-replicates 300
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from carv._machine import loadavg
from carv._runfolder import atomic_write_json
from carv.apps.text_to_3d import TextTo3DConfig, Trainer
from carv.bench.harness import Config, fit_components, measure, reference_mean, run_record
from carv.bench.regime import plot_regime_sweep, regime_row, write_regime_sweep

RATIOS = (1.0, "native", 10.0, 30.0)


def snapshot(seed: int, steps: int, out: Path) -> Trainer:
    """The app's default run with ``seed``, trained (or resumed) to ``steps`` steps and checkpointed."""
    tr = Trainer(TextTo3DConfig(seed=seed), out, resume=True)
    while tr.step_count < steps:
        tr.step()
        if tr.step_count % 25 == 0 or tr.step_count == steps:
            tr.save()
    return tr


def app_choice(tr: Trainer, ratio: float) -> tuple[int, int, float]:
    """``(R, K, overhead)``: the app's allocator's choice when a render costs ``ratio`` draws, and the fraction of
    that step's cost its probes add (one probe step every ``interval`` steps, in draw-cost units)."""
    a = tr.alloc
    probe_ratio = a.calibration["probe_ratio"] if a.calibration else 0.0
    R, K, _ = a.choose(ratio, 1.0, probe_ratio)
    Rp = max(R, 2)
    Kp = max(a.probe_k_min, round(R * K / Rp))
    step = R * (ratio + K)
    extra = max(Rp * (ratio + Kp) + probe_ratio - step, 0.0) / a.interval
    return R, K, extra / step


def estimate_fn(tr: Trainer):
    """``estimate(config, generator, meter)``: one SDS parameter gradient at the snapshot, by the app's own sampler
    (method ``carv``) or uniform timesteps (method ``uniform``)."""
    p = tr.problem
    samplers = {"carv": tr.sds.sampler, "uniform": p.sampler("none", "none", tr.cfg.floor)}
    samplers["uniform"].set_t_range(tr.sds.sampler.t_min, tr.sds.sampler.t_max)
    sds = {m: p.sds(s, 1) for m, s in samplers.items()}
    for s in sds.values():
        s.guidance_scale = tr.cfg.guidance_at(tr.step_count)

    def estimate(c: Config, gen: torch.Generator, meter) -> torch.Tensor:
        obj = sds[c.method]
        obj.K = c.K
        tr.grid.density.grad = tr.grid.color.grad = None
        p.gradient(tr.grid, obj, c.R, gen, meter=meter, elevation_range=(tr.cfg.elev_lo, tr.cfg.elev_hi))
        return torch.cat([tr.grid.density.grad.flatten(), tr.grid.color.grad.flatten()]).detach().clone()

    return estimate


def measure_seed(seed: int, args, out: Path) -> dict:
    """One seed's snapshot, the app's choices at every ratio and the replicate rows."""
    path = out / f"seed-{seed}" / "rows.json"
    if path.is_file():
        return json.loads(path.read_text())
    tr = snapshot(seed, args.snapshot_step, out / f"seed-{seed}" / "run")
    cal = tr.alloc.calibration
    native = cal["cost_ratio"] if cal else tr.meter.median("upstream") / tr.meter.median("draw")
    ratios = [native if r == "native" else r for r in RATIOS]
    choices = {str(r): app_choice(tr, r) for r in ratios}
    configs = [Config("uniform", 2, 1)]
    for R, K, _ in choices.values():
        configs += [c for c in (Config("carv", R, K), Config("uniform", R, K)) if c not in configs]
    estimate = estimate_fn(tr)
    ref, ref_var = reference_mean(estimate, Config("carv", 8, 16), args.reference_estimates, seed + 7,
                                  desc=f"reference (seed {seed})")
    n_of = {c.key: args.baseline_replicates if (c.method, c.R, c.K) == ("uniform", 2, 1) else args.replicates
            for c in configs}
    rows = measure(configs, estimate, ref, lambda c: n_of[c.key], seed=seed + 11,
                   state_dir=out / f"seed-{seed}" / "state", desc=f"replicates (seed {seed})",
                   clock=time.process_time, reference_variance=ref_var)
    res = {"seed": seed, "native_ratio": native, "ratios": ratios, "choices": choices, "rows": rows,
           "proposal": tr.selector.current if getattr(tr, "selector", None) else tr.cfg.resolved_proposal,
           "allocator_components": [tr.alloc.between, tr.alloc.within], "calibration": cal, "loadavg": loadavg()}
    atomic_write_json(path, res)
    return res


def pooled(results: list[dict], method: str, R: int, K: int) -> dict | None:
    """The seeds' variances of one configuration pooled (mean; SE from the per-seed SEs)."""
    rs = [r for res in results for r in res["rows"] if (r["method"], r["R"], r["K"]) == (method, R, K)]
    if not rs:
        return None
    var = sum(r["variance"] for r in rs) / len(rs)
    se = math.sqrt(sum(r["variance_se"] ** 2 for r in rs)) / len(rs)
    return {"method": method, "R": R, "K": K, "variance": var, "variance_se": se, "seeds": len(rs),
            "c_draw_s": sum(r["c_draw_s"] for r in rs) / len(rs)}


def sweep_rows(results: list[dict]) -> list[dict]:
    """One row per ratio: the app's choice (the first seed's; the seeds' choices are listed), pooled over seeds."""
    keys = {(r["method"], r["R"], r["K"]) for res in results for r in res["rows"]}
    comps = fit_components([pooled(results, *k) for k in keys if k[0] == "carv"], "carv")
    base = pooled(results, "uniform", 2, 1)
    c_draw = sum(r["c_draw_s"] for res in results for r in res["rows"]) / sum(len(res["rows"]) for res in results)
    out = []
    for i, ratio in enumerate(results[0]["ratios"]):
        R, K, overhead = results[0]["choices"][str(ratio)]
        head = pooled(results, "carv", R, K)
        row = regime_row(ratio, c_draw, base, head, comps, overhead)
        uni = pooled(results, "uniform", R, K)
        row["uniform_reuse_ecm"] = regime_row(ratio, c_draw, base, uni, comps)["headline_ecm"] if uni else None
        row["native"] = RATIOS[i] == "native"
        row["choices_per_seed"] = [res["choices"][str(res["ratios"][i])][:2] for res in results]
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/work/runs/issue-24/regime-t3d"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--snapshot-step", type=int, default=150)
    ap.add_argument("--replicates", type=int, default=90)
    ap.add_argument("--baseline-replicates", type=int, default=300)
    ap.add_argument("--reference-estimates", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure_seed(s, args, args.out) for s in args.seeds]
    rows = sweep_rows(results)
    atomic_write_json(args.out / "regime_sweep.json", {"rows": rows, "per_seed": results})
    plot_regime_sweep(rows, args.out / "regime_sweep.png", "text-to-3D main job: carv default vs bound")
    for r in rows:
        print(f"cost ratio {r['cost_ratio']:5.1f}: K = {r['K']:2d}, ECM {r['headline_ecm']:.2f} +- "
              f"{r['headline_se']:.2f}, bound {r['bound_ecm']:.2f} ({r['bound_fraction']:.2f} of it); "
              f"uniform reuse {r['uniform_reuse_ecm']:.2f}")
    if args.json is not None:
        record = run_record(None, seeds=args.seeds, snapshot_step=args.snapshot_step, replicates=args.replicates,
                            baseline_replicates=args.baseline_replicates)
        native = next(r["cost_ratio"] for r in rows if r["native"])
        write_regime_sweep(args.json, rows, record, native)
        shutil.copy(args.out / "regime_sweep.png", args.json.with_name(args.json.stem + "_regime_sweep.png"))


if __name__ == "__main__":
    main()
