"""Attribute a digit to the training examples of the digits teacher: which training images shaped it?

``carv attribute QUERY``: ``QUERY`` is an index into the digits test split or the path of an image
(any size; it is converted to grey, resized to 16x16 and mapped to the teacher's ``[-1, 1]``, with
the polarity read off its border: a light border means dark ink on a light background). Every
training example's gradient feature and the query's are estimated with carv's estimator
(:class:`~carv.objectives.attribution.GradientFeatures`; by default stratified timesteps with common
random numbers, the setting that gave the most stable rankings in ``carv bench attribution``); the
scores are cosine similarities. The run folder holds:

- ``attribution_<query>.png``: the query followed by its ``top_k`` training examples (scores in the title);
- ``scores_<query>.json``: the query, the top-k (position in the train split, index into scikit-learn's
  ``load_digits()``, label, score) and the configuration. ``<query>`` names the query and the settings
  (``test17_<digest>``, ``image-<stem>-<file digest>_<digest>``), so every query run into one folder keeps its
  own outputs;
- ``train_features_<hash>.safetensors``: the training features, written as they are computed, so an
  interrupted run resumes and later queries with the same configuration reuse them.

With ``crn=True`` the query shares the training examples' draws: common-random-number draws do not
depend on how many examples are drawn at once, so the same seed gives the same draws.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from carv._machine import set_threads
from carv._progress import progress_bar
from carv._runfolder import (
    CorruptFileError,
    RunFolder,
    RunFolderWarning,
    atomic_write_json,
    load_tensors,
    read_json,
    save_figure,
    save_tensors,
)
from carv._validate import check_positive_int, check_seed, check_threads
from carv.accounting import CostMeter, accounting_sentence, accounting_summary
from carv.objectives.attribution import GradientFeatures, cosine_scores
from carv.objectives.weighting import weight_table
from carv.timesteps import TimestepSampler

__all__ = ["AttributeConfig", "attribute", "load_query_image", "save_attribution_grid", "DegenerateQueryWarning"]


class DegenerateQueryWarning(UserWarning):
    """The query image carries (almost) no picture: its prediction and ranking mean little."""

SAMPLERS = ("iid", "grid", "stratified", "stratified+importance")


@dataclass
class AttributeConfig:
    K: int = 16                    # evaluations per data point
    method: str = "stratified"     # one of SAMPLERS
    crn: bool = True               # common random numbers (the same draws for every example)
    top_k: int = 10
    num_train: int | None = None   # None: the whole train split (1442); else its first num_train images
    weighting: str = "sds"         # the loss weighting w(t) (as in `carv bench attribution`)
    floor: float = 0.1
    proj_dim: int = 256
    proj_seed: int = 0
    seed: int = 0
    chunk: int = 64                # training examples per saved chunk
    threads: int | None = None

    def validate(self) -> None:
        check_seed(self.seed)
        check_seed(self.proj_seed, "proj_seed")
        for name in ("K", "top_k", "proj_dim", "chunk"):
            v = getattr(self, name)
            check_positive_int(v, name)
        if self.method not in SAMPLERS:
            raise ValueError(f"method: expected one of {SAMPLERS}, got {self.method!r}")
        if self.num_train is not None and (not isinstance(self.num_train, int) or not 1 <= self.num_train <= 1442):
            raise ValueError(f"num_train: expected an integer in 1..1442 or None, got {self.num_train!r}")
        if self.top_k > (self.num_train or 1442):
            raise ValueError(f"top_k: at most the number of training examples ({self.num_train or 1442}), "
                             f"got {self.top_k}")
        if self.threads is not None:
            check_threads(self.threads)


def load_query_image(path: str | Path, size: int = 16) -> Tensor:
    """An image file as a ``[1, 1, size, size]`` digit in ``[-1, 1]`` (ink high, background -1)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image: no file at {str(p)!r}; give an image path or an index into the test split")
    try:
        from PIL import Image

        with Image.open(p) as im:
            problems = _degenerate(im)
            grey = im.convert("L").resize((size, size), Image.BILINEAR)
            v = torch.from_numpy(np.asarray(grey, dtype=np.float32).copy()) / 255.0
    except Exception as e:  # PIL raises several types for unreadable files
        raise ValueError(f"image: could not read {str(p)!r} as an image ({type(e).__name__}: {e})") from e
    if problems:
        warnings.warn(f"image: {str(p)!r} {' and '.join(problems)}: the label and the ranking of such a query mean "
                      f"little", DegenerateQueryWarning, stacklevel=2)
    border = torch.cat([v[0], v[-1], v[:, 0], v[:, -1]]).mean()
    ink = 1.0 - v if border > 0.5 else v
    return (ink * 2.0 - 1.0)[None, None]


def _degenerate(im) -> list[str]:
    """What makes an image a degenerate query: too small to hold a digit, fully transparent, one flat colour."""
    problems = []
    if min(im.size) < 4:
        problems.append(f"is only {im.size[0]}x{im.size[1]} pixels")
    if "A" in im.getbands() or "transparency" in im.info:
        if im.convert("RGBA").getchannel("A").getextrema()[1] == 0:
            problems.append("is fully transparent")
    lo, hi = im.convert("L").getextrema()
    if hi - lo <= 2 and not problems:
        problems.append(f"is one flat grey level ({lo})")
    return problems


def _query_name(qinfo: dict, cfg: AttributeConfig) -> str:
    """The part of the output names that tells queries and settings apart (``test17_<digest>``)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("chunk", "threads")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    if qinfo["kind"] == "test":
        return f"test{qinfo['test_index']}_{digest}"
    path = Path(qinfo["path"])
    stem = "".join(c if c.isalnum() or c in "-." else "-" for c in path.stem)[:40] or "image"
    return f"image-{stem}-{qinfo['file_sha256'][:8]}_{digest}"


def _resolve_query(query: str | int | Path, label: int | None) -> tuple[Tensor, int, dict]:
    from carv.teachers.digits import digits_split_indices, load_digits_data

    if isinstance(query, int) or (isinstance(query, str) and query.strip().lstrip("-").isdigit()
                                  and not Path(query).is_file()):
        i = int(query)
        x_te, y_te = load_digits_data("test")
        if not 0 <= i < x_te.shape[0]:
            raise ValueError(f"query: test index must be in 0..{x_te.shape[0] - 1}, got {i}")
        if label is not None and label != int(y_te[i]):
            raise ValueError(f"label: test image {i} is a {int(y_te[i])}, got label={label}")
        info = {"kind": "test", "test_index": i, "dataset_index": int(digits_split_indices("test")[i]),
                "label": int(y_te[i])}
        return x_te[i : i + 1], int(y_te[i]), info
    x = load_query_image(query)
    if label is None:
        from carv.teachers.digits_metrics import predict

        label = int(predict(x)[0])
        how = "predicted by the digits classifier"
    else:
        if not isinstance(label, int) or not 0 <= label <= 9:
            raise ValueError(f"label: expected a digit 0..9, got {label!r}")
        how = "given"
    return x, label, {"kind": "image", "path": str(query), "label": label, "label_source": how,
                      "file_sha256": hashlib.sha256(Path(query).read_bytes()).hexdigest()}


def _features(cfg: AttributeConfig, teacher) -> GradientFeatures:
    T = teacher.schedule.num_timesteps
    stratify = {"iid": "none", "grid": "grid"}.get(cfg.method, "per_upstream")
    if cfg.method == "stratified+importance":
        sampler = TimestepSampler(T, importance=weight_table(cfg.weighting, teacher.schedule), floor=cfg.floor,
                                  stratify=stratify)
    else:
        sampler = TimestepSampler(T, stratify=stratify)
    return GradientFeatures(teacher, sampler, K=cfg.K, noise="crn" if cfg.crn else "iid", weighting=cfg.weighting,
                            proj_dim=cfg.proj_dim, proj_seed=cfg.proj_seed)


def attribute(query: str | int | Path, out_dir: str | Path = "runs/attribute", label: int | None = None,
              cfg: AttributeConfig | None = None, progress: bool = True, fresh: bool = False) -> dict:
    """Top-k training examples of ``query`` (test index or image path); writes the run folder, returns scores.

    The folder is locked while in use and named ``carv attribute`` in its manifest; it serves any query and
    configuration (the feature cache is keyed by the configuration). ``fresh=True`` moves it aside first."""
    cfg = cfg or AttributeConfig()
    cfg.validate()
    set_threads(cfg.threads)
    x_q, y_q, qinfo = _resolve_query(query, label)
    with RunFolder(out_dir, "carv attribute", {}, fresh=fresh):
        return _attribute(Path(out_dir), x_q, y_q, qinfo, cfg, progress)



def _write_summary(out: Path, name: str, qinfo: dict, cfg, result: dict) -> None:
    """``summary.json``: the latest query's ``accounting`` at the top (as every command's summary), and every query
    answered into this folder under ``queries`` (so a second query never hides the first)."""
    path = out / "summary.json"
    queries = {}
    if path.is_file():
        try:
            old = read_json(path, "summary")
            queries = old.get("queries", {}) if isinstance(old, dict) else {}
        except CorruptFileError:
            queries = {}
    entry = {"query": qinfo, "config": asdict(cfg), "accounting": result["accounting"], "files": result["files"]}
    queries[name] = entry
    atomic_write_json(path, {"command": "carv attribute", **entry, "queries": queries})

def _attribute(out: Path, x_q: Tensor, y_q: int, qinfo: dict, cfg: AttributeConfig, progress: bool) -> dict:
    from carv.teachers.digits import digits_split_indices, load_digits_data, load_digits_teacher

    teacher = load_digits_teacher()
    feats = _features(cfg, teacher)
    x_tr, y_tr = load_digits_data("train")
    n = cfg.num_train or x_tr.shape[0]
    x_tr, y_tr = x_tr[:n], y_tr[:n]

    # training features, chunk by chunk, saved as they are made (resume / reuse across queries)
    key = {k: v for k, v in asdict(cfg).items() if k not in ("top_k", "chunk", "threads")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    cache = out / f"train_features_{digest}.safetensors"
    done = {}
    if cache.is_file():
        try:
            done = load_tensors(cache, "feature cache")[0]
        except CorruptFileError as e:  # a cache: recompute it
            warnings.warn(f"{e}; recomputing the training features", RunFolderWarning, stacklevel=2)
    batch = feats.draw(x_tr, y_tr, torch.Generator().manual_seed(cfg.seed))
    meter = CostMeter()
    t0 = time.perf_counter()
    starts = list(range(0, n, cfg.chunk))
    for s in progress_bar(starts, progress, desc=f"training features ({n} examples x {cfg.K} evals)"):
        name = f"chunk_{s}"
        if name not in done:
            sl = slice(s, s + cfg.chunk)
            done[name] = feats.features_of(tuple(b[sl] for b in batch), meter).contiguous()
            save_tensors(cache, done, metadata={"config": json.dumps(key)})
    train_feats = torch.cat([done[f"chunk_{s}"] for s in starts])
    q_feats = feats(x_q, torch.tensor([y_q]), torch.Generator().manual_seed(cfg.seed), meter=meter)
    scores = cosine_scores(q_feats, train_feats)[0]
    top = scores.topk(cfg.top_k)
    ds_index = digits_split_indices("train")
    result = {
        "query": qinfo,
        "top": [{"rank": r + 1, "train_position": int(i), "dataset_index": int(ds_index[i]), "label": int(y_tr[i]),
                 "score": float(v)} for r, (v, i) in enumerate(zip(top.values, top.indices, strict=True))],
        "config": asdict(cfg),
        "num_train": n,
        "seconds": time.perf_counter() - t0,
        "accounting": _accounting(feats, x_q, y_q, cfg, meter),
    }
    name = _query_name(qinfo, cfg)
    scores_path, grid_path = out / f"scores_{name}.json", out / f"attribution_{name}.png"
    result["files"] = {"scores": scores_path.name, "grid": grid_path.name}
    atomic_write_json(scores_path, result)
    _write_summary(out, name, qinfo, cfg, result)
    save_attribution_grid(x_q[0], x_tr[top.indices], top.values, y_tr[top.indices], grid_path,
                          title=f"query: {qinfo['kind']} digit, label {y_q} ({cfg.method}, K={cfg.K}"
                                f"{', CRN' if cfg.crn else ''}, {n} training images)")
    if progress:
        labels = ", ".join(f"{t['label']}" for t in result["top"])
        print(f"query {qinfo} -> top-{cfg.top_k} training labels [{labels}]; wrote {grid_path} and {scores_path}")
        print(accounting_sentence(result["accounting"]))
    return result


def _accounting(feats: GradientFeatures, x_q: Tensor, y_q: int, cfg: AttributeConfig, meter: CostMeter) -> dict:
    """:func:`carv.accounting.accounting_summary` of one example's feature (``R = 1`` example, ``K`` draws): the
    example is fixed, so there is no between part; the within part is the spread of the query's weighted, projected
    per-draw gradients (iid reading; conservative under strata); the costs are the training features' stage
    medians (draw: a per-draw gradient, upstream: the per-example projection). Needs ``K >= 2`` for the within
    part."""
    costs = [meter.median(s) if meter.times.get(s) else None for s in ("upstream", "draw")]
    within = None
    if cfg.K >= 2:
        batch = feats.draw(x_q, torch.tensor([y_q]), torch.Generator().manual_seed(cfg.seed))
        g = feats.project(feats.per_draw_gradients(batch)[0] * batch[4][0, :, None].to(torch.float32))
        within = float((g - g.mean(0)).pow(2).sum()) / (cfg.K - 1)
    return accounting_summary(0.0 if within is not None else None, within, *costs, 1, cfg.K, cfg.method)


def save_attribution_grid(query: Tensor, images: Tensor, scores: Tensor, labels: Tensor, path: str | Path,
                          title: str = "") -> None:
    """One row: the query (framed), then the training images in rank order with their score and label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = images.shape[0]
    fig, axes = plt.subplots(1, k + 1, figsize=(1.05 * (k + 1), 1.75), dpi=110)
    panels = [(query, "query", "tab:red")] + [
        (images[i], f"#{i + 1} ({int(labels[i])})\n{float(scores[i]):.3f}", "black") for i in range(k)]
    for ax, (img, text, colour) in zip(axes, panels, strict=True):
        ax.imshow(((img[0].clamp(-1, 1) + 1) / 2).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(colour)
            spine.set_linewidth(2.5 if colour != "black" else 0.5)
        ax.set_title(text, fontsize=7, color=colour)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
