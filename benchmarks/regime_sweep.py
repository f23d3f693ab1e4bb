"""The regime sweep: carv's default against the plain estimator and the efficiency bound at render : draw cost
ratios 1, native, 10 and 30 (DESIGN.md section 2, "What the bound says"), on the main text-to-3D job
(``--app text-to-3d``), the embedded toy problem of ``carv demo`` (``--app demo``) or DMD distillation with carv's
:class:`carv.Accountant` around the app's training loop (``--app distill``; ``carv distill`` itself runs a fixed
``R = 8, K = 16``).

For each seed the app's default run is made first (text-to-3D: ``carv text-to-3d`` with that seed, trained to the
middle snapshot ``--snapshot-step``, resumable; demo: ``--snapshot-step`` steps of the default estimator through
:class:`carv.Accountant` with its ProposalSelector, the toy's parameters fixed). Then, at that state, with nothing
the app does not pay (no warm-up, no pilot):

- the app's estimator is its own sampler as the run left it (proposal chosen by its ProposalSelector from its own
  draws, per-upstream strata), at the plan its own allocator makes from its own components when the render costs
  ``cost_ratio`` draws (:meth:`carv.accounting.Allocator.plan`: a pair ``(R, K)`` and, where the budget leaves room
  that ``K + 1`` does not fit, a share of steps at ``(R, K + 1)``; a plan's row is the mean variance and mean cost
  of its steps, :func:`mix_row`), charged its probes' extra cost and its
  proposal's updates and refreshes at the interval its selector had reached (:func:`proposal_cost`, timed right
  after the seed's replicates);
- replicate variances (against a high-sample reference, the reference's own variance removed) of that estimator at
  every ratio's (R, K), of uniform reuse at the same (R, K), and of the plain estimator (uniform, R = 2, K = 1);
- the cost of one estimate is ``R (c_up + K c_draw)`` with the measured draw cost and ``c_up = cost_ratio * c_draw``;
- the app's estimator along a grid of ``K`` (one upstream sample each), for its variance curve and the bound
  (:func:`carv.bench.regime.fit_variance_curve`).

Rows pool the seeds' variances (each seed its own run and reference). ``--json`` gets ``regime_sweep`` (its other
keys kept) and the plot beside it. Resumable: rerun the same command.

    nice -n 10 python benchmarks/regime_sweep.py --app text-to-3d --out runs/regime-t3d \\
        --json docs/text_to_3d_bench.json --seeds 0 1 2 --replicates 120 --baseline-replicates 400
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carv._machine import loadavg
from carv._runfolder import atomic_write_json
from carv.accounting import timed_estimate
from carv.accounting.algebra import mixed_step
from carv.bench.harness import Config, measure, reference_mean, run_record
from carv.bench.regime import fit_variance_curve, mix_row, plot_regime_sweep, regime_row, write_regime_sweep

RATIOS = (1.0, "native", 10.0, 30.0)
PROPOSAL_EVERY = 10  # each app's selector starts refreshing every 10 steps (text-to-3D: its proposal_every)


@dataclass
class Snapshot:
    """What the sweep needs from an app's default run: its allocator (components, calibrated costs), the proposal
    it ended with and ``estimate(config, generator, meter)`` for the methods ``carv`` (its own sampler) and
    ``uniform``."""

    alloc: Any
    proposal: str
    estimate: Any
    refresh_every: int  # the proposal selector's refresh interval at the snapshot (what a step of the run pays)


def text_to_3d_snapshot(seed: int, steps: int, out: Path) -> Snapshot:
    """The app's default run with ``seed``, trained (or resumed) to ``steps`` steps and checkpointed."""
    from carv.apps.text_to_3d import TextTo3DConfig, Trainer

    tr = Trainer(TextTo3DConfig(seed=seed), out, resume=True)
    while tr.step_count < steps:
        tr.step()
        if tr.step_count % 25 == 0 or tr.step_count == steps:
            tr.save()
    p = tr.problem
    # the objective of the last step taken (a trainer resumed from a checkpoint sets its range at its next step)
    tr.sds.sampler.set_t_range(*tr.cfg.t_range(tr.step_count - 1, p.T))
    uniform = p.sampler("none", "none", tr.cfg.floor)
    uniform.set_t_range(tr.sds.sampler.t_min, tr.sds.sampler.t_max)
    sds = {"carv": p.sds(tr.sds.sampler, 1), "uniform": p.sds(uniform, 1)}
    for s in sds.values():
        s.guidance_scale = tr.cfg.guidance_at(tr.step_count)

    def estimate(c: Config, gen: torch.Generator, meter) -> torch.Tensor:
        obj = sds[c.method]
        obj.K = c.K
        tr.grid.density.grad = tr.grid.color.grad = None
        p.gradient(tr.grid, obj, c.R, gen, meter=meter, elevation_range=(tr.cfg.elev_lo, tr.cfg.elev_hi))
        return torch.cat([tr.grid.density.grad.flatten(), tr.grid.color.grad.flatten()]).detach().clone()

    selector = tr.selector
    return Snapshot(tr.alloc, selector.current if selector is not None else tr.cfg.resolved_proposal, estimate,
                    selector.interval if selector is not None else tr.cfg.proposal_every)


def demo_snapshot(seed: int, steps: int, out: Path) -> Snapshot:
    """``steps`` steps of carv's default on the toy problem (parameters fixed): the Accountant chooses (R, K) at the
    plain estimator's budget, the ProposalSelector the proposal, both from the run's own draws."""
    from carv import Accountant, LearnedProposal, ProposalSelector
    from carv.apps.toy import ToyConfig, ToyProblem
    from carv.objectives.sds import ScoreDistillation

    prob = ToyProblem(ToyConfig(seed=seed))
    T = prob.cfg.num_timesteps
    sampler = prob.sampler("weight", "per_upstream")
    selector = ProposalSelector(T, weight=prob.w, learned=LearnedProposal(T, prior=prob.w), start="weight",
                                every=PROPOSAL_EVERY)
    sds = ScoreDistillation(prob.teacher, sampler, K=1)
    acc = Accountant(sds, params=[prob.theta], R=2, generator=torch.Generator().manual_seed(seed + 1))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        prob.theta.grad = None
        with acc.step() as st:
            x = prob.upstream(acc.R, g)
            res = st.objective(x, generator=g)
            st.backward(res, x)
        selector.step(res.draws.t, res.estimate.sq_norms, sampler)
    samplers = {"carv": sampler, "uniform": prob.sampler("none", "none")}
    objs = {m: ScoreDistillation(prob.teacher, s, K=1) for m, s in samplers.items()}

    def estimate(c: Config, gen: torch.Generator, meter) -> torch.Tensor:
        objs[c.method].K = c.K
        return prob.gradient(objs[c.method], c.R, gen, meter)[0].flatten()

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "run.json", {"accountant": acc.state_dict(), "proposal": selector.current,
                                         "switches": selector.history, "refresh_every": selector.interval})
    return Snapshot(acc.allocator, selector.current, estimate, selector.interval)


def distill_allocator():
    """The distillation run's allocator: the plain estimator's budget, plain pair ``R = 8, K = 1``."""
    from carv.accounting import Allocator

    return Allocator("baseline", baseline=(8, 1), r_range=(1, 32), k_range=(1, 32), r_init=8, k_init=1, every=10,
                     probe_every=5)


def distill_snapshot(seed: int, steps: int, out: Path, on_step=None) -> Snapshot:
    """``steps`` generator steps of DMD distillation (the app's Distiller: fake-score warm-up and updates as it
    makes them) with carv's estimator on the generator gradient: per-upstream strata, the ProposalSelector over
    uniform and the learned table (DMD's per-draw normalisation has no weight table), and the Accountant choosing
    (R, K) at the plain estimator's budget, the distillation's plain estimator being R = 8, K = 1. The snapshot is
    the state step ``steps + 1`` takes its generator gradient at (its fake-score updates made).
    ``on_step(step, distiller, accountant, closed_step)`` is called after each step (``benchmarks/probe_drift.py``)."""
    from carv import Accountant, ProposalSelector
    from carv.apps.distill import DistillConfig, Distiller

    d = Distiller(DistillConfig(seed=seed, R=8, K=1, stratify="per_upstream"))
    selector = ProposalSelector(d.T, learned=d.learned, start="uniform", every=PROPOSAL_EVERY)
    params = list(d.generator.parameters())
    alloc = distill_allocator()
    acc = Accountant(d.dmd, params=params, allocator=alloc, generator=torch.Generator().manual_seed(seed + 1))
    d.warmup()
    for step in range(1, steps + 1):
        d.fake_catch_up()
        d.opt_g.zero_grad(set_to_none=True)
        with acc.step() as st:
            z, c = d.latents(acc.R)
            x = d.generator(z, c)
            res = st.objective(x, c, d.rng)
            st.backward(res, x)
        d.opt_g.step()
        selector.step(res.draws.t, res.estimate.sq_norms, d.sampler)
        if on_step is not None:
            on_step(step, d, acc, st)
    d.fake_catch_up()  # the state the next generator gradient is taken at (the run's probes read it there too)
    uniform = d.make_sampler("none", "none")
    objs = {"carv": d.dmd, "uniform": d.make_objective(uniform, 1)}

    def estimate(c: Config, gen: torch.Generator, meter) -> torch.Tensor:
        obj = objs[c.method]
        obj.K = c.K
        for q in params:
            q.grad = None
        z, lab = d.latents(c.R, gen)
        timed_estimate(lambda: d.generator(z, lab), lambda x: obj(x, lab, gen), c.K, meter)
        return torch.cat([q.grad.flatten() for q in params]).detach().clone()

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "run.json", {"accountant": acc.state_dict(), "proposal": selector.current,
                                         "switches": selector.history, "refresh_every": selector.interval})
    return Snapshot(alloc, selector.current, estimate, selector.interval)


SNAPSHOTS = {"text-to-3d": text_to_3d_snapshot, "demo": demo_snapshot, "distill": distill_snapshot}


def app_choice(alloc, ratio: float) -> tuple[int, int, float, list | None]:
    """``(R, K, overhead, mix)``: the app's allocator's plan when a render costs ``ratio`` draws
    (:meth:`Allocator.plan`: its pair and its mix, the share of steps at ``(R, K + 1)`` or None), and the fraction
    of the mean step's cost its probes add (:meth:`Allocator.charged_cost`, in draw-cost units, at the interval the
    allocator would probe at: the longest one on the plain pair, else the run's). A probe's own cost is two
    vector-Jacobian products through the upstream, so it scales with the upstream's cost: the calibrated probe
    cost times ``ratio`` over the native ratio."""
    cal = alloc.calibration or {}
    probe_ratio = cal.get("probe_ratio", 0.0) * ratio / cal.get("cost_ratio", ratio)
    R, K, _, mix = alloc.plan(ratio, 1.0, probe_ratio, keep=False)  # a run at this ratio, not this one's pair
    extra = (alloc.charged_cost(R, K, ratio, 1.0, probe_ratio, alloc.probe_interval_for((R, K)))
             - alloc.step_cost(R, K, ratio, 1.0))
    step = mixed_step(alloc.between, alloc.within, ratio, 1.0, R, K, mix)[1]  # the mean step's cost
    return R, K, extra / step, (list(mix) if mix is not None else None)


def measure_seed(seed: int, args, out: Path) -> dict:
    """One seed's run, the app's choices at every ratio and the replicate rows."""
    path = out / f"seed-{seed}" / "rows.json"
    if path.is_file():
        return json.loads(path.read_text())
    (out / f"seed-{seed}").mkdir(parents=True, exist_ok=True)
    snap = SNAPSHOTS[args.app](seed, args.snapshot_step, out / f"seed-{seed}" / "run")
    cal = snap.alloc.calibration
    native = cal["cost_ratio"]
    ratios = [native if r == "native" else r for r in RATIOS]
    choices = {str(r): app_choice(snap.alloc, r) for r in ratios}
    plain = getattr(snap.alloc, "baseline", (2, 1))
    configs = [Config("uniform", *plain)]
    for R, K, _, mix in choices.values():
        configs += [c for c in (Config("carv", R, K), Config("uniform", R, K)) if c not in configs]
        if mix is not None and Config("carv", *mix[:2]) not in configs:
            configs.append(Config("carv", *mix[:2]))
    # the app's estimator along a grid of K (one render each), for its variance curve and bound
    grid = [2 ** i for i in range(int(math.log2(min(snap.alloc.k_max, 64))) + 1)]
    configs += [c for c in (Config("carv", 1, k) for k in grid) if c not in configs]
    ref, ref_var = reference_mean(snap.estimate, Config("carv", 8, 16), args.reference_estimates, seed + 7,
                                  desc=f"reference (seed {seed})")
    n_of = {c.key: args.baseline_replicates if (c.method, c.R, c.K) == ("uniform", *plain) else args.replicates
            for c in configs}
    rows = measure(configs, snap.estimate, ref, lambda c: n_of[c.key], seed=seed + 11,
                   state_dir=out / f"seed-{seed}" / "state", desc=f"replicates (seed {seed})",
                   clock=time.process_time, reference_variance=ref_var)
    shapes = sorted({(R, K) for R, K, _, _ in choices.values()}
                    | {tuple(f[:2]) for *_, f in choices.values() if f is not None})
    res = {"seed": seed, "plain": list(plain), "native_ratio": native, "ratios": ratios, "choices": choices,
           "rows": rows,
           "proposal": snap.proposal, "allocator_components": [snap.alloc.between, snap.alloc.within],
           "calibration": cal, "refresh_every": snap.refresh_every,
           "proposal_s": proposal_cost(args.app, shapes, snap.refresh_every), "loadavg": loadavg()}
    atomic_write_json(path, res)
    return res


def proposal_cost(app: str, shapes, every: int, repeats: int = 5, cycles: int = 20) -> dict[str, float]:
    """Process seconds per step that carv's estimator pays for choosing its proposal and the plain one does not:
    the app's :class:`carv.ProposalSelector` updated with each step's ``R x K`` draws and refreshed every ``every``
    steps (the interval its schedule had reached at the snapshot), timed as whole cycles (the median of
    ``repeats`` timings of ``cycles`` cycles each). The learned candidate is the current one, so every refresh
    rebuilds the sampler's tables (the dearest case; a run on uniform or the weight table skips that). Keyed
    ``"R,K"``. :func:`measure_seed` times it right after the seed's replicates, so that it is charged against
    draws timed in the same machine state."""
    from carv import LearnedProposal, ProposalSelector, TimestepSampler

    T, g = 1000, torch.Generator().manual_seed(0)
    weight = None if app == "distill" else torch.linspace(0.1, 1.0, T)  # distillation has no weight table
    done = {}
    for R, K in shapes:
        sampler = TimestepSampler(T, stratify="per_upstream")
        selector = ProposalSelector(T, weight=weight, learned=LearnedProposal(T, prior=weight), start="learned")
        steps = [(torch.randint(20, T - 20, (R, K), generator=g), torch.rand(R, K, generator=g, dtype=torch.float64))
                 for _ in range(every * cycles)]
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            for i, (t, sq) in enumerate(steps, 1):
                selector.update(t, sq, sampler)
                if i % every == 0:
                    selector.refresh(sampler)
            times.append((time.process_time() - t0) / len(steps))
        done[f"{R},{K}"] = statistics.median(times)
    return done


def seed_rows(res: dict) -> list[dict]:
    """One seed's rows at every ratio: the app's choice there against that seed's plain estimator and bound; the
    choice charged its probes and its proposal's updates (``res["proposal_s"]``, :func:`proposal_cost`)."""
    proposal_s = res["proposal_s"]
    rows = {(r["method"], r["R"], r["K"]): r for r in res["rows"]}
    comps = fit_variance_curve([r for r in res["rows"] if r["method"] == "carv"])
    base = rows[("uniform", *res.get("plain", (2, 1)))]
    c_draw = sum(r["c_draw_s"] for r in res["rows"]) / len(res["rows"])
    out = []
    for ratio in res["ratios"]:
        R, K, probes, mix = (list(res["choices"][str(ratio)]) + [None])[:4]  # rows.json before mixes: 3 entries
        a = mix[2] if mix is not None else 0.0
        head = mix_row(rows[("carv", R, K)], rows.get(("carv", *mix[:2])) if mix else None, a)
        per_step = proposal_s[f"{R},{K}"] + (a * (proposal_s[f"{mix[0]},{mix[1]}"] - proposal_s[f"{R},{K}"])
                                            if mix else 0.0)
        proposal = per_step / (R * (ratio + K + a) * c_draw)  # a fraction of the mean step's cost
        row = regime_row(ratio, c_draw, base, head, comps, probes + proposal)
        row["probe_overhead"], row["proposal_overhead"], row["mix"] = probes, proposal, mix
        uniform = regime_row(ratio, c_draw, base, rows[("uniform", R, K)], comps)
        row["uniform_reuse_ecm"], row["uniform_reuse_se"] = uniform["headline_ecm"], uniform["headline_se"]
        row["curve"] = list(comps)  # R Var = b + w_e / K + w_t / K^3 of the app's estimator
        out.append(row)
    return out


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def _mean_se(rows: list[dict], key: str) -> float:
    """The standard error of the mean over independent seeds, from each seed's own (``key``)."""
    return math.sqrt(sum(r[key] ** 2 for r in rows)) / len(rows)


def sweep_rows(results: list[dict]) -> list[dict]:
    """Per ratio, the seeds' rows combined: mean ECM (SE from the per-seed SEs), mean bound, their ratio; the native
    ratio is each seed's own calibrated one (their mean reported)."""
    per_seed = [seed_rows(res) for res in results]
    out = []
    for i, label in enumerate(RATIOS):
        rs = [rows[i] for rows in per_seed]
        ecm, bound = _mean(rs, "headline_ecm"), _mean(rs, "bound_ecm")
        out.append({"cost_ratio": _mean(rs, "cost_ratio"), "headline_ecm": ecm,
                    "headline_se": _mean_se(rs, "headline_se"), "bound_ecm": bound, "bound_fraction": ecm / bound,
                    "K": rs[0]["K"], "R": rs[0]["R"], "native": label == "native",
                    "uniform_reuse_ecm": _mean(rs, "uniform_reuse_ecm"),
                    "uniform_reuse_se": _mean_se(rs, "uniform_reuse_se"),
                    "per_seed": [{k: r[k] for k in ("cost_ratio", "R", "K", "mix", "headline_ecm", "headline_se",
                                                    "bound_ecm", "bound_fraction", "uniform_reuse_ecm",
                                                    "uniform_reuse_se", "curve", "probe_overhead",
                                                    "proposal_overhead")}
                                 for r in rs]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--app", choices=sorted(SNAPSHOTS), default="text-to-3d")
    ap.add_argument("--out", type=Path, required=True)
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
    plain, png = results[0].get("plain", (2, 1)), args.out / "regime_sweep.png"
    if args.app == "distill":
        plot_regime_sweep(rows, png, "distill: carv's Accountant against the efficiency bound", plain,
                          "carv's Accountant (its own choice)", "generator")
    else:
        plot_regime_sweep(rows, png, f"{args.app}: carv default against the efficiency bound", plain)
    for r in rows:
        print(f"cost ratio {r['cost_ratio']:5.1f}: K = {r['K']:2d}, ECM {r['headline_ecm']:.2f} +- "
              f"{r['headline_se']:.2f}, bound {r['bound_ecm']:.2f} ({r['bound_fraction']:.2f} of it); "
              f"uniform reuse {r['uniform_reuse_ecm']:.2f} +- {r['uniform_reuse_se']:.2f}")
    if args.json is not None:
        record = run_record(None, seeds=args.seeds, snapshot_step=args.snapshot_step, replicates=args.replicates,
                            baseline_replicates=args.baseline_replicates)
        native = next(r["cost_ratio"] for r in rows if r["native"])
        # distillation: carv's Accountant around the app's loop, not `carv distill`'s fixed default
        write_regime_sweep(args.json, rows, record, native, app_default=args.app != "distill")
        shutil.copy(args.out / "regime_sweep.png", args.json.with_name(args.json.stem + "_regime_sweep.png"))


if __name__ == "__main__":
    main()
