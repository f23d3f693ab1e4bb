"""Quality metrics for 16x16 digits: a small classifier, its features, and a Frechet distance.

No Inception weights can be downloaded here, so the project trains its own feature network: a
compact CNN on the digits train split (:func:`carv.teachers.digits.load_digits_data`) whose 64-d
penultimate layer gives the features for a Frechet distance ("FD", FID's formula on these features).
The committed weights are ``assets/digits_classifier.safetensors`` (safetensors; the architecture
config and the training stats are in the metadata); ``carv train-teacher digits`` reproduces them.

Inputs everywhere are images ``[N, 1, 16, 16]`` in ``[-1, 1]`` (the teacher's space).
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from carv._runfolder import atomic_path
from carv.teachers.digits import CLASSIFIER_FILE, assets_dir, load_digits_data

__all__ = [
    "DigitsClassifier",
    "train_digits_classifier",
    "save_digits_classifier",
    "load_digits_classifier",
    "features",
    "predict",
    "classifier_accuracy",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "digits_fd",
    "FD_EPS",
]

IMAGE_SIZE = 16
FORMAT = "carv.digits_classifier/1"
# Added to both covariance diagonals (only) when sqrtm(S1 S2) fails: non-finite or clearly complex.
FD_EPS = 1e-6
CLASSIFIER_TRAINING = dict(steps=1000, batch_size=64, lr=3e-3, weight_decay=1e-4, max_shift=1)


class DigitsClassifier(nn.Module):
    """conv(1->c) -> conv(c->2c, /2) -> conv(2c->4c, /2) -> flatten -> linear(feature_dim) -> linear(10).

    ``features(x)`` is the SiLU-activated ``feature_dim`` layer before the logits. No batch norm or
    dropout, so ``eval()`` and ``train()`` compute the same function.
    """

    def __init__(self, channels: int = 16, feature_dim: int = 64, num_classes: int = 10,
                 image_size: int = 16):
        super().__init__()
        self.config = dict(channels=channels, feature_dim=feature_dim, num_classes=num_classes,
                           image_size=image_size)
        c = channels
        self.convs = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.fc = nn.Linear(4 * c * (image_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return F.silu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _check_images(images, name: str = "images") -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{name}: expected shape [N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] (digits in [-1, 1]), "
            f"got {tuple(images.shape)}"
        )
    if not images.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {images.dtype}")
    return images


def _shift(x: Tensor, max_shift: int, g: torch.Generator) -> Tensor:
    """Random integer translation by up to ``max_shift`` pixels (background -1 fills the border)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def train_digits_classifier(
    seed: int = 0, progress: bool = True, **overrides
) -> tuple[DigitsClassifier, dict]:
    """Train the feature classifier on the digits train split (random shifts of up to 1 pixel).

    Returns (model in eval mode, stats with train time and held-out test accuracy).
    """
    unknown = set(overrides) - set(CLASSIFIER_TRAINING)
    if unknown:
        raise ValueError(
            f"overrides: unknown training keyword(s) {sorted(unknown)}; "
            f"allowed: {sorted(CLASSIFIER_TRAINING)}"
        )
    cfg = {**CLASSIFIER_TRAINING, **overrides}
    torch.manual_seed(seed)
    model = DigitsClassifier()
    x_tr, y_tr = load_digits_data("train")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = cfg["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    t0 = time.perf_counter()
    losses = []
    for _ in tqdm(range(steps), disable=not progress, desc="train classifier"):
        i = torch.randint(0, x_tr.shape[0], (cfg["batch_size"],), generator=g)
        loss = F.cross_entropy(model(_shift(x_tr[i], cfg["max_shift"], g)), y_tr[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    x_te, y_te = load_digits_data("test")
    stats = {
        "config": model.config,
        "training": cfg,
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_time_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "final_loss": float(np.mean(losses[-100:])),
        "train_accuracy": classifier_accuracy(x_tr, y_tr, classifier=model),
        "test_accuracy": classifier_accuracy(x_te, y_te, classifier=model),
        "n_test": int(x_te.shape[0]),
    }
    return model, stats


def save_digits_classifier(
    path: str | Path, model: DigitsClassifier, meta: dict[str, Any] | None = None
) -> None:
    """Write weights + config (+ free-form ``meta``) to one safetensors file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(model.config), "meta": json.dumps(meta or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _load(path: Path) -> DigitsClassifier:
    if not path.is_file():
        raise FileNotFoundError(
            f"path: no digits classifier weights at {str(path)!r}; "
            "run `carv train-teacher digits` to create them"
        )
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"path: {str(path)!r} is not a carv digits classifier (format={metadata.get('format')!r})"
        )
    model = DigitsClassifier(**json.loads(metadata["config"]))
    model.load_state_dict(load_file(str(path)))
    model.meta = json.loads(metadata.get("meta", "{}"))
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> DigitsClassifier:
    return _load(Path(path))


def load_digits_classifier(path: str | Path | None = None, cache: bool = True) -> DigitsClassifier:
    """The committed classifier (``assets/digits_classifier.safetensors``), frozen, eval mode, on CPU.

    With ``cache=True`` the same (shared, frozen) module is returned on every call.
    """
    p = Path(path) if path is not None else assets_dir() / CLASSIFIER_FILE
    return _load_cached(str(p.resolve())) if cache else _load(p)


def _run(fn_name: str, images: Tensor, classifier: DigitsClassifier | None, batch_size: int) -> Tensor:
    images = _check_images(images)
    clf = classifier if classifier is not None else load_digits_classifier()
    p = next(clf.parameters())
    out = []
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            xb = images[s : s + batch_size].to(p.device, p.dtype)
            out.append(getattr(clf, fn_name)(xb))
    return torch.cat(out) if out else torch.empty(0)


def features(images: Tensor, classifier: DigitsClassifier | None = None, batch_size: int = 1024) -> Tensor:
    """Penultimate (64-d) classifier features of ``images`` ``[N, 1, 16, 16]`` in ``[-1, 1]``."""
    return _run("features", images, classifier, batch_size)


def predict(images: Tensor, classifier: DigitsClassifier | None = None, batch_size: int = 1024) -> Tensor:
    """Predicted class (int64 ``[N]``) of ``images`` ``[N, 1, 16, 16]`` in ``[-1, 1]``."""
    return _run("forward", images, classifier, batch_size).argmax(1)


def classifier_accuracy(images: Tensor, labels: Tensor, classifier: DigitsClassifier | None = None) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels``."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels: expected shape [{images.shape[0]}] (one label per image), got {tuple(labels.shape)}"
        )
    return (predict(images, classifier).cpu() == labels.cpu()).double().mean().item()


# ---------------------------------------------------------------------------------------------- Frechet
def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``N - 1``) covariance of ``feats`` ``[N, D]`` in float64."""
    f = feats.detach().cpu().double().numpy() if isinstance(feats, Tensor) else np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feats: expected shape [N, D] with N >= 2, got {tuple(f.shape)}")
    if not np.isfinite(f).all():
        raise ValueError("feats: contains NaN or inf")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = FD_EPS) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``: the squared 2-Wasserstein distance of
    two Gaussians.

    ``(S1 S2)^{1/2}`` comes from ``scipy.linalg.sqrtm``. ``S1 S2`` is similar to the PSD matrix
    ``S1^{1/2} S2 S1^{1/2}``, so its root has real eigenvalues; rounding leaves tiny imaginary parts,
    which are dropped when below ``1e-3 * max(1, max |entry|)``. If the root is non-finite or clearly
    complex (near-singular covariances, e.g. fewer samples than dimensions), ``eps * I`` is added to
    both covariances and the root recomputed (this changes the result by ``O(sqrt(eps))`` per
    near-zero eigenvalue). A root that is still complex raises ``ValueError``.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"mu1, sigma1, mu2, sigma2: expected shapes [D], [D, D], [D], [D, D] with one D, got "
            f"{mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}"
        )
    if eps < 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")

    def root(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
        with np.errstate(all="ignore"):
            r = scipy.linalg.sqrtm(a @ b)
        r = np.asarray(r)
        if not np.isfinite(r).all():
            return None
        if np.iscomplexobj(r):
            if np.abs(r.imag).max() > 1e-3 * max(1.0, np.abs(r.real).max()):
                return None
            r = r.real
        return r

    covmean = root(s1, s2)
    if covmean is None:
        off = eps * np.eye(d)
        covmean = root(s1 + off, s2 + off)
        if covmean is None:
            raise ValueError(f"sigma1, sigma2: sqrtm(sigma1 @ sigma2) is not real even with eps={eps} added")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance(feats_a, feats_b, eps: float = FD_EPS) -> float:
    """Frechet distance between Gaussian fits (mean, unbiased covariance) of two feature sets ``[N, D]``."""
    mu1, s1 = gaussian_stats(feats_a)
    mu2, s2 = gaussian_stats(feats_b)
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"feats_b: expected feature dimension {mu1.shape[0]} (like feats_a), got {mu2.shape[0]}"
        )
    return frechet_distance_from_stats(mu1, s1, mu2, s2, eps)


_REFERENCES = ("test", "train", "all")


def _reference_stats(reference: str, clf: DigitsClassifier) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean/covariance of a digits split, cached on the classifier object."""
    cache = clf.__dict__.setdefault("_fd_reference_stats", {})
    if reference not in cache:
        cache[reference] = gaussian_stats(features(load_digits_data(reference)[0], clf))
    return cache[reference]


def digits_fd(images: Tensor, reference: str = "test", classifier: DigitsClassifier | None = None) -> float:
    """Frechet distance between classifier features of ``images`` and of a digits split.

    ``reference``: ``"test"`` (held-out, 355 images), ``"train"`` or ``"all"``. FD is biased upward at
    small sample sizes, so compare values computed with the same number of images.
    """
    if reference not in _REFERENCES:
        raise ValueError(f"reference: expected one of {', '.join(map(repr, _REFERENCES))}, got {reference!r}")
    images = _check_images(images)
    clf = classifier if classifier is not None else load_digits_classifier()
    mu_r, s_r = _reference_stats(reference, clf)
    mu, s = gaussian_stats(features(images, clf))
    return frechet_distance_from_stats(mu, s, mu_r, s_r)
