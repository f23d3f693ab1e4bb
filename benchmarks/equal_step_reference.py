"""Equal per-step compute against the objective's own long-run solution (issue 12), one prompt, several seeds.

    PYTHONPATH=src nice -n 10 python3 benchmarks/equal_step_reference.py PROMPT SEED [SEED ...] [--root runs/eqstep]

First a reference run (the plain estimator at R = 8, the default steps: four times lower variance per step than the
R = 2 baseline, the objective's defaults otherwise) into ``<root>/ref-<prompt>``; then, per seed,
``carv text-to-3d --compare --reference <that run> --seed S`` (equal per-step compute, one thread, an
evaluation every 6 s of training) into ``<root>/cmp-<prompt>-s<S>``. Each compare summary carries the
steps (and seconds) each run needed to reach the baseline's final quality, against the ground truth (psnr,
iou) and against the reference solution (psnr_ref, iou_ref); ``carv.bench.text_to_3d.equal_step_compute``
turns them into pairs (unreached ones at their bound). With ``--json FILE`` (e.g. docs/text_to_3d_bench.json)
the pairs, their geometric means, the per-seed geometric means with the standard error across seeds, the
reference's and each run's finals are written as FILE's ``equal_step_compute`` entry (its other keys, and that
entry's ``earlier`` / ``variance_sensitivity`` records, are kept). Every run resumes where it stopped.

With ``--lr-grid 0.05,0.1,0.2,0.4 --tune-seed T`` each estimator gets its own learning rate, tuned on the same
grid at a seed that is not measured: one ``--compare`` run per rate (both estimators at that rate) at seed
``T`` into ``<root>/tune-<prompt>-s<T>-lr<rate>``; each estimator's rate is the one with the best smoothed final
``--select`` metric (default psnr_ref: the distance to the objective's own solution) in its own runs. The
measured seeds then run ``--compare --lr <carv's> --baseline-lr <baseline's>`` into
``<root>/cmp-<prompt>-s<S>-lrtuned``; the JSON entry is ``equal_step_compute_lr_tuned`` (the tuning runs'
finals and the chosen rates recorded beside the pairs). The tuning runs' cost is paid by both estimators alike
and is not part of either's steps or seconds. ``--rates 0.2,0.05`` instead fixes the two rates in advance (e.g. the
ones another prompt's tuning chose) into ``<root>/cmp-<prompt>-s<S>-lr<carv>-<baseline>``; ``--entry KEY`` names
the JSON entry. ``--also PROMPT`` (repeatable) runs more prompts the same way (each its own reference, tuning and
seeds) and pools them into the one entry: pairs carry their prompt, the per-seed spread is then across (prompt,
seed) runs, and ``reference.per_prompt`` holds each prompt's reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def _per_seed(pairs: list[dict], base: str, carv: str) -> dict:
    """Geometric mean of each seed's ratios (``base / carv``) and the standard error of their log across seeds
    (across (prompt, seed) runs when the pairs pool several prompts)."""
    from carv.bench.text_to_3d import log_spread

    groups: dict = {}
    pooled = len({p["prompt"] for p in pairs}) > 1  # several prompts: one group per (prompt, seed)
    for p in pairs:
        if p[base] and p[carv]:
            key = f"{p['prompt']} s{p['seed']}" if pooled else p["seed"]
            groups.setdefault(key, []).append(p[base] / p[carv])
    g, se = log_spread(groups)
    return {"per_seed_geomean": {str(s): v for s, v in g.items()}, "log_se_across_seeds": se}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prompt")
    ap.add_argument("seeds", type=int, nargs="+")
    ap.add_argument("--also", action="append", default=[], metavar="PROMPT",
                    help="another prompt, run the same way (its own reference, tuning and seeds) and pooled into the "
                         "same entry; repeatable")
    ap.add_argument("--root", default="runs/eqstep")
    ap.add_argument("--eval-every-s", type=float, default=6.0,
                    help="seconds of training between evaluations (the reading needs 9 or more per run)")
    ap.add_argument("--json", default=None, help="write the equal_step_compute entry into this JSON file")
    ap.add_argument("--lr-grid", default=None, help="comma-separated learning rates: tune each estimator's on it")
    ap.add_argument("--tune-seed", type=int, default=None, help="the seed the rates are tuned at (not measured)")
    ap.add_argument("--select", default="psnr_ref", choices=("psnr_ref", "iou_ref", "psnr", "iou"),
                    help="the smoothed final metric a rate is chosen by")
    ap.add_argument("--rates", default=None, metavar="CARV,BASELINE",
                    help="fixed learning rates (e.g. the ones another prompt's --lr-grid chose), no tuning")
    ap.add_argument("--entry", default=None, help="the JSON key to write (default equal_step_compute, or "
                                                  "equal_step_compute_lr_tuned with --lr-grid)")
    args = ap.parse_args(argv)
    def rates(text: str, flag: str, what: str) -> list[float]:
        try:
            out = [float(x) for x in text.split(",")]
        except ValueError:
            out = []
        if not out or min(out) <= 0:
            ap.error(f"{flag}: expected {what}, got {text!r}")
        return out

    fixed = None
    if args.rates is not None:
        fixed = rates(args.rates, "--rates", "two positive numbers CARV,BASELINE")
        if len(fixed) != 2:
            ap.error(f"--rates: expected two positive numbers CARV,BASELINE, got {args.rates!r}")
        if args.lr_grid is not None:
            ap.error("--rates, --lr-grid: give fixed rates or a grid to tune on, not both")
    if not args.eval_every_s > 0:
        ap.error(f"--eval-every-s: expected a positive number of seconds, got {args.eval_every_s}")
    grid = None
    if args.lr_grid is not None:
        grid = sorted(set(rates(args.lr_grid, "--lr-grid", "comma-separated positive numbers")))
        if args.tune_seed is None or args.tune_seed in args.seeds:
            ap.error("--tune-seed: with --lr-grid give a seed that is not among the measured seeds")

    import torch

    from carv._runfolder import read_json, update_json
    from carv.apps.text_to_3d import TextTo3DConfig, run_text_to_3d, slug
    from carv.bench.compare import compare_text_to_3d
    from carv.bench.text_to_3d import equal_step_compute
    from carv.teachers.scenes import load_scenes_teacher

    torch.set_num_threads(1)
    teacher = load_scenes_teacher()
    root = Path(args.root)
    prompts = [args.prompt] + [p for p in args.also if p != args.prompt]

    def run_prompt(prompt: str) -> tuple[Path, list[dict], list[dict] | None, dict]:
        """One prompt's reference run, learning-rate tuning (with --lr-grid) and measured seeds."""
        ref = root / f"ref-{slug(prompt)}"
        base = TextTo3DConfig(prompt=prompt, threads=1, eval_every_s=args.eval_every_s)
        if not (ref / "summary.json").exists():
            run_text_to_3d(prompt, ref, dataclasses.replace(base, method="baseline", R=8), progress=False,
                           teacher=teacher)

        def compare(out: Path, cfg: TextTo3DConfig) -> dict:
            if (out / "summary.json").exists():
                return read_json(out / "summary.json", "compare summary")
            return compare_text_to_3d(prompt, out, cfg, progress=False, teacher=teacher)

        tuning, suffix, lrs = None, "", {}
        if grid is not None:
            tuning = []
            for lr in grid:
                sm = compare(root / f"tune-{slug(prompt)}-s{args.tune_seed}-lr{lr:g}",
                             dataclasses.replace(base, seed=args.tune_seed, reference=str(ref), lr=lr))
                q = sm["steps_ratio_equal_quality"][args.select]
                tuning.append({"lr": lr, "baseline": q["target"], "carv": q["method_final"],
                               "final": sm["final"]})
                print(f"{prompt!r} tuning lr {lr:g}: smoothed final {args.select} baseline {q['target']:.4f}, "
                      f"carv {q['method_final']:.4f}")
            lrs = {m: max(tuning, key=lambda r: r[m])["lr"] for m in ("carv", "baseline")}
            print(f"{prompt!r} chosen learning rates: {lrs}")
            suffix = "-lrtuned"
        elif fixed is not None:
            lrs = {"carv": fixed[0], "baseline": fixed[1]}
            suffix = f"-lr{fixed[0]:g}-{fixed[1]:g}"
        summaries = []
        for s in args.seeds:
            out = root / f"cmp-{slug(prompt)}-s{s}{suffix}"
            cfg = dataclasses.replace(base, seed=s, reference=str(ref))
            if lrs:
                cfg = dataclasses.replace(cfg, lr=lrs["carv"], baseline_lr=lrs["baseline"])
            done = (out / "summary.json").exists()
            sm = compare(out, cfg)
            summaries.append(sm)
            if not done:
                print(f"{prompt!r} seed {s}:",
                      json.dumps({k: v.get("ecm") for k, v in sm["steps_ratio_equal_quality"].items()}))
        return ref, summaries, tuning, lrs

    per_prompt = {p: run_prompt(p) for p in prompts}
    summaries = [sm for _, sms, _, _ in per_prompt.values() for sm in sms]
    _, _, tuning, lrs = per_prompt[args.prompt]
    steps = TextTo3DConfig().steps
    try:
        res = equal_step_compute(summaries)
    except ValueError as e:  # e.g. runs evaluated too few times for the reading: one line, naming the flag
        ap.error(f"{e} (--eval-every-s, into a fresh --root)")
    res["steps_spread"] = _per_seed(res["pairs"], "baseline_steps", "carv_steps")
    res["seconds_spread"] = _per_seed(res["pairs"], "baseline_seconds", "carv_seconds")
    print(json.dumps({k: res[k] for k in ("steps_ratio_geomean", "seconds_ratio_geomean", "n_pairs", "n_unreached",
                                          "steps_spread", "seconds_spread")}, indent=1))
    if args.json is None:
        return
    refs = {p: read_json(r / "summary.json", "reference summary") for p, (r, _, _, _) in per_prompt.items()}
    ref_sm = refs[args.prompt]
    res["command"] = ("PYTHONPATH=src python3 benchmarks/equal_step_reference.py " + json.dumps(args.prompt) + " "
                      + " ".join(map(str, args.seeds))
                      + ("" if args.root == "runs/eqstep" else f" --root {args.root}") + f" --json {args.json}"
                      + ("" if grid is None else f" --lr-grid {args.lr_grid} --tune-seed {args.tune_seed}"
                         f" --select {args.select}") + ("" if fixed is None else f" --rates {args.rates}")
                      + ("" if args.entry is None else f" --entry {args.entry}")
                      + "".join(f" --also {json.dumps(p)}" for p in prompts[1:]))
    if fixed is not None:
        res["rates"] = {"carv": fixed[0], "baseline": fixed[1], "rule": "fixed in advance (--rates)"}
    if len(prompts) > 1:
        res["prompts"] = prompts
    if tuning is not None and len(prompts) > 1:
        res["lr_tuning_per_prompt"] = {p: {"runs": t, "chosen": c} for p, (_, _, t, c) in per_prompt.items()}
    if tuning is not None:
        res["lr_tuning"] = {"grid": grid, "tune_seed": args.tune_seed, "select": args.select, "runs": tuning,
                            "chosen": lrs, "rule": "each estimator's rate with the best smoothed final "
                            f"{args.select} in its own runs at the tuning seed"}
    res["reference"] = {"config": f"baseline R=8 K=1, {steps} steps, the objective's defaults",
                        "final": ref_sm["final"], "train_seconds": ref_sm["train_seconds"]}
    if len(prompts) > 1:
        res["reference"]["per_prompt"] = {p: {"final": r["final"], "train_seconds": r["train_seconds"]}
                                          for p, r in refs.items()}
    res["runs"] = [{"prompt": sm["prompt"], "seed": sm["seed"], "final": sm["final"],
                    "seconds_per_step": sm["seconds_per_step"], "carv_R_K_final": [sm["R_final"], sm["K_final"]],
                    "machine": sm["machine"]} for sm in summaries]
    entry = args.entry or ("equal_step_compute" if grid is None else "equal_step_compute_lr_tuned")

    def entries(doc: dict) -> dict:
        old = doc.get(entry) or {}  # records this script does not make: kept as they are
        return {entry: res | {key: old[key] for key in ("earlier", "variance_sensitivity") if key in old}}

    update_json(args.json, entries, "benchmark JSON")


if __name__ == "__main__":
    main()
