"""Equal per-step compute against the objective's own long-run solution (issue 12), one prompt, several seeds.

    PYTHONPATH=src nice -n 10 python3 benchmarks/equal_step_reference.py PROMPT SEED [SEED ...] [--root runs/eqstep]

First a reference run (the plain estimator at R = 8, 300 steps: four times lower variance per step than the
R = 2 baseline, the objective's defaults otherwise) into ``<root>/ref-<prompt>``; then, per seed,
``carv text-to-3d --compare --reference <that run> --seed S`` (equal per-step compute, one thread, an
evaluation every 6 s of training) into ``<root>/cmp-<prompt>-s<S>``. Each compare summary carries the
steps (and seconds) each run needed to reach the baseline's final quality, against the ground truth (psnr,
iou) and against the reference solution (psnr_ref, iou_ref); ``carv.bench.text_to_3d.equal_step_compute``
turns them into pairs (unreached ones at their bound). Every run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prompt")
    ap.add_argument("seeds", type=int, nargs="+")
    ap.add_argument("--root", default="runs/eqstep")
    args = ap.parse_args(argv)

    import torch

    from carv.apps.text_to_3d import TextTo3DConfig, _slug, run_text_to_3d
    from carv.teachers.scenes import load_scenes_teacher

    torch.set_num_threads(1)
    teacher = load_scenes_teacher()
    root = Path(args.root)
    ref = root / f"ref-{_slug(args.prompt)}"
    base = TextTo3DConfig(prompt=args.prompt, threads=1, eval_every_s=6.0)
    if not (ref / "summary.json").exists():
        run_text_to_3d(args.prompt, ref, dataclasses.replace(base, method="baseline", R=8), progress=False,
                       teacher=teacher)
    for s in args.seeds:
        out = root / f"cmp-{_slug(args.prompt)}-s{s}"
        if (out / "summary.json").exists():
            continue
        sm = run_text_to_3d(args.prompt, out, dataclasses.replace(base, seed=s, reference=str(ref)), compare=True,
                            progress=False, teacher=teacher)
        print(f"seed {s}:", json.dumps({k: v.get("ecm") for k, v in sm["steps_ratio_equal_quality"].items()}))


if __name__ == "__main__":
    main()
