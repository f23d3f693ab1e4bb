"""Is the mushroom's stem a point the objective keeps, or only one it does not reach? (issue 13 diagnostic)

    PYTHONPATH=src python3 benchmarks/text_to_3d_stem_insertion.py RUN_FOLDER STEPS [OUT_DIR]

Loads the newest checkpoint of a main-job run (``carv text-to-3d`` or ``benchmarks/text_to_3d_tuning.py``), and
continues it for ``STEPS`` steps of the default objective twice: as it is, and with the ground truth's stem copied
into the grid (density and colour of the voxels inside the stem's cylinder, z < 0, radius < 0.24, taken from the
scene baked at the grid's resolution). Prints held-out PSNR / mask IoU before and after each; writes both
turntables (``stem_<variant>.png``) to ``OUT_DIR`` (default ``runs/stem-insertion``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from carv._plotting import save_image_grid
from carv._runfolder import RunState
from carv.apps.text_to_3d import TextTo3DConfig, Trainer, problem_for, turntable
from carv.render import VoxelGrid


def main(run: str, steps: int, out: str = "runs/stem-insertion") -> None:
    torch.set_num_threads(1)
    tensors, _ = RunState(Path(run)).load()
    D = int(tensors["grid.density"].shape[-1])
    cfg = TextTo3DConfig(steps=steps, grid_resolution=D, seed=5, t_hi=0.4)  # the annealed range's final part
    problem = problem_for(cfg)
    gt = VoxelGrid.from_field(problem.scene, D)
    c = gt.voxel_centers()
    stem = (c[..., 2] < 0.0) & (c[..., 2] > -0.76) & (c[..., :2].norm(dim=-1) < 0.24)
    Path(out).mkdir(parents=True, exist_ok=True)
    for variant in ("as-is", "stem-inserted"):
        tr = Trainer(cfg, None, problem)
        with torch.no_grad():
            tr.grid.density.copy_(tensors["grid.density"])
            tr.grid.color.copy_(tensors["grid.color"])
            if variant == "stem-inserted":  # the ground truth's stem through the inverse of the grid's activations
                tr.grid.density[0, 0][stem] = tr.grid.raw_density(gt.density[0, 0][stem].clamp(1e-3, 500))
                tr.grid.color[0][:, stem] = tr.grid.raw_color(gt.color[0][:, stem].clamp(0.02, 0.98))
        e0 = tr.evaluate()
        while not tr.done:
            tr.step()
        e1 = tr.evaluate()
        print(f"{variant}: before {e0['psnr']:.2f} dB / IoU {e0['iou']:.3f}, after {steps} steps "
              f"{e1['psnr']:.2f} dB / IoU {e1['iou']:.3f}", flush=True)
        save_image_grid([turntable(problem, None), turntable(problem, tr.grid)], ["ground truth", variant],
                        Path(out) / f"stem_{variant}.png")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
