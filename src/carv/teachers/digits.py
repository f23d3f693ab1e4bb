"""The digits teacher: a class-conditional DDPM on scikit-learn's bundled handwritten digits.

Data
    ``sklearn.datasets.load_digits()``: 1797 grey images of 8x8 pixels with values 0..16, labels 0..9.
    Pixels are mapped to ``[-1, 1]`` (``v / 8 - 1``) and upsampled to ``size x size`` (default 16) with
    bilinear interpolation (``align_corners=False``, no antialiasing).

Split (fixed, RNG-free, so it cannot drift with a library version)
    Within each class, take the images in dataset order; every fifth one (class positions 4, 9, 14, ...)
    goes to the test split, the rest to train. That is a stratified 80/20 split: 1442 train and
    355 test images, each class split ``n_c - n_c // 5`` / ``n_c // 5``. :func:`digits_split_indices`
    returns the indices into ``load_digits()`` order; row ``i`` of ``load_digits_data(split)`` is
    dataset image ``digits_split_indices(split)[i]``, and both orders are stable (attribution uses
    the position in the train split as the training-example id).

Teacher
    :class:`~carv.teachers.unet.CompactUNet` (``in_channels=1``, ``cond_classes=(10,)``; label 10 is the
    null label for classifier-free guidance) on ``VPSchedule.from_betas(1e-4, 0.02, 1000, "linear")``,
    trained with :func:`~carv.teachers.training.train_ddpm` (eps-prediction, 10% label dropout, EMA).
    No data augmentation: the teacher should model the data distribution the metrics compare against.
    The recipe is :data:`TEACHER_CONFIG` / :data:`TEACHER_TRAINING`; ``carv train-teacher digits``
    (:func:`carv.apps.assets.train_digits_assets`) reproduces the committed weights
    ``assets/digits_teacher.safetensors`` and the digits classifier (:mod:`carv.teachers.digits_metrics`)
    used for its quality metrics.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from carv._runfolder import save_figure
from carv.schedules import VPSchedule
from carv.teachers.training import ddim_sample, train_ddpm
from carv.teachers.unet import CompactUNet, UNetTeacher, load_unet_teacher

__all__ = [
    "SPLITS",
    "TEACHER_CONFIG",
    "TEACHER_TRAINING",
    "assets_dir",
    "digits_split_indices",
    "load_digits_data",
    "make_digits_schedule",
    "train_digits_teacher",
    "load_digits_teacher",
    "sample_digits",
    "save_sample_grid",
]

SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
TEST_EVERY = 5  # every 5th image of each class (in dataset order) is a test image

TEACHER_FILE = "digits_teacher.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
STATS_FILE = "digits_teacher_stats.json"
GRID_FILE = "digits_teacher_samples.png"

# Architecture of the committed teacher (about 0.28 M parameters).
TEACHER_CONFIG = dict(
    in_channels=1,
    base_channels=16,
    channel_mults=(1, 2, 2),
    num_res_blocks=1,
    attn_levels=(),
    cond_classes=(NUM_CLASSES,),
)
# Training recipe (train_ddpm keyword arguments).
TEACHER_TRAINING = dict(steps=3000, batch_size=64, lr=2e-3, warmup=200, label_dropout=0.1, ema_decay=0.999)
# Sample grid / sample metrics.
GRID_GUIDANCE = 2.0
GRID_DDIM_STEPS = 50


def assets_dir() -> Path:
    """The package's data folder holding the committed weights (``src/carv/assets``)."""
    return Path(__file__).resolve().parent.parent / "assets"


def _check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    return split


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size: expected an integer >= 8 (images are 8x8 upsampled), got {size!r}")
    return size


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float32)  # [1797, 8, 8], 0..16
    labels = np.asarray(d.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_split_indices(split: str = "train") -> Tensor:
    """Indices (int64, increasing) into ``load_digits()`` order of the images in ``split``.

    The split is RNG-free: within each class, the images at class positions ``4, 9, 14, ...``
    (every fifth, in dataset order) are test, the rest train. ``"all"`` is ``0..1796``.
    """
    _check_split(split)
    _, labels = _raw_digits()
    if split == "all":
        return torch.arange(len(labels), dtype=torch.int64)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        is_test[idx[TEST_EVERY - 1 :: TEST_EVERY]] = True
    keep = is_test if split == "test" else ~is_test
    return torch.from_numpy(np.flatnonzero(keep).astype(np.int64))


@functools.lru_cache(maxsize=8)
def _cached_data(split: str, size: int) -> tuple[Tensor, Tensor]:
    images, labels = _raw_digits()
    idx = digits_split_indices(split).numpy()
    x = torch.from_numpy(images[idx].copy())[:, None] / 8.0 - 1.0  # [N, 1, 8, 8] in [-1, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x.contiguous(), torch.from_numpy(labels[idx].copy())


def load_digits_data(split: str = "train", size: int = 16) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of ``split`` (``"train"``, ``"test"`` or ``"all"``).

    ``images``: float32 ``[N, 1, size, size]`` in ``[-1, 1]``; ``labels``: int64 ``[N]``. Row ``i`` is
    dataset image ``digits_split_indices(split)[i]``. Returns fresh copies (safe to modify).
    """
    x, y = _cached_data(_check_split(split), _check_size(size))
    return x.clone(), y.clone()


def make_digits_schedule() -> VPSchedule:
    return VPSchedule.from_betas(1e-4, 0.02, 1000, "linear")


# ---------------------------------------------------------------------------------------------- teacher
def train_digits_teacher(
    seed: int = 0, progress: bool = True, log=None, indices: Tensor | None = None,
    architecture: dict | None = None, size: int = 16, **overrides
) -> tuple[CompactUNet, dict]:
    """Train the digits DDPM with :data:`TEACHER_CONFIG` / :data:`TEACHER_TRAINING` (``overrides`` replace
    training keywords, e.g. ``steps=200`` for a smoke run). Returns (EMA model, stats).

    ``indices`` (positions in the train split) trains on those images only (the subset models of an LDS
    ground truth); ``architecture`` replaces :data:`TEACHER_CONFIG` keys (e.g. ``base_channels``); ``size`` is the
    image size (8: the digits' native resolution, no upsampling)."""
    unknown = set(overrides) - set(TEACHER_TRAINING)
    if unknown:
        raise ValueError(
            f"overrides: unknown training keyword(s) {sorted(unknown)}; allowed: {sorted(TEACHER_TRAINING)}"
        )
    bad_arch = set(architecture or {}) - set(TEACHER_CONFIG)
    if bad_arch:
        raise ValueError(f"architecture: unknown key(s) {sorted(bad_arch)}; allowed: {sorted(TEACHER_CONFIG)}")
    torch.manual_seed(seed)  # parameter init; the training loop itself uses its own generator
    model = CompactUNet(**{**TEACHER_CONFIG, **(architecture or {})})
    x_train, y_train = load_digits_data("train", size)
    if indices is not None:
        n = x_train.shape[0]
        if (not isinstance(indices, Tensor) or indices.dtype != torch.int64 or indices.ndim != 1
                or indices.numel() == 0 or int(indices.min()) < 0 or int(indices.max()) >= n):
            raise ValueError(f"indices: expected a non-empty 1-D int64 tensor of train-split positions in "
                             f"0..{n - 1}, got {getattr(indices, 'shape', type(indices).__name__)}")
        x_train, y_train = x_train[indices], y_train[indices]

    def sample_batch(batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        i = torch.randint(0, x_train.shape[0], (batch_size,), generator=g)
        return x_train[i], y_train[i]

    cfg = {**TEACHER_TRAINING, **overrides}
    ema, stats = train_ddpm(
        model, make_digits_schedule(), sample_batch, seed=seed, progress=progress, log=log, **cfg
    )
    stats["num_params"] = sum(p.numel() for p in ema.parameters())
    return ema, stats


def load_digits_teacher(device: str | torch.device = "cpu", path: str | Path | None = None) -> UNetTeacher:
    """The committed digits teacher (``assets/digits_teacher.safetensors``), frozen, in eval mode."""
    p = Path(path) if path is not None else assets_dir() / TEACHER_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"path: no digits teacher weights at {str(p)!r}; run `carv train-teacher digits` to create them"
        )
    return load_unet_teacher(p, device=device)


def sample_digits(
    teacher: UNetTeacher,
    labels: Tensor,
    guidance_scale: float = GRID_GUIDANCE,
    steps: int = GRID_DDIM_STEPS,
    seed: int = 0,
    batch_size: int = 500,
) -> Tensor:
    """DDIM samples ``[N, 1, 16, 16]`` in ``[-1, 1]`` for the given class labels (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, labels.shape[0], batch_size):
        lab = labels[s : s + batch_size]
        out.append(ddim_sample(teacher, (lab.shape[0], 1, 16, 16), lab, guidance_scale, steps, g))
    return torch.cat(out)


def save_sample_grid(images: Tensor, path: str | Path, nrow: int, title: str | None = None) -> None:
    """Save ``images`` (``[nrow * ncol, 1, H, W]`` in ``[-1, 1]``, row-major) as a grey PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    ncol = n // nrow
    h, w = images.shape[-2:]
    pad = 2
    canvas = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    imgs = ((images[:, 0].clamp(-1, 1) + 1) / 2).numpy()
    for k in range(nrow * ncol):
        r, c = divmod(k, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top : top + h, left : left + w] = imgs[k]
    fig, ax = plt.subplots(figsize=(ncol * 0.5 + 0.4, nrow * 0.5 + (0.5 if title else 0.2)), dpi=100)
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, bbox_inches="tight")
    plt.close(fig)
