"""Where the mushroom's stem goes during the optimisation (issue 13 diagnostic): density and colour by region.

    PYTHONPATH=src python3 benchmarks/text_to_3d_stem_trace.py OUT.jsonl [--every N] [--set key=value ...]

Trains the main job's default configuration (``--set`` overrides a :class:`carv.apps.text_to_3d.TextTo3DConfig`
field; one thread, no run folder) and every ``N`` steps (default 25) appends one JSON line with the mean
activated density and the density-weighted mean colour of the grid's voxels in three regions taken from the
ground truth baked at the grid's resolution: ``stem`` (ground-truth solid, below the cap's base z < 0; its part
below the learned cap's usual floor, z < -0.3: ``lower_stem``),
``cap`` (ground-truth solid, z >= 0) and ``under`` (ground-truth empty, below the cap's rim: z in (-0.7, -0.05),
radius 0.3-0.75 from the axis: what the learned cap grows into), plus the held-out PSNR / mask IoU at the end.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from text_to_3d_tuning import parse_overrides  # this folder: the scripts run as benchmarks/<name>.py

from carv.apps.text_to_3d import TextTo3DConfig, Trainer
from carv.render import VoxelGrid


@torch.no_grad()
def region_stats(grid: VoxelGrid, regions: dict[str, torch.Tensor]) -> dict:
    sigma = grid.activate_density(grid.density[0, 0])
    col = grid.activate_color(grid.color[0])  # [3, D, D, D]
    out = {}
    for name, m in regions.items():
        s = sigma[m]
        c = (col[:, m] * s).sum(-1) / s.sum().clamp_min(1e-9)
        out[name] = {"density": round(float(s.mean()), 3), "color": [round(float(v), 3) for v in c]}
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TextTo3DConfig(threads=1, **parse_overrides(args.set))
    tr = Trainer(cfg, None)
    D = tr.grid.resolution
    gt = VoxelGrid.from_field(tr.problem.scene, D)
    c = gt.voxel_centers()
    solid = gt.density[0, 0] > 1.0
    rad = c[..., :2].norm(dim=-1)
    z = c[..., 2]
    regions = {"stem": solid & (z < 0), "lower_stem": solid & (z < -0.3), "cap": solid & (z >= 0),
               "under": ~solid & (z > -0.7) & (z < -0.05) & (rad > 0.3) & (rad < 0.75)}
    with open(args.out, "w") as f:
        while True:
            if tr.step_count % args.every == 0 or tr.done:
                row = {"step": tr.step_count, **region_stats(tr.grid, regions)}
                if tr.done:
                    row.update(tr.problem.evaluate(tr.grid))
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(json.dumps(row), flush=True)
            if tr.done:
                break
            tr.step()


if __name__ == "__main__":
    main(sys.argv[1:])
