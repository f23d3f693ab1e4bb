"""Why the main job misses the mushroom's stem: three quick diagnostics (issue 13).

    PYTHONPATH=src python3 benchmarks/text_to_3d_diagnostics.py OUT_DIR [RUN_FOLDER]

1. **Ceiling**: the ground truth's own density and colour stored in a ``D^3`` grid and rendered by the
   training renderer at the main job's settings (64 px, 48 samples per ray, resized to 32 px): the best
   held-out PSNR / mask IoU this representation and renderer allow, for ``D`` = 32, 48, 64.
2. **Teacher pull**: the teacher's one-step predictions ``x0 = (x_t - s_t eps_hat) / a_t`` (guidance 3,
   averaged over 16 noises) from renders of ``RUN_FOLDER``'s latest grid at ``t`` = 100, 200, 300, front
   and side views, beside the render and the ground truth (``teacher_x0.png``); the mean brightness the
   predictions ask for in the ground truth's stem pixels against what the render has there.
3. **Gradient where the stem belongs**: the SDS gradient of one step (many draws) with respect to the
   grid's raw density and colour, summed over the voxels inside the ground-truth stem and over the same
   number of voxels of the cap, for the run's grid.

Writes ``diagnostics.json`` and ``teacher_x0.png`` into ``OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from carv._plotting import save_image_grid
from carv.apps.text_to_3d import DEFAULT_PROMPT, SceneProblem
from carv.render import VoxelGrid, cameras_from_angles


def load_grid(folder: Path) -> VoxelGrid:
    from carv.apps.text_to_3d import load_run_grid

    return load_run_grid(folder, "run")[0]


def main(out: str, run: str | None) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = SceneProblem(DEFAULT_PROMPT)
    res: dict = {"ceiling": {}}
    for D in ((32, 48, 64) if run is None else ()):
        g = VoxelGrid.from_field(p.scene, D)
        res["ceiling"][D] = p.evaluate(g)
        print("ceiling", D, res["ceiling"][D])
    if run is None:
        (out_dir / "diagnostics.json").write_text(json.dumps(res, indent=1))
        return
    grid = load_grid(Path(run))
    res["run"] = p.evaluate(grid)
    cams = cameras_from_angles(torch.tensor([0.0, 90.0]), torch.tensor([20.0, 20.0]), p.radius, p.fov)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x, _ = p.render(grid, cams)
        gt_x, _ = p.render(VoxelGrid.from_field(p.scene, 64), cams)
        # ground-truth stem pixels: where the stem alone (the scene without its cap) is visible in the GT
        stem_only = VoxelGrid.from_field(p.scene, 64)
        zc = stem_only.voxel_centers()[..., 2]
        cap = zc > 0.0
        stem_only.density[0, 0][cap] = 0.0
        _, stem_op = p.render(stem_only, cams)
        full_x, full_op = p.render(VoxelGrid.from_field(p.scene, 64), cams)
        # pixels where the stem shows: opaque in the stem-only render and the full render has the stem's colour there
        stem_x, _ = p.render(stem_only, cams)
        stem_mask = (stem_op[:, 0] > 0.5) & ((full_x - stem_x).abs().amax(1) < 0.05)
        cond = p.condition(cams)["cond"]
        rows, names = [(gt_x + 1) / 2, (x + 1) / 2], ["ground truth", "render"]
        res["stem_pixels"] = int(stem_mask.sum())
        res["render_stem_brightness"] = float(x.mean(1)[stem_mask].mean())
        res["gt_stem_brightness"] = float(gt_x.mean(1)[stem_mask].mean())
        res["x0_stem_brightness"] = {}
        for t_int in (100, 200, 300):
            t = torch.full((2,), t_int, dtype=torch.long)
            a, s = p.schedule.a(t).float().view(-1, 1, 1, 1), p.schedule.s(t).float().view(-1, 1, 1, 1)
            acc = torch.zeros_like(x)
            for _ in range(16):
                eps = torch.randn(x.shape, generator=gen)
                xt = a * x + s * eps
                e = p.teacher.guided_eps(xt, t, cond, 3.0)
                acc += (xt - s * e) / a
            x0 = (acc / 16).clamp(-1, 1)
            rows.append((x0 + 1) / 2)
            names.append(f"x0 at t={t_int}")
            res["x0_stem_brightness"][t_int] = float(x0.mean(1)[stem_mask].mean())
    save_image_grid(rows, names, out_dir / "teacher_x0.png", title="teacher one-step x0 from renders (az 0, 90)",
                    col_names=["az 0", "az 90"])
    # 3. gradient per voxel region
    zc = grid.voxel_centers()
    rad = zc[..., :2].norm(dim=-1)
    stem = (zc[..., 2] < -0.05) & (zc[..., 2] > -0.7) & (rad < 0.18)
    capv = (zc[..., 2] > 0.05) & (zc[..., 2] < 0.45) & (rad < 0.5)
    sds = p.sds(p.sampler("none", "none", 0.1, t_min=20, t_max=500), K=8)
    grid.zero_grad()
    p.gradient(grid, sds, 8, torch.Generator().manual_seed(1), elevation_range=(15.0, 25.0))
    gd, gc = grid.density.grad[0, 0], grid.color.grad[0]
    act_c = torch.sigmoid(grid.color.detach()[0])
    res["grad"] = {
        "stem_voxels": int(stem.sum()), "cap_voxels": int(capv.sum()),
        "density_grad_stem_mean": float(gd[stem].mean()), "density_grad_cap_mean": float(gd[capv].mean()),
        "density_grad_stem_abs": float(gd[stem].abs().mean()), "density_grad_cap_abs": float(gd[capv].abs().mean()),
        "color_grad_stem_abs": float(gc[:, stem].abs().mean()), "color_grad_cap_abs": float(gc[:, capv].abs().mean()),
        "stem_density_mean": float(grid.activate_density(grid.density.detach()[0, 0])[stem].mean()),
        "stem_color_mean": act_c[:, stem].mean(1).tolist(),
    }
    print(json.dumps(res, indent=1))
    (out_dir / "diagnostics.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
