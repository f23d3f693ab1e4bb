"""The variance ceiling of equal per-step compute: how many fewer steps a much lower-variance gradient buys (issue 12).

    PYTHONPATH=src nice -n 10 python3 benchmarks/equal_step_ceiling.py --root runs/oracle \
        --compare-root runs/ceiling-compare --eval-every-s 2.5 [--prompts 'a red mushroom|a blue table'] [--seeds 0] \
        [--json docs/text_to_3d_bench.json]

Any unbiased estimator that spends the baseline's per-step compute has at least the variance of the best one
that spends far more. So run the objective with an *oracle* gradient: carv's own estimator (learned proposal,
per-render strata, lattice cameras) at ``R = 4`` renders and ``K = 16`` draws each, fixed (no allocator), the
app's defaults otherwise (400 steps, the same schedule and learning rate). By the allocator's components
(between-render ``b`` and within-render ``w`` per step, from the carv run of the same prompt and seed) its
per-step variance is ``b / 4 + w / 64`` against the ``R = 2, K = 1`` baseline's ``b / 2 + w / 2`` (a lower bound
for the baseline, whose uniform draws have more within-render variance): over 10x lower, at about 10x the cost
per step. Its steps to the baseline's final quality, read exactly as the ``equal_step_compute`` pairs are (the
smoothed first crossing of one 400-step run, :func:`carv.bench.quality.equal_quality_ecm` with ``x="step"``; the
oracle's curve is read at the baseline's evaluation steps, so that the 3-evaluation smoothing spans the same
steps on both), bound
what *any* estimator at equal per-step compute can show on this objective, carv's included. With
``--lengths 160`` the oracle also runs 160-step runs with the schedule scaled (``anneal_steps`` 80), which bounds
the run-length measure of ``benchmarks/equal_step_budget_sweep.py`` (a 2.5x target means reaching the baseline's
400-step quality in 160 steps).

The baseline (and carv) curves are the ``--compare`` runs of ``--compare-root`` (``<prompt>-s<seed>-S400``, the
budget sweep's layout; missing ones are run). The reading needs dense curves: evaluations come every
``eval_every_s`` seconds of training (the app's 20 s gives 3-4 evaluations in 400 steps on a fast machine, and a
3-evaluation average over them moves the figure by itself), so the compare runs this makes take ``--eval-every-s``,
and a compare run with fewer than ``carv.bench.quality.min_evaluations()`` (9) evaluations is refused. Every run
resumes; a finished one is read back. The oracle's R and K, the prompts, seeds and the reading rule were fixed before
its first run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import equal_step_budget_sweep as sweep  # noqa: E402  (the sweep's run folders, layout and scaled schedule)

ORACLE = {"R": 4, "K": 16}


def _evals(folder: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if r.get("kind") == "eval"]


def _at_steps(rows: list[dict], steps: list[float], keys=("psnr", "iou")) -> list[dict]:
    """``rows`` (evaluations by step) linearly interpolated at ``steps``: the oracle, evaluated every few steps
    (its steps are slow and evaluations come every ``eval_every_s`` of training), read at the baseline's own steps,
    so that the 3-evaluation smoothing spans the same steps on both curves."""
    out = []
    for s in steps:
        lo = max((r for r in rows if r["step"] <= s), key=lambda r: r["step"])
        hi = min((r for r in rows if r["step"] >= s), key=lambda r: r["step"], default=lo)
        f = 0.0 if hi["step"] == lo["step"] else (s - lo["step"]) / (hi["step"] - lo["step"])
        out.append({"step": s, **{k: lo[k] + f * (hi[k] - lo[k]) for k in ("elapsed_s", *keys)}})
    return out


def _oracle_dir(root: Path, prompt: str, seed: int, length: int) -> Path:
    return sweep.run_dir(root, prompt, seed, length, prefix="oracle-")


def _oracle_run(root: Path, prompt: str, seed: int, length: int, threads: int) -> Path:
    from carv.apps.text_to_3d import run_text_to_3d

    out = _oracle_dir(root, prompt, seed, length)
    done = out / "summary.json"
    if not (done.exists() and json.loads(done.read_text()).get("steps") == length):
        run_text_to_3d(prompt, out, sweep.scaled_config(prompt, seed, length, threads, **ORACLE), progress=False)
    return out


def _compare_run(root: Path, prompt: str, seed: int, threads: int, **fields) -> Path:
    sweep.run_one(root, prompt, seed, 400, threads, **fields)
    return sweep.run_dir(root, prompt, seed, 400)


def _sparse(base: list[dict], carv: list[dict], folder: Path) -> str | None:
    """Why a compare run's curves are too sparse to read (None where they are not): fewer evaluations than
    :func:`carv.bench.quality.min_evaluations` (the oracle is read at the baseline's evaluation steps)."""
    from carv.bench.quality import eval_interval_for, min_evaluations

    need, n = min_evaluations(), min(len(base), len(carv))
    if n >= need:
        return None
    secs = json.loads((folder / "summary.json").read_text()).get("train_seconds", {})
    hint = f" (here about {eval_interval_for(min(secs.values())):.1f})" if secs else ""
    return (f"--compare-root: {str(folder)!r} has {n} evaluations in a 400-step run; the reading needs at least "
            f"{need} (evaluations come every eval_every_s seconds of training): run the compare runs into a fresh "
            f"--compare-root with a shorter --eval-every-s{hint}")


def _components(summary: dict, lo: int = 200) -> tuple[float, float] | None:
    """Mean between / within components of the carv run's allocator over steps >= ``lo`` (its logged re-choices)."""
    hist = [h for h in (summary.get("allocator_history") or []) if h.get("step", 0) >= lo
            and h.get("between") is not None and h.get("within") is not None]
    if not hist:
        return None
    return statistics.fmean(h["between"] for h in hist), statistics.fmean(h["within"] for h in hist)


def plot(curves: list[tuple[str, dict[str, list[dict]]]], path: Path) -> None:
    """One column per (prompt, seed): PSNR (top) and mask IoU (bottom) against steps for the baseline, carv and
    the oracle, the baseline's smoothed final as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from carv._runfolder import save_figure

    fig, axs = plt.subplots(2, len(curves), figsize=(2.9 * len(curves) + 0.6, 5.4), dpi=110, squeeze=False)
    styles = {"baseline (R=2, K=1)": ("C0", "o-"), "carv (equal per-step compute)": ("C1", "s-"),
              f"oracle (R={ORACLE['R']}, K={ORACLE['K']}, ~10x the compute)": ("C2", "-")}
    for j, (label, runs) in enumerate(curves):
        for (name, (color, fmt)), rows in zip(styles.items(), runs.values(), strict=True):
            for i, key in enumerate(("psnr", "iou")):
                axs[i, j].plot([r["step"] for r in rows], [r[key] for r in rows], fmt, ms=3, lw=1.2, color=color,
                               label=name)
        base = next(iter(runs.values()))
        for i, key in enumerate(("psnr", "iou")):
            target = sum(r[key] for r in base[-3:]) / len(base[-3:])
            axs[i, j].axhline(target, color="C0", ls="--", lw=0.8)
            axs[i, j].grid(True, alpha=0.3)
            axs[i, j].set_xlabel("optimisation steps")
        lo_psnr = min(r["psnr"] for rows in runs.values() for r in rows if r["step"] >= 50)
        axs[0, j].set_ylim(lo_psnr - 0.5, None)
        iou = [r["iou"] for rows in runs.values() for r in rows if r["step"] >= 50]
        axs[1, j].set_ylim(max(0.0, min(iou) - 0.02), min(1.0, max(iou) + 0.01))
        axs[0, j].set_title(label, fontsize=9)
    axs[0, 0].set_ylabel("PSNR, 16 held-out views (dB)")
    axs[1, 0].set_ylabel("mask IoU, 16 held-out views")
    axs[1, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Steps to the baseline's final quality (dashed): carv at equal per-step compute against an oracle "
                 "gradient with over 10x lower variance per step", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def markdown(res: dict) -> str:
    """The per-run table of BENCHMARKS.md from the result."""
    lines = ["| prompt, seed | baseline's final PSNR / IoU (smoothed) | oracle: steps ratio PSNR / IoU | carv: steps "
             "ratio PSNR / IoU | per-step variance, baseline over oracle / over carv (lower bounds) | seconds per "
             "step, oracle / baseline |", "| --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        m = r["metrics"]

        def ratio(key, who, m=m):
            v = m[key][f"{who}_ratio"]
            reached = m[key]["oracle_reached"] if who == "oracle" else m[key]["carv_steps"] is not None
            return f"{v:.2f}x" + ("" if reached else " (never reached)")
        vo = r.get("variance_ratio_baseline_over_oracle_lower_bound")
        vc = r.get("variance_ratio_baseline_over_carv_lower_bound")
        sp = r["seconds_per_step"]
        lines.append(f"| {r['prompt']}, {r['seed']} | {m['psnr']['target']:.2f} / {m['iou']['target']:.3f} | "
                     f"{ratio('psnr', 'oracle')} / {ratio('iou', 'oracle')} | {ratio('psnr', 'carv')} / "
                     f"{ratio('iou', 'carv')} | " + (f"{vo:.1f}x / {vc:.2f}x" if vo else "-")
                     + f" | {sp['oracle']:.2f} / {sp['baseline']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="runs/oracle")
    ap.add_argument("--compare-root", default="runs/budget")
    ap.add_argument("--prompts", default="a red mushroom", help="'|'-separated prompts")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--lengths", default="", help="also run the oracle at these scaled lengths (e.g. 160)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="read finished runs only")
    ap.add_argument("--eval-every-s", type=float, default=None,
                    help="seconds of training between evaluations in the compare runs this makes (default: the "
                         "app's 20; the oracle's are read at the baseline's evaluation steps)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--entry", default="equal_step_variance_ceiling")
    ap.add_argument("--plot", default=None, help="write the curves' figure here (PNG)")
    args = ap.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        ap.error("--seeds, --lengths: expected comma-separated integers")
    from carv.bench.quality import equal_quality_ecm
    from carv.bench.text_to_3d import geomean, log_spread

    if args.eval_every_s is not None and not args.eval_every_s > 0:
        ap.error(f"--eval-every-s: expected a positive number of seconds, got {args.eval_every_s}")
    fields = {} if args.eval_every_s is None else {"eval_every_s": args.eval_every_s}
    root, croot = Path(args.root), Path(args.compare_root)
    out, curves = [], []
    for prompt in args.prompts.split("|"):
        for seed in seeds:
            if args.report_only:
                o, c = _oracle_dir(root, prompt, seed, 400), sweep.run_dir(croot, prompt, seed, 400)
                if not ((o / "summary.json").exists() and (c / "summary.json").exists()):
                    continue
            else:
                o = _oracle_run(root, prompt, seed, 400, args.threads)
                c = _compare_run(croot, prompt, seed, args.threads, **fields)
            csum = json.loads((c / "summary.json").read_text())
            base, carv, oracle = _evals(c / "baseline"), _evals(c / "carv"), _evals(o)
            if (why := _sparse(base, carv, c)) is not None:
                ap.error(why)
            curves.append((f"{prompt!r}, seed {seed}", {"baseline": base, "carv": carv, "oracle": oracle}))
            oracle = _at_steps(oracle, [r["step"] for r in base])  # the same smoothing span as the baseline's
            row = {"prompt": prompt, "seed": seed, "oracle": dict(ORACLE), "metrics": {}}
            for key in ("psnr", "iou"):
                res_o = equal_quality_ecm(base, oracle, key, x="step")
                res_c = equal_quality_ecm(base, carv, key, x="step")
                row["metrics"][key] = {
                    "target": res_o["target"], "baseline_steps": res_o["t_base_s"],
                    "oracle_steps": res_o["t_method_s"], "oracle_reached": res_o["t_method_s"] is not None,
                    "oracle_ratio": (res_o["t_base_s"] / (res_o["t_method_s"] or oracle[-1]["step"])),
                    "carv_steps": res_c["t_method_s"],
                    "carv_ratio": res_c["t_base_s"] / (res_c["t_method_s"] or carv[-1]["step"]),
                    "oracle_final": res_o["method_final"], "carv_final": res_c["method_final"]}
                tr_o = equal_quality_ecm(base, oracle, key, x="step", align="trailing")
                tr_c = equal_quality_ecm(base, carv, key, x="step", align="trailing")
                row["metrics"][key]["trailing"] = {  # the reading before the centred average (its delay: see there)
                    "oracle_ratio": tr_o["t_base_s"] / (tr_o["t_method_s"] or oracle[-1]["step"]),
                    "carv_ratio": tr_c["t_base_s"] / (tr_c["t_method_s"] or carv[-1]["step"])}
            comp = _components(csum)
            if comp is not None:
                b, w = comp
                row["components_steps_200_400"] = {"between": b, "within": w}
                row["variance_ratio_baseline_over_oracle_lower_bound"] = (b / 2 + w / 2) / (b / 4 + w / 64)
                row["variance_ratio_baseline_over_carv_lower_bound"] = ((b / 2 + w / 2)
                                                                        / (b / csum["R_final"]
                                                                           + w / (csum["R_final"] * csum["K_final"])))
            osum = json.loads((o / "summary.json").read_text())
            row["seconds_per_step"] = {"oracle": osum["train_seconds"] / osum["steps"], **csum["seconds_per_step"]}
            for n in lengths:
                if args.report_only and not (_oracle_dir(root, prompt, seed, n) / "summary.json").exists():
                    continue
                f = json.loads((_oracle_run(root, prompt, seed, n, args.threads) / "summary.json").read_text())
                row.setdefault("scaled_runs", {})[str(n)] = {"psnr": f["final"]["psnr"], "iou": f["final"]["iou"],
                                                             "reaches_baseline_400": {
                                                                 k: f["final"][k] >= csum["final"]["baseline"][k]
                                                                 for k in ("psnr", "iou")},
                                                             "baseline_400_final": {k: csum["final"]["baseline"][k]
                                                                                    for k in ("psnr", "iou")}}
            out.append(row)
            print(json.dumps({k: row[k] for k in ("prompt", "seed", "metrics")}), flush=True)
    ratios = [m["oracle_ratio"] for r in out for m in r["metrics"].values()]
    carv_r = [m["carv_ratio"] for r in out for m in r["metrics"].values()]

    def log_se(who):  # the standard error of the log ratio across (prompt, seed) runs, each run's metrics averaged
        return log_spread({(r["prompt"], r["seed"]): [m[f"{who}_ratio"] for m in r["metrics"].values()]
                           for r in out})[1]

    res = {"rule": "oracle = carv's estimator at R = 4, K = 16 fixed, app defaults; steps to the baseline's final "
                   "smoothed quality in one 400-step run (centred 3-evaluation average, the oracle read at the "
                   "baseline's evaluation steps); unreached at the run's end",
           "runs": out, "oracle_steps_ratio_geomean": geomean(ratios),
           "carv_steps_ratio_geomean_same_runs": geomean(carv_r),
           "trailing": {"oracle_steps_ratio_geomean": geomean([m["trailing"]["oracle_ratio"] for r in out
                                                          for m in r["metrics"].values()]),
                        "carv_steps_ratio_geomean_same_runs": geomean([m["trailing"]["carv_ratio"] for r in out
                                                                  for m in r["metrics"].values()])},
           "oracle_log_se_across_runs": log_se("oracle"), "carv_log_se_across_runs": log_se("carv"),
           "n_pairs": len(ratios),
           "n_oracle_unreached": sum(not m["oracle_reached"] for r in out for m in r["metrics"].values()),
           "command": "PYTHONPATH=src python3 benchmarks/equal_step_ceiling.py "
                      + shlex.join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    print(markdown(res))
    if args.plot and curves:
        plot(curves, Path(args.plot))
    if args.json:
        from carv._runfolder import update_json

        update_json(args.json, {args.entry: res}, "--json")


if __name__ == "__main__":
    main()
