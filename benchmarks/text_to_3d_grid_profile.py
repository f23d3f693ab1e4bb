"""Density and colour of a text-to-3d run's grid by height and distance from the vertical axis (issue 13).

    PYTHONPATH=src python3 benchmarks/text_to_3d_grid_profile.py RUN_FOLDER ...

For each run folder's newest checkpoint (read-only), prints one line per 0.1-high slab ``z in [z, z + 0.1)``: for
rings of radius 0-0.1, 0.1-0.2, 0.2-0.3, 0.3-0.4, 0.5-0.6 and 0.7-0.8 around the axis, the mean activated density and
(in brackets) the density-weighted mean red and green of the voxels there. The mushroom's stem is the column of
radius < 0.22 for z in (-0.75, 0); an opaque stem needs a density of about 10 there.
"""

import sys

import torch

from carv.apps.text_to_3d import load_run_grid


def main(runs: list[str]) -> None:
    for run in runs:
        g, _ = load_run_grid(run, "run")
        with torch.no_grad():
            sig, col = g.activate_density(g.density[0, 0]), g.activate_color(g.color[0])
        c = g.voxel_centers()
        rad = c[..., :2].norm(dim=-1)
        print(run)
        for zlo in [x / 10 for x in range(-8, 6)]:
            zm = (c[..., 2] >= zlo) & (c[..., 2] < zlo + 0.1)
            cells = []
            for rlo in (0, 0.1, 0.2, 0.3, 0.5, 0.7):
                m = zm & (rad >= rlo) & (rad < rlo + 0.1)
                s = sig[m]
                cc = (col[:, m] * s).sum(-1) / s.sum().clamp_min(1e-9)
                cells.append(f"{float(s.mean()):5.1f}({cc[0]:.2f},{cc[1]:.2f})")
            print(f"z {zlo:+.1f}: " + " ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
