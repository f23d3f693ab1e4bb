"""A text-to-3D run's pictures: turntables, held-out comparisons, quality curves, K and the proposal."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from carv._plotting import save_image_grid
from carv._runfolder import save_figure
from carv.apps.text_to_3d.problem import SceneProblem
from carv.apps.text_to_3d.trainer import Trainer
from carv.render import VoxelGrid, render, turntable_cameras
from carv.teachers.scenes import BACKGROUND, RENDER_SETTINGS

__all__ = ["turntable", "plot_quality_curves", "plot_run_diagnostics", "write_run_outputs"]

@torch.no_grad()
def turntable(problem: SceneProblem, grid: VoxelGrid | None, n: int = 8, elevation: float = 20.0) -> Tensor:
    """``[n, 3, S, S]`` in [0, 1] turntable views of ``grid`` (or of the ground truth when ``grid`` is None)."""
    cams = turntable_cameras(n, elevation, problem.radius, problem.fov)
    S = problem.render_size
    if grid is None:
        rs = RENDER_SETTINGS
        return render(problem.scene.bake(rs["bake_resolution"]), cams, S, bound=problem.scene.aabb,
                      n_samples=rs["n_samples"] * S // problem.image_size, background=BACKGROUND).rgb
    return render(grid, cams, S, n_samples=problem.n_samples, bound=grid.bound, background=BACKGROUND).rgb


def plot_quality_curves(curves: dict[str, list[dict]], path: str | Path, title: str = "", x: str = "elapsed_s") -> None:
    """PSNR and mask IoU against training seconds (``x="elapsed_s"``) or optimisation steps (``x="step"``),
    one line per run (``curves[name]`` = eval rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for i, (name, rows) in enumerate(curves.items()):
        xs = [r[x] for r in rows]
        for ax, key in zip(axs, ("psnr", "iou"), strict=True):
            ax.plot(xs, [r[key] for r in rows], "o-", ms=3, color=f"C{i}", label=name)
    axs[0].set_ylabel("PSNR on 16 held-out views (dB)")
    axs[1].set_ylabel("mask IoU on 16 held-out views")
    for ax in axs:
        ax.set_xlabel("training seconds (render + teacher + backward + optimiser)" if x == "elapsed_s"
                      else "optimisation steps")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_run_diagnostics(trainer: Trainer, steps: list[dict], path: str | Path) -> None:
    """K chosen by the accountant against step, and the timestep proposal against the objective's ``p``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    if steps:
        axs[0].step([r["step"] for r in steps], [r["K"] for r in steps], where="post")
    axs[0].set_xlabel("step")
    axs[0].set_ylabel("K (draws per render)")
    axs[0].set_title("K used per step" + (" (accountant)" if trainer.alloc is not None else ""), fontsize=9)
    axs[0].grid(True, alpha=0.3)
    s = trainer.sds.sampler
    T = s.num_timesteps
    axs[1].plot(range(T), (s.p * T).numpy(), label="p (objective: uniform)", color="grey")
    w = trainer.problem.w
    axs[1].plot(range(T), (0.9 * w / w.sum() * T + 0.1).numpy(), label="q ~ p w (weight, floor 0.1)", ls="--")
    axs[1].plot(range(T), (s.q * T).numpy(), label="q used now", color="C3")
    axs[1].set_xlabel("timestep t")
    axs[1].set_ylabel("density x T")
    axs[1].set_title("timestep proposal", fontsize=9)
    axs[1].legend(fontsize=7)
    axs[1].grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_run_outputs(trainer: Trainer, title: str) -> None:
    """A finished run's pictures: turntable, held-out comparison, quality curve, K and proposal."""
    out, p = trainer.out, trainer.problem
    tt = turntable(p, trainer.grid)
    ev = trainer.evals[-1]
    save_image_grid([turntable(p, None), tt], ["ground truth", f"{trainer.cfg.method}\n{trainer.step_count} steps"],
                    out / "turntable.png",
                    title=f"{p.prompt!r}: {title}, turntable (elevation 20); held-out PSNR {ev['psnr']:.2f} dB, "
                    f"mask IoU {ev['iou']:.3f}",
                    col_names=[f"az {int(a)}" for a in torch.arange(8) * 45])
    with torch.no_grad():
        x, op = p.render(trainer.grid, p.eval_cameras)
    n = min(8, x.shape[0])
    rows = [p.gt_rgb[:n], ((x + 1) / 2)[:n], p.gt_opacity[:n].expand(-1, 3, -1, -1), op[:n].expand(-1, 3, -1, -1)]
    save_image_grid(rows, ["ground truth", "learned", "GT mask", "learned mask"], out / "comparison.png",
                    title=f"{p.prompt!r} ({trainer.cfg.method}), held-out views at 32 px: PSNR {ev['psnr']:.2f} dB "
                    f"(16 views), mask IoU {ev['iou']:.3f}")
    plot_quality_curves({trainer.cfg.method: trainer.evals}, out / "quality_vs_time.png",
                        f"{p.prompt!r}: quality on held-out views vs training time")
    steps = [r for r in trainer.state.rows if r.get("kind") == "step"]
    plot_run_diagnostics(trainer, steps, out / "k_and_proposal.png")
