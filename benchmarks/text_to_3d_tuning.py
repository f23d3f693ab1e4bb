"""Experiment driver for the text-to-3D objective's settings (issue 13): one configuration per call.

    PYTHONPATH=src nice -n 10 python3 benchmarks/text_to_3d_tuning.py NAME [--prompt P] [--set key=value ...]

runs ``carv text-to-3d`` (in-process, one thread, the CLI's defaults unless ``--set`` overrides a
:class:`carv.apps.text_to_3d.TextTo3DConfig` field) into ``runs/tune/<name>/``, and appends one JSON line
to ``runs/tune/results.jsonl``: the overrides, the final held-out PSNR and mask IoU, the steps, and the
CPU time (user + sys) of the whole process, teacher loading and evaluations included -- what ``time``
reports for the command. Configurations are run one at a time (never two at once on the shared
machine); look at each run folder's ``turntable.png`` and ``comparison.png``.
"""

from __future__ import annotations

import argparse
import ast
import json
import resource
import sys
import time
from pathlib import Path


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def parse_overrides(items: list[str]) -> dict:
    """``["key=value", ...]`` -> ``{key: value}``, each value a Python literal where it parses as one (else the
    string): the ``--set`` flags of the text-to-3D experiment scripts."""
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a TextTo3DConfig field (Python literal value), repeatable")
    ap.add_argument("--root", default="runs/tune")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from carv.apps.text_to_3d import DEFAULT_PROMPT, TextTo3DConfig, run_text_to_3d

    overrides = parse_overrides(args.set)
    prompt = args.prompt or DEFAULT_PROMPT
    cfg = TextTo3DConfig(prompt=prompt, threads=args.threads, **overrides)
    torch.set_num_threads(args.threads)
    out = Path(args.root) / args.name
    w0 = time.perf_counter()
    summary = run_text_to_3d(prompt, out, cfg, restart=True, progress=False)
    row = {"name": args.name, "prompt": prompt, "overrides": overrides, "psnr": summary["final"]["psnr"],
           "iou": summary["final"]["iou"], "steps": summary["steps"], "train_s": summary["train_seconds"],
           "cpu_s": _cpu_seconds(), "wall_s": time.perf_counter() - w0, "K_final": summary["K_final"],
           "load": summary["machine"].get("loadavg")}
    with open(Path(args.root) / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
