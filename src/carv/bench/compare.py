"""``carv text-to-3d --compare``: the text-to-3D pipeline and the plain estimator side by side, interleaved in one
process (machine load hits both alike), at equal per-step compute or equal wall-clock.

The run folder gets ``carv/`` and ``baseline/`` sub-runs (each an ordinary, resumable text-to-3D run) and
``turntables.png`` side by side plus ``quality_vs_steps.png`` and ``quality_vs_seconds.png``; ``summary.json`` holds
the equal-quality ratios (:func:`carv.bench.quality.equal_quality_ecm`) in steps and in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from carv import runner
from carv._machine import loadavg, machine_info
from carv._plotting import save_image_grid
from carv._progress import progress_bar
from carv._runfolder import atomic_write_json
from carv.apps.text_to_3d import (
    METHODS,
    SceneProblem,
    TextTo3DConfig,
    Trainer,
    open_run,
    plot_quality_curves,
    prepare_run,
    turntable,
    write_run_outputs,
)
from carv.bench.quality import equal_quality_ecm, eval_interval_for, min_evaluations
from carv.teachers.unet import UNetTeacher

__all__ = ["compare_text_to_3d", "baseline_lr_fields"]


def compare_text_to_3d(prompt: str, out_dir: str | Path | None = None, cfg: TextTo3DConfig | None = None, *,
                       compare_at: str = "step", fresh: bool = False, progress: bool = True,
                       teacher: UNetTeacher | None = None, restart: bool | None = None) -> dict:
    """Train carv and the baseline side by side in one run folder; return the comparison's summary.

    ``compare_at="step"`` (the default): **equal per-step compute**, both make ``cfg.steps`` steps and carv's
    allocator spends the baseline's measured per-step cost (``R (c_up + c_draw)`` from the baseline's own meter,
    re-read every step). Both use the same learning rate (``cfg.lr``: one rule for both) unless ``cfg.baseline_lr``
    gives the baseline its own (each tuned on the same grid: ``benchmarks/equal_step_reference.py --lr-grid``).
    ``compare_at="wall-clock"``: the run with less training time so far steps next, and the baseline stops once it
    has used as much time as the carv run.
    """
    with open_run(prompt, out_dir, cfg, fresh=bool(fresh or restart), progress=progress, teacher=teacher,
                  compare_at=compare_at) as opened:
        cfg, out, problem = opened
        return _compare_in_folder(out, cfg, problem, compare_at, progress)


def baseline_lr_fields(cfg: TextTo3DConfig) -> dict:
    """The baseline's learning-rate fields in ``--compare``: ``cfg.baseline_lr`` in place of ``cfg.lr`` (a decay
    to ``lr_end`` keeps its ratio ``lr_end / lr``), or nothing when it is None (both at ``cfg.lr``)."""
    if cfg.baseline_lr is None:
        return {}
    end = None if cfg.lr_end is None else float(cfg.lr_end) * float(cfg.baseline_lr) / float(cfg.lr)
    return {"lr": float(cfg.baseline_lr), "lr_end": end, "baseline_lr": None}


def _compare_in_folder(out: Path, cfg: TextTo3DConfig, problem: SceneProblem, compare_at: str,
                       progress: bool) -> dict:
    equal_step = compare_at == "step"
    cfgs = {"carv": dataclasses.replace(cfg, method="carv"),
            "baseline": dataclasses.replace(cfg, method="baseline", K=None, proposal=None, stratify=None,
                                            upstream=None, cost_ratio=None, probe_ratio=None,
                                            **baseline_lr_fields(cfg),
                                            **({} if equal_step else dict(steps=10**9, budget_s=None)))}
    trainers = {m: Trainer(c, out / m, problem) for m, c in cfgs.items()}
    metrics = {m: prepare_run(t) for m, t in trainers.items()}
    carv_t, base_t = trainers["carv"], trainers["baseline"]
    spend_baseline = equal_step and carv_t.alloc is not None and cfg.step_budget == "baseline"
    bar = progress_bar(None, progress, total=cfg.steps, initial=carv_t.step_count, desc="text-to-3d compare")

    def step(m: str, t: Trainer) -> None:
        b = base_t.plain_step_cost() if spend_baseline and m == "carv" else None
        if b is not None:  # carv's allocator spends the baseline's measured per-step cost
            carv_t.alloc.budget = b
        runner.advance(t, metrics[m])
        bar.update(m == "carv")
        bar.set_postfix(R=carv_t.R, K=carv_t.K, base_steps=base_t.step_count)

    for m, t in trainers.items():
        runner.start(t, metrics[m])
    # equal steps: the baseline first on ties; equal time: the baseline (no step limit) until it has used as much
    # training time as the finished carv run
    base_done = (lambda: base_t.done) if equal_step else (lambda: carv_t.done and base_t.elapsed >= carv_t.elapsed)
    runner.interleave(trainers, "step" if equal_step else "wall-clock", advance=step,
                      done=lambda m, t: base_done() if m == "baseline" else t.done,
                      order=["baseline", "carv"] if equal_step else ["carv", "baseline"])
    bar.close()
    finals = {m: runner.finish(t, metrics[m]) for m, t in trainers.items()}
    return _compare_outputs(out, cfg, problem, trainers, finals, compare_at, progress)


def _reading(res: dict, cfg: TextTo3DConfig, train_seconds: float, steps: int) -> str:
    """One :func:`equal_quality_ecm` result in words: the ratio, why there is none, or, where the curves have too
    few evaluations for the reading (:func:`carv.bench.quality.min_evaluations`), the interval that gives the
    shorter run (``train_seconds``, ``steps``) about twice the evaluations needed."""
    if not res["readable"]:
        need = min_evaluations(res["window"])
        if cfg.eval_every is not None:
            now, fix = f"{cfg.eval_every} steps", f"--eval-every {max(steps // (2 * need), 1)}"
        else:
            now = f"{cfg.eval_every_s:g} s of training"
            fix = f"--eval-every-s {eval_interval_for(train_seconds, res['window']):.1f}"
        return (f"not read: {min(res['evaluations'])} evaluations, the reading needs {need} (evaluations come every "
                f"{now}; rerun with --fresh {fix})")
    return f"{res['ecm']:.2f}x" if res["ecm"] is not None else res["note"]


def _compare_outputs(out: Path, cfg: TextTo3DConfig, problem: SceneProblem, trainers: dict[str, Trainer],
                     finals: dict[str, dict], compare_at: str, progress: bool) -> dict:
    """The comparison's pictures (each run's, the turntables side by side, quality against steps and seconds),
    its summary.json (the equal-quality ratios) and the console lines."""
    equal_step = compare_at == "step"
    carv_t, base_t = trainers["carv"], trainers["baseline"]
    for m, t in trainers.items():
        write_run_outputs(t, m)
    gt = turntable(problem, None)
    save_image_grid([gt, turntable(problem, base_t.grid), turntable(problem, carv_t.grid)],
                    ["ground truth", f"baseline\n{base_t.step_count} steps", f"carv\n{carv_t.step_count} steps"],
                    out / "turntables.png",
                    title=(f"{problem.prompt!r} at equal per-step compute, {carv_t.step_count} steps each "
                           f"({base_t.elapsed:.0f} s baseline, {carv_t.elapsed:.0f} s carv)" if equal_step else
                           f"{problem.prompt!r} at equal training time ({carv_t.elapsed:.0f} s each)"),
                    col_names=[f"az {int(a)}" for a in torch.arange(8) * 45])
    curves = {"baseline (uniform, K=1)": base_t.evals,
              "carv (allocator, learned q, strata, lattice cameras)": carv_t.evals}
    for x, name in (("step", "steps"), ("elapsed_s", "seconds")):
        plot_quality_curves(curves, out / f"quality_vs_{name}.png",
                            f"{problem.prompt!r}: held-out quality vs training {name}", x=x)
    keys = ("psnr", "iou") + (("psnr_ref", "iou_ref") if cfg.reference is not None else ())
    ecm_q = {k: equal_quality_ecm(base_t.evals, carv_t.evals, k) for k in keys}
    steps_q = {k: equal_quality_ecm(base_t.evals, carv_t.evals, k, x="step") for k in keys}
    step_s = {m: t.elapsed / max(t.step_count, 1) for m, t in trainers.items()}
    a = carv_t.alloc
    R_final, K_final = a.base if a is not None else (carv_t.R, carv_t.K)  # the chosen pair, without its mix
    summary = {"command": "carv text-to-3d --compare", "compare_at": compare_at, "prompt": problem.prompt,
               "seed": cfg.seed,
               "train_seconds": {m: t.elapsed for m, t in trainers.items()}, "seconds_per_step": step_s,
               "steps": {m: t.step_count for m, t in trainers.items()}, "final": finals,
               "ecm_equal_quality": ecm_q, "steps_ratio_equal_quality": steps_q, "R_final": R_final,
               "K_final": K_final, "mix_final": a.mix if a is not None else None,
               "allocator_history": a.history if a is not None else None,
               "machine": machine_info(loadavg=loadavg())}
    atomic_write_json(out / "summary.json", summary)
    if progress:
        for m in METHODS:
            f = finals[m]
            print(f"{m:>8}: {trainers[m].step_count:5d} steps, PSNR {f['psnr']:.2f} dB, mask IoU {f['iou']:.3f}")
        print(f"seconds per step: baseline {step_s['baseline']:.3f}, carv {step_s['carv']:.3f} "
              f"(carv at R = {carv_t.R}, K = {carv_t.K})")
        shortest = min(trainers.values(), key=lambda t: t.step_count)
        for label, res in (("steps", steps_q["psnr"]), ("seconds", ecm_q["psnr"])):
            if label == "seconds" and not res["readable"]:  # the same curves: said once, on the steps line
                continue
            print(f"baseline / carv {label} to the baseline's final PSNR: "
                  f"{_reading(res, cfg, shortest.elapsed, shortest.step_count)}")
        print(f"run folder: {out}")
    return summary
