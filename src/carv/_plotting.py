"""One labelled image grid for every PNG of images carv writes (teacher samples, turntables, comparisons).

matplotlib (a declared dependency) draws it; it is imported lazily with the Agg backend so that importing
carv never opens a display or pays matplotlib's import time.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from carv._runfolder import save_figure

__all__ = ["save_image_grid"]


def save_image_grid(rows: list[Tensor], row_names: list[str], path: str | Path, col_names: list[str] | None = None,
                    title: str | None = None, value_range: tuple[float, float] = (0.0, 1.0), cell: float = 1.2,
                    dpi: int = 110, fontsize: float = 7, left: float = 0.14) -> None:
    """Save a grid: ``rows[i]`` is ``[ncol, 3, H, W]`` with values in ``value_range``, row labels on the left,
    optional column titles and suptitle. ``cell`` is the size of one image in inches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows or len(rows) != len(row_names):
        raise ValueError(f"rows, row_names: expected the same non-zero number of rows, got {len(rows)} and "
                         f"{len(row_names)}")
    lo, hi = value_range
    nrow, ncol = len(rows), rows[0].shape[0]
    if col_names is not None and len(col_names) != ncol:
        raise ValueError(f"col_names: expected {ncol} names (one per column), got {len(col_names)}")
    fig, axs = plt.subplots(nrow, ncol, figsize=(cell * ncol + 1.2, cell * nrow + 0.5), dpi=dpi, squeeze=False)
    for r, imgs in enumerate(rows):
        for c in range(ncol):
            ax = axs[r, c]
            img = ((imgs[c].detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and col_names:
                ax.set_title(col_names[c], fontsize=fontsize)
            if c == 0:
                ax.set_ylabel(row_names[r], fontsize=fontsize, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=fontsize + 1)
    fig.subplots_adjust(left=left, right=0.99, top=0.86 if title else 0.95, bottom=0.02, wspace=0.04, hspace=0.08)
    save_figure(fig, path)
    plt.close(fig)
