"""The online :class:`carv.accounting.Allocator` against the best fixed ``(R, K)`` in hindsight, at one budget.

Protocol (DESIGN.md section 2, measurement protocol), at a frozen snapshot of a pipeline:

1. **Pilot = the allocator's own run.** ``pilot_steps`` steps as the app runs them: every ``probe_every``-th
   step a probe step (``probe(R, K, generator, meter)`` returns the parameter-space components of one
   ``R x K`` batch and records its costs), the others ordinary estimates at the allocator's current pair. The
   allocator re-chooses every ``every`` steps from the meter's medians. Its final pair is the method.
2. **Candidates, fixed before measuring**: for each ``K`` of ``k_grid`` the largest ``R`` the budget affords
   (with the pilot's per-render and per-draw medians), plus the allocator's pair. The best of them in
   hindsight is a best-of-N (N reported).
3. **Replicates**: every candidate's parameter-gradient variance against a high-sample reference
   (:func:`carv.bench.harness.measure`, interleaved, CPU-time costs), the reference's own variance removed.
   Figure of merit: ``Var * C``; the allocator's ``C`` is charged its probes (their extra cost per step,
   from the pilot).

:func:`allocator_vs_hindsight` knows nothing of any pipeline: the caller passes ``estimate`` and ``probe``;
:func:`bench_allocator_text_to_3d` wires in the text-to-3D app, :func:`bench_allocator_distill` the one-step
distillation app (``--pipeline distill``), and :func:`bench_camera_strata_text_to_3d`
measures the between-render variance with and without camera strata (``carv bench allocator --cameras``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from carv._runfolder import atomic_write_json
from carv.accounting import Allocator, CostMeter, VarianceComponents, choose_next, largest_r_within, plan_step
from carv.bench.harness import Config, measure, reference_mean

__all__ = ["frontier", "allocator_vs_hindsight", "bench_allocator_text_to_3d", "bench_allocator_distill",
           "bench_camera_strata_text_to_3d"]

ProbeFn = Callable[[int, int, torch.Generator, CostMeter], VarianceComponents]
EstimateFn = Callable[[Config, torch.Generator, CostMeter], Tensor]


def frontier(budget: float, cost_upstream: float, cost_draw: float, k_grid: Sequence[int],
             r_range: tuple[int, int]) -> list[tuple[int, int]]:
    """For each ``K`` of ``k_grid``, ``(R, K)`` with the largest ``R`` in ``r_range`` that fits ``budget``."""
    out = []
    for K in k_grid:
        R = largest_r_within(budget, cost_upstream + K * cost_draw, r_range[1])  # the same rule as allocate
        if R >= r_range[0] and (R, K) not in out:
            out.append((R, K))
    return out


def allocator_vs_hindsight(estimate: EstimateFn, probe: ProbeFn, *, budget_factor: float, method: str,
                           k_grid: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
                           r_range: tuple[int, int] = (1, 16), k_range: tuple[int, int] = (1, 32),
                           pilot_steps: int = 60, probe_every: int = 10, every: int = 5, replicates: int = 24,
                           reference: Config | None = None, reference_estimates: int = 16, seed: int = 0,
                           state_dir: str | Path | None = None, progress: bool = True,
                           clock: Callable[[], float] = time.process_time, probe_k_min: int = 2) -> dict[str, Any]:
    """One budget: ``budget_factor`` times the cost of one plain upstream sample with one draw,
    ``c_up + c_draw`` (2: the plain estimator's ``R = 2, K = 1`` step). Returns a JSON-able result."""
    meter = CostMeter(clock=clock)  # the pilot's costs on the same clock as the replicates'
    alloc, probe_extra = _allocator_pilot(estimate, probe, meter, budget_factor, method, r_range, k_range,
                                          pilot_steps, probe_every, every, seed, probe_k_min)
    c_up, c_draw = meter.median("upstream"), meter.median("draw")
    budget = budget_factor * (c_up + c_draw)
    chosen = alloc.base  # the chosen pair (without its mix)
    pairs = frontier(budget, c_up, c_draw, k_grid, r_range)
    if chosen not in pairs:
        pairs.append(chosen)
    configs = [Config(method, R, K) for R, K in pairs]
    ref_cfg = reference or Config(method, r_range[1], max(k_grid))
    ref, ref_var = reference_mean(estimate, ref_cfg, reference_estimates, seed + 5, progress,
                                  desc=f"reference x{budget_factor:g}")
    rows = measure(configs, estimate, ref, replicates, seed=seed + 7,
                   state_dir=None if state_dir is None else Path(state_dir) / f"budget{budget_factor:g}",
                   progress=progress, desc=f"replicates x{budget_factor:g}", clock=clock)
    out_rows = []
    for r in rows:
        var = max(r["variance"] - ref_var, 0.0)
        out_rows.append({"R": r["R"], "K": r["K"], "variance": var, "variance_se": r["variance_se"],
                         "cost_s": r["cost_s"], "var_x_cost": var * r["cost_s"],
                         "allocator": (r["R"], r["K"]) == chosen})
    best = min(out_rows, key=lambda r: r["var_x_cost"])
    mine = next(r for r in out_rows if r["allocator"])
    charged = mine["variance"] * (mine["cost_s"] + max(probe_extra, 0.0))
    return {"budget_factor": budget_factor, "budget_s": budget, "c_upstream_s": c_up, "c_draw_s": c_draw,
            "allocator_pair": list(chosen), "allocator_history": alloc.history,
            "best_fixed_pair": [best["R"], best["K"]], "n_candidates": len(out_rows),
            "ratio_var_x_cost": mine["var_x_cost"] / best["var_x_cost"],
            "ratio_var_x_cost_probes_charged": charged / best["var_x_cost"],
            "probe_extra_s_per_step": probe_extra, "reference": {"R": ref_cfg.R, "K": ref_cfg.K,
                                                                  "estimates": reference_estimates,
                                                                  "variance": ref_var},
            "replicates": replicates, "pilot_steps": pilot_steps, "probe_every": probe_every,
            "probe_k_min": probe_k_min, "rows": out_rows}


def _allocator_pilot(estimate: EstimateFn, probe: ProbeFn, meter: CostMeter, budget_factor: float, method: str,
                     r_range: tuple[int, int], k_range: tuple[int, int], pilot_steps: int, probe_every: int,
                     every: int, seed: int, probe_k_min: int) -> tuple[Allocator, float]:
    """The allocator's own run (``pilot_steps`` steps, probing when it asks, its budget tracking the meter's
    medians) after a short calibration at ``(1, 1)`` that defines the budget before its first choice; returns it
    and the probes' extra cost per step, from the pilot's own timings."""
    for i in range(3):
        estimate(Config(method, 1, 1), torch.Generator().manual_seed(seed * 1000 + i), meter)
    budget = budget_factor * (meter.median("upstream") + meter.median("draw"))
    alloc = Allocator(budget, r_range=r_range, k_range=k_range, r_init=1, k_init=1, every=every,
                      probe_every=probe_every, probe_k_min=probe_k_min)
    g = torch.Generator().manual_seed(seed + 17)
    t_probe_steps, t_ordinary = [], []
    for _ in range(pilot_steps):
        R, K, probing = plan_step(alloc, alloc.R, alloc.K)
        sw = meter.stopwatch()
        comps = probe(R, K, g, meter) if probing else None
        if not probing:
            estimate(Config(method, R, K), g, meter)
        (t_probe_steps if probing else t_ordinary).append(sw.elapsed())
        alloc.budget = budget_factor * (meter.median("upstream") + meter.median("draw"))  # tracks the medians
        choose_next(alloc, meter, None if comps is None else (comps.between, comps.within))
    probe_extra = 0.0
    if t_probe_steps and t_ordinary:
        probe_extra = (sum(t_probe_steps) / len(t_probe_steps) - sorted(t_ordinary)[len(t_ordinary) // 2]) / probe_every
    return alloc, probe_extra


def bench_allocator_text_to_3d(out_dir: str | Path = "runs/bench-allocator-text-to-3d", budgets=(2.0, 8.0),
                               grid_path: str | Path | None = None, json_path: str | Path | None = None,
                               replicates: int = 24, pilot_steps: int = 60, threads: int | None = 1,
                               prompt: str = "a red mushroom", seed: int = 0, progress: bool = True,
                               command: str | None = None, cfg=None) -> dict:
    """``carv bench allocator``: :func:`carv.bench.allocator.allocator_vs_hindsight` on this pipeline, at a
    frozen grid (the initial blob, or the ``grid.density`` / ``grid.color`` of a run's checkpoint), with the
    weight proposal and per-render strata, iid cameras, CPU-time costs. ``budgets``: multiples of one render
    with one draw (2 = the plain estimator's step at R = 2)."""
    from carv._machine import loadavg, machine_info, set_threads
    from carv._runfolder import load_tensors
    from carv.apps.text_to_3d import SceneProblem, TextTo3DConfig, grid_grad

    set_threads(threads)
    cfg = cfg or TextTo3DConfig(prompt=prompt)
    problem = SceneProblem(prompt, None, cfg.render_size, cfg.n_samples, cfg.guidance_scale, cfg.n_eval_views,
                           clock=time.process_time)
    grid = problem.new_grid(cfg.grid_resolution, cfg.init_blob)
    if grid_path is not None:
        t, _ = load_tensors(grid_path, "grid")  # a run's checkpoint, checksum verified
        with torch.no_grad():
            grid.density.copy_(t["grid.density"])
            grid.color.copy_(t["grid.color"])
    sds = problem.sds(problem.sampler("weight", "per_upstream", cfg.floor), 1)

    def estimate(c, gen, meter):
        sds.K = c.K
        grid.zero_grad(set_to_none=True)
        problem.gradient(grid, sds, c.R, gen, meter=meter)
        return grid_grad(grid).clone()

    def probe(R, K, gen, meter):
        sds.K = K
        grid.zero_grad(set_to_none=True)
        _, secs, comps = problem.gradient(grid, sds, R, gen, probe=True, meter=meter)
        meter.add("probe", secs["probe"])
        return comps

    out = Path(out_dir)
    results = _over_budgets(estimate, probe, budgets, out, progress, method="weight+strata", r_range=(1, 16),
                            k_range=(1, 32), pilot_steps=pilot_steps, replicates=replicates,
                            reference=Config("weight+strata", 4, 8), reference_estimates=8, seed=seed)
    doc = {"command": command or "carv bench allocator", "pipeline": "text-to-3d", "prompt": problem.prompt,
           "grid": str(grid_path) if grid_path is not None else "initial blob",
           "machine": machine_info(loadavg=loadavg()), "results": results}
    return _write(doc, out, json_path)


def _over_budgets(estimate: EstimateFn, probe: ProbeFn, budgets, out: Path, progress: bool, **kw) -> list[dict]:
    """:func:`allocator_vs_hindsight` at each budget (``kw`` its settings), replicates resumable under ``out``,
    each result printed in one line."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for b in budgets:
        res = allocator_vs_hindsight(estimate, probe, budget_factor=float(b), state_dir=out, progress=progress, **kw)
        results.append(res)
        if progress:
            print(f"budget {b:g} x (c_up + c_draw) = {res['budget_s'] * 1e3:.1f} ms: "
                  f"allocator {res['allocator_pair']}, "
                  f"best of {res['n_candidates']} fixed {res['best_fixed_pair']}, Var*C ratio "
                  f"{res['ratio_var_x_cost']:.3f} ({res['ratio_var_x_cost_probes_charged']:.3f} with probes charged)")
    return results


def _write(doc: dict, out: Path, json_path: str | Path | None) -> dict:
    atomic_write_json(out / "result.json", doc)
    if json_path is not None:
        atomic_write_json(json_path, doc)
    return doc


def bench_allocator_distill(out_dir: str | Path = "runs/bench-allocator-distill", budgets=(2.0, 8.0),
                            json_path: str | Path | None = None, replicates: int = 24, pilot_steps: int = 60,
                            threads: int | None = 1, seed: int = 0, progress: bool = True,
                            command: str | None = None, base=None, teacher=None) -> dict:
    """``carv bench allocator --pipeline distill``: :func:`allocator_vs_hindsight` on one-step distillation at
    its start checkpoint (the generator as initialised, the fake score warmed up: what ``carv bench distill``
    measures first). Upstream = one generator sample (forward + backward), draw = one (teacher, fake score)
    pair of calls; the parameter-space components come from :meth:`carv.apps.distill.Distiller.parameter_components`
    (two extra vector-Jacobian products through the generator), probes at ``K >= 4`` (``probe_k_min``: the
    draws are stratified). Per-sample timestep strata, no learned
    proposal (so no pilot to charge), iid latents and labels, CPU-time costs. The fake score's own update
    per training step is the same for every ``(R, K)`` and is left out of the budget. ``budgets``: multiples
    of one sample with one draw (8 = the plain estimator's ``R = 8, K = 1`` step, the distillation baseline)."""
    import dataclasses

    from carv._machine import loadavg, machine_info, torch_threads
    from carv.apps.distill import DistillConfig, Distiller

    base = base or DistillConfig()
    base.validate()
    with torch_threads(threads):
        d = Distiller(dataclasses.replace(base, seed=seed), teacher)
        d.warmup()  # the start checkpoint
        objectives: dict[int, Any] = {}

        def objective(K: int):
            if K not in objectives:
                objectives[K] = d.make_objective(d.make_sampler("none", "per_upstream"), K)
            return objectives[K]

        def estimate(c, gen, meter):
            return d.parameter_gradient(objective(c.K), c.R, gen, meter)

        def probe(R, K, gen, meter):
            return d.parameter_components(objective(K), R, gen, meter)

        out = Path(out_dir)
        results = _over_budgets(estimate, probe, budgets, out, progress, method="strata",
                                k_grid=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), r_range=(1, 32), k_range=(1, 32),
                                pilot_steps=pilot_steps, replicates=replicates, reference=Config("strata", 32, 16),
                                reference_estimates=8, seed=seed, probe_k_min=4)
        doc = {"command": command or "carv bench allocator --pipeline distill", "pipeline": "distill",
               "checkpoint": "start", "machine": machine_info(loadavg=loadavg()), "results": results}
    return _write(doc, out, json_path)


def bench_camera_strata_text_to_3d(out_dir: str | Path = "runs/bench-camera-strata",
                                   json_path: str | Path | None = None,
                                   steps: int = 8, K: int = 4, replicates: int = 12, threads: int | None = 1,
                                   prompt: str = "a red mushroom", seed: int = 0, progress: bool = True,
                                   command: str | None = None) -> dict:
    """Between-render variance with and without upstream strata (text-to-3D, frozen initial blob, weight
    proposal + per-render strata, ``K`` draws per render). Two comparisons, each by replicates against one
    reference (R4 K8, 8 estimates, its variance removed):

    - across steps at ``R = 1``: the average of ``steps`` consecutive one-render gradients with iid cameras
      against cameras on the shifted lattice of :class:`carv.upstream.UpstreamSampler` (a fresh shift per
      replicate, so each replicate is an unbiased estimate);
    - within a step at ``R = 2``: iid cameras against azimuth/elevation strata across the two renders.

    The within part is the same in each pair (same draws per render), so the variance difference is the
    between-render part that the strata remove."""
    from carv._machine import loadavg, machine_info, set_threads
    from carv.apps.text_to_3d import SceneProblem, TextTo3DConfig, grid_grad
    from carv.upstream import UpstreamSampler

    set_threads(threads)
    cfg = TextTo3DConfig(prompt=prompt)
    problem = SceneProblem(prompt, None, cfg.render_size, cfg.n_samples, cfg.guidance_scale, cfg.n_eval_views,
                           clock=time.process_time)
    grid = problem.new_grid(cfg.grid_resolution, cfg.init_blob)
    sds = problem.sds(problem.sampler("weight", "per_upstream", cfg.floor), K)
    modes = {"iid x steps": ("iid", 1, steps), "lattice x steps": ("lattice", 1, steps),
             "iid R2": ("iid", 2, 1), "strata R2": ("strata", 2, 1)}

    def estimate(c, gen, meter):
        sds.K = c.K
        if c.method == "reference":
            grid.zero_grad(set_to_none=True)
            problem.gradient(grid, sds, c.R, gen, meter=meter)
            return grid_grad(grid).clone()
        mode, R, n = modes[c.method]
        up = None if mode == "iid" else UpstreamSampler(2, mode, generator=gen)
        total = None
        for _ in range(n):
            grid.zero_grad(set_to_none=True)
            problem.gradient(grid, sds, R, gen, meter=meter, upstream=up)
            g = grid_grad(grid).clone()
            total = g if total is None else total + g
        return total / n

    ref_cfg = Config("reference", 4, 8)
    ref, ref_var = reference_mean(estimate, ref_cfg, 8, seed + 5, progress, desc="reference")
    configs = [Config(name, R, K) for name, (_, R, _) in modes.items()]
    out = Path(out_dir)
    rows = measure(configs, estimate, ref, replicates, seed=seed + 7, state_dir=out, progress=progress,
                   clock=time.process_time)
    res_rows = [{"config": r["method"], "R": r["R"], "K": r["K"], "steps_averaged": modes[r["method"]][2],
                 "variance": max(r["variance"] - ref_var, 0.0), "variance_se": r["variance_se"]} for r in rows]
    by = {r["config"]: r for r in res_rows}
    ratios = {"lattice_vs_iid_across_steps": by["iid x steps"]["variance"] / by["lattice x steps"]["variance"],
              "strata_vs_iid_R2": by["iid R2"]["variance"] / by["strata R2"]["variance"]}
    doc = {"command": command or "carv bench allocator --cameras", "prompt": problem.prompt, "K": K,
           "steps": steps, "replicates": replicates, "reference": {"R": 4, "K": 8, "estimates": 8, "variance": ref_var},
           "machine": machine_info(loadavg=loadavg()), "rows": res_rows, "variance_ratios": ratios}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "result.json", doc)
    if json_path is not None:
        atomic_write_json(json_path, doc)
    if progress:
        for r in res_rows:
            print(f"{r['config']:>16}: variance {r['variance']:.4g} (SE {r['variance_se']:.2g})")
        print(f"iid / lattice across {steps} steps: {ratios['lattice_vs_iid_across_steps']:.2f}x; "
              f"iid / strata at R = 2: {ratios['strata_vs_iid_R2']:.2f}x")
    return doc
