"""Reproduction of the committed built-in assets (teacher and classifier weights, stats, sample grids).

An app: it wires the teacher recipes (:mod:`carv.teachers.digits`) and the digits metrics
(:mod:`carv.teachers.digits_metrics`) together into the reproduction of the committed files.
``carv train-teacher digits`` calls :func:`train_digits_assets`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from carv._runfolder import atomic_write_text
from carv.teachers import digits_metrics as dm
from carv.teachers.digits import (
    CLASSIFIER_FILE,
    GRID_DDIM_STEPS,
    GRID_FILE,
    GRID_GUIDANCE,
    NUM_CLASSES,
    STATS_FILE,
    TEACHER_CONFIG,
    TEACHER_FILE,
    TEACHER_TRAINING,
    assets_dir,
    load_digits_data,
    load_digits_teacher,
    make_digits_schedule,
    sample_digits,
    save_sample_grid,
    train_digits_teacher,
)
from carv.teachers.evaluation import GaussianLinearTeacher, heldout_denoising_mse
from carv.teachers.unet import save_unet_teacher

__all__ = ["train_digits_assets"]


def _default_grid_path(out_dir: Path) -> Path:
    """``docs/`` of the source checkout when writing into the package assets of one, else ``out_dir``."""
    repo = assets_dir().parents[2]
    if out_dir.resolve() == assets_dir() and (repo / "pyproject.toml").is_file():
        return repo / "docs" / GRID_FILE
    return out_dir / GRID_FILE


def train_digits_assets(out_dir: str | Path | None = None, seed: int = 0, grid_path: str | Path | None = None,
                   progress: bool = True, **overrides) -> dict:
    """Train the digits teacher and the digits classifier, evaluate them, and write

    - ``out_dir/digits_teacher.safetensors`` and ``out_dir/digits_classifier.safetensors``,
    - ``out_dir/digits_teacher_stats.json`` (timings, threads, losses, accuracies, Frechet distances),
    - the sample grid PNG (10 classes x 8 samples, DDIM 50 steps, guidance 2): ``grid_path``, default
      ``docs/digits_teacher_samples.png`` of the source checkout when ``out_dir`` is the package
      assets folder, else ``out_dir/digits_teacher_samples.png``.

    ``out_dir`` defaults to the package assets folder. ``overrides`` go to the teacher's training
    loop (smoke tests only). Returns the stats dict.
    """
    out = Path(out_dir) if out_dir is not None else assets_dir()
    out.mkdir(parents=True, exist_ok=True)
    grid = Path(grid_path) if grid_path is not None else _default_grid_path(out)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    clf, clf_stats = dm.train_digits_classifier(seed=seed, progress=progress)
    dm.save_digits_classifier(out / CLASSIFIER_FILE, clf, meta=clf_stats)

    model, t_stats = train_digits_teacher(seed=seed, progress=progress, **overrides)
    meta = {"dataset": "sklearn load_digits, 16x16 bilinear, [-1,1], split: every 5th per class is test",
            "guidance_default": GRID_GUIDANCE, "seed": seed, **{k: v for k, v in t_stats.items()}}
    save_unet_teacher(out / TEACHER_FILE, model, make_digits_schedule(), meta=meta)
    teacher = load_digits_teacher(path=out / TEACHER_FILE)
    load_after_train = os.getloadavg()

    # --- evaluation
    x_te, y_te = load_digits_data("test")
    x_tr, y_tr = load_digits_data("train")
    te_mse, te_se = heldout_denoising_mse(teacher, x_te, y_te)
    tr_mse, tr_se = heldout_denoising_mse(teacher, x_tr[: x_te.shape[0]], y_tr[: x_te.shape[0]])
    lin_mse, lin_se = heldout_denoising_mse(GaussianLinearTeacher(x_tr, teacher.schedule), x_te, y_te)
    samples_stats = _sample_quality(teacher, out / CLASSIFIER_FILE, x_tr, y_tr, seed)
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(8)
    grid_imgs = sample_digits(teacher, grid_labels, seed=seed + 2)
    title = f"digits teacher: rows = class 0..9, DDIM {GRID_DDIM_STEPS} steps, guidance {GRID_GUIDANCE}"
    save_sample_grid(grid_imgs, grid, nrow=NUM_CLASSES, title=title)

    stats = {
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + "carv train-teacher digits" + (f" --seed {seed}" if seed else ""),
        "machine": {"platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after_teacher": [round(v, 2) for v in load_after_train]},
        "teacher": {"config": TEACHER_CONFIG, "training": {**TEACHER_TRAINING, **overrides}, **t_stats,
                    "heldout_denoising_mse": te_mse, "heldout_denoising_mse_se": te_se,
                    "heldout_denoising_mse_best_linear_baseline": lin_mse,
                    "heldout_denoising_mse_best_linear_baseline_se": lin_se,
                    "train_subset_denoising_mse": tr_mse, "train_subset_denoising_mse_se": tr_se,
                    "denoising_mse_protocol": "conditional, 10 midpoint timesteps per image, noise seed 0"},
        "classifier": clf_stats,
        "samples": samples_stats,
        "total_time_s": time.perf_counter() - t_start,
    }
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=2) + "\n")
    return stats


def _sample_quality(teacher, classifier_path: Path, x_tr: torch.Tensor, y_tr: torch.Tensor, seed: int) -> dict:
    """100 samples per class (DDIM, guidance 2): sampling time, classifier accuracy and Frechet distance to the
    test split, beside the FD of as many real training images (the floor at this sample size)."""
    n_per_class = 100
    sample_labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    t0 = time.perf_counter()
    samples = sample_digits(teacher, sample_labels, seed=seed + 1)
    sample_time = time.perf_counter() - t0
    classifier = dm.load_digits_classifier(path=classifier_path, cache=False)
    sample_acc = dm.classifier_accuracy(samples, sample_labels, classifier=classifier)
    fd_samples_test = dm.digits_fd(samples, reference="test", classifier=classifier)
    # the same number of real (train) images, 100 per class: the FD floor at this sample size
    real = torch.cat([x_tr[y_tr == c][:n_per_class] for c in range(NUM_CLASSES)])
    fd_train_test = dm.digits_fd(real, reference="test", classifier=classifier)
    return {"n": int(samples.shape[0]), "ddim_steps": GRID_DDIM_STEPS, "guidance_scale": GRID_GUIDANCE,
            "sampling_time_s": sample_time, "classifier_accuracy": sample_acc, "fd_vs_test": fd_samples_test,
            "fd_1000_train_images_vs_test": fd_train_test}
