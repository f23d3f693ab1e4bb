"""The README's main-job figure: ground-truth turntable above the learned ones of tuning run folders.

    PYTHONPATH=src python3 benchmarks/text_to_3d_main_job_figure.py OUT.png LABEL=RUN_FOLDER ...

Each run folder is one written by ``carv text-to-3d`` or ``benchmarks/text_to_3d_tuning.py`` (its latest
checkpoint is rendered at elevation 20, as ``turntable.png`` is; the label gets its final held-out PSNR/IoU).
"""

import sys
from pathlib import Path

import torch

from carv._plotting import save_image_grid
from carv.apps.text_to_3d import DEFAULT_PROMPT, SceneProblem, load_run_grid, turntable


def main(out: str, runs: list[str]) -> None:
    torch.set_num_threads(1)
    problem = SceneProblem(DEFAULT_PROMPT, n_eval_views=1)
    rows, names = [turntable(problem, None)], ["ground truth"]
    for item in runs:
        label, _, folder = item.partition("=")
        grid, meta = load_run_grid(Path(folder), "runs")  # the newest checkpoint that verifies, read-only
        ev = meta["evals"][-1]
        rows.append(turntable(problem, grid))
        names.append(f"{label}\n{ev['psnr']:.2f} dB, IoU {ev['iou']:.3f}")
    save_image_grid(rows, names, out, title=f"{DEFAULT_PROMPT!r}: turntable at elevation 20 (held-out PSNR / mask IoU)",
                    col_names=[f"az {int(a)}" for a in torch.arange(8) * 45])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
