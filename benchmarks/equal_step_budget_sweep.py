"""Equal per-step compute, measured as a user buys it: the shortest run that reaches the baseline's quality (issue 12).

    PYTHONPATH=src nice -n 10 python3 benchmarks/equal_step_budget_sweep.py --root runs/budget [--lane 0/2]
    PYTHONPATH=src python3 benchmarks/equal_step_budget_sweep.py --root runs/budget --report [--json FILE]

Why a second measure. ``benchmarks/equal_step_reference.py`` reads "steps to the baseline's final quality" off
one 400-step run of each estimator. The objective's schedule is indexed by the step, not by the run's length:
the timestep range narrows from ``U[0.02, 0.98] T`` to ``U[0.02, 0.4] T`` over ``anneal_steps = 200`` steps, and
the details only form once it has. Inside one run no estimator, however low its variance, can show a result that
the schedule only reaches at step 200 any earlier than step 200, so that reading measures the schedule as much as
the estimator. A user who wants the same result sooner asks for a shorter run instead, and the schedule comes with
it. Here every run of ``S`` steps keeps the default schedule's shape: ``anneal_steps = S * 200 / 400`` (everything
else is the CLI's default).

The sweep: for each prompt, seed and length ``S`` in ``--lengths`` (default 100, 160, 250, 400), one
``carv text-to-3d --compare`` run (equal per-step compute: carv's allocator spends the baseline's measured
per-step cost; both at the default learning rate, one rule for both) of ``S`` steps into
``<root>/<prompt>-s<seed>-S<S>``, one thread, resumable (a finished run is read back, an interrupted one
resumes from its checkpoint). ``--lane i/n`` runs every n-th job, so that two processes share the list.

The report (:func:`carv.bench.text_to_3d.equal_step_budget_sweep`): per prompt, seed and metric (psnr, iou
against the ground truth), each estimator's final quality against ``S`` is a curve; the target is the
baseline's final quality at the longest ``S``; each estimator's steps to it are the first crossing of its
curve, linear between lengths. A carv curve that never reaches the target enters at the longest ``S`` (its
bound), so the ratios are upper bounds where any pair is unreached. Seconds are steps times each estimator's
pooled median seconds per step; the per-run wall-clock ratio is kept beside it as a check. The lengths,
prompts, seeds and the rule were fixed before the first run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

PROMPTS = ("a red mushroom", "a yellow rubber duck", "a green tree", "a blue table", "an orange traffic cone")
LENGTHS = (100, 160, 250, 400)
SEEDS = (0, 1, 2)
METRICS = ("psnr", "iou")


def jobs(prompts, seeds, lengths) -> list[tuple[str, int, int]]:
    return [(p, s, n) for p in prompts for s in seeds for n in lengths]


def run_dir(root: Path, prompt: str, seed: int, length: int, prefix: str = "") -> Path:
    """``<root>/<prefix><prompt>-s<seed>-S<length>``: the folder of one run of the sweep (and of the oracle's)."""
    from carv.apps.text_to_3d import slug

    return root / f"{prefix}{slug(prompt)}-s{seed}-S{length}"


def scaled_config(prompt: str, seed: int, length: int, threads: int = 1, **fields):
    """The app's defaults for a run of ``length`` steps with the schedule's shape kept (``anneal_steps`` scaled
    as ``length * 200 / 400``); ``fields`` override others (the oracle's ``R`` and ``K``)."""
    from carv.apps.text_to_3d import TextTo3DConfig

    base = TextTo3DConfig()
    anneal = max(1, round(length * base.anneal_steps / base.steps))
    return TextTo3DConfig(prompt=prompt, seed=seed, steps=length, anneal_steps=anneal, threads=threads, **fields)


def run_one(root: Path, prompt: str, seed: int, length: int, threads: int = 1, **fields) -> dict:
    from carv.bench.compare import compare_text_to_3d

    out = run_dir(root, prompt, seed, length)
    done = out / "summary.json"
    if done.exists():
        sm = json.loads(done.read_text())
        if sm.get("steps", {}).get("carv") == length and sm.get("steps", {}).get("baseline") == length:
            return sm
    cfg = scaled_config(prompt, seed, length, threads, **fields)
    return compare_text_to_3d(prompt, out, cfg, progress=False)


def report(root: Path, lengths=LENGTHS, seeds=None) -> dict:
    from carv.bench.text_to_3d import equal_step_budget_sweep

    summaries = [json.loads(f.read_text()) for f in sorted(root.glob("*/summary.json"))]
    summaries = [sm for sm in summaries if sm.get("compare_at") == "step"
                 and (seeds is None or sm.get("seed") in seeds)]
    return equal_step_budget_sweep(summaries, METRICS, lengths)


def markdown(res: dict) -> str:
    """The per-(prompt, seed) table of BENCHMARKS.md from the report."""
    pairs = res["pairs"]
    lengths = pairs[0]["lengths"] if pairs else []
    head = " / ".join(str(n) for n in lengths)
    lines = [f"| prompt, seed | metric | baseline final at S = {head} | carv final at S = {head} | baseline / carv "
             "steps to the target | ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for p in pairs:
        fmt = (lambda v: f"{v:.2f}") if p["metric"] == "psnr" else (lambda v: f"{v:.3f}")
        lines.append(f"| {p['prompt']}, {p['seed']} | {p['metric']} | {' / '.join(map(fmt, p['final']['baseline']))} "
                     f"| {' / '.join(map(fmt, p['final']['carv']))} | {p['baseline_steps']:.0f} / "
                     f"{p['carv_steps']:.0f}{'' if p['reached'] else ' (never)'} | "
                     f"{p['baseline_steps'] / p['carv_steps']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="runs/budget")
    ap.add_argument("--prompts", default=None, help="'|'-separated prompts (default: the five of issue 12)")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--lane", default="0/1", help="i/n: run every n-th job starting at i")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="read the finished runs and print (or --json) the pairs")
    ap.add_argument("--json", default=None, help="with --report: write the result as FILE's KEY entry")
    ap.add_argument("--entry", default="equal_step_compute_budget_sweep")
    ap.add_argument("--allocator", choices=("default", "fill-budget"), default="default",
                    help="fill-budget: the allocator re-reads live stage costs and spends the whole plain step's "
                         "budget (carv text-to-3d --live-costs --fill-budget)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if args.report:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
            lengths = sorted(int(x) for x in args.lengths.split(","))
        except ValueError:
            ap.error("--seeds, --lengths: expected comma-separated integers")
        res = report(root, lengths, seeds)
        cmd = shlex.join(argv if argv is not None else sys.argv[1:])
        res["command"] = f"PYTHONPATH=src python3 benchmarks/equal_step_budget_sweep.py {cmd}"
        brief = {k: v for k, v in res.items() if k != "pairs"}
        print(json.dumps(brief, indent=1))
        print(markdown(res))
        if args.json:
            from carv._runfolder import update_json

            update_json(args.json, {args.entry: res}, "--json")
        return
    try:
        lane, n_lanes = (int(x) for x in args.lane.split("/"))
        assert 0 <= lane < n_lanes
    except (ValueError, AssertionError):
        ap.error(f"--lane: expected i/n with 0 <= i < n, got {args.lane!r}")
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
        lengths = sorted(int(x) for x in args.lengths.split(","))
        assert lengths and min(lengths) > 0
    except (ValueError, AssertionError):
        ap.error("--seeds, --lengths: expected comma-separated positive integers")
    prompts = args.prompts.split("|") if args.prompts else PROMPTS
    import torch

    torch.set_num_threads(args.threads)
    # fill-budget: as measured in docs/text_to_3d_bench.json, integer pairs only
    fields = {"live_costs": True, "fill_budget": True, "mix_pairs": False} if args.allocator == "fill-budget" else {}
    for i, (prompt, seed, length) in enumerate(jobs(prompts, seeds, lengths)):
        if i % n_lanes != lane:
            continue
        sm = run_one(root, prompt, seed, length, args.threads, **fields)
        f = sm["final"]
        print(json.dumps({"prompt": prompt, "seed": seed, "S": length, "R": sm["R_final"], "K": sm["K_final"],
                          "base": [round(f["baseline"]["psnr"], 2), round(f["baseline"]["iou"], 3)],
                          "carv": [round(f["carv"]["psnr"], 2), round(f["carv"]["iou"], 3)],
                          "s_per_step": sm["seconds_per_step"]}), flush=True)


if __name__ == "__main__":
    main()
