"""The LDS ground truth for the digits teacher: subset models and their outputs on fixed queries.

The linear datamodeling score (LDS; Park et al. 2023, TRAK) asks how well an attribution predicts what
retraining does. Its ground truth here, fixed by :data:`TRUTH` before any attribution was scored:

- **Images**: the digits at their native ``size = 8`` (8x8, no upsampling: a model step costs half the 16x16
  teacher's, so the 65 models train in about an hour of one shared CPU core).
- **Training pool**: ``pool_size`` images of the digits train split (a seeded random choice, positions sorted).
- **Subsets**: ``n_subsets`` boolean masks over the pool, each holding exactly ``subset_ratio * pool_size``
  images; mask ``m`` is ``randperm(pool_size, generator=mask_seed * 100003 + m)[:size]``, so adding subsets never
  changes the earlier ones (:func:`subset_masks`).
- **Models**: one digits DDPM per subset (and one on the whole pool, the model being attributed), each trained by
  :func:`~carv.teachers.digits.train_digits_teacher` with the architecture and recipe in :data:`TRUTH` and the
  same training seed (the same initialisation and random stream; the models differ only in their data).
- **Model output** (D-TRAK's): for query ``z = (x0, c)``, the diffusion loss at fixed draws, the same for every
  model: ``f(z; theta) = (1/K) sum_k ||eps_theta(a_{t_k} x0 + s_{t_k} eps_{z,k}, t_k, c) - eps_{z,k}||^2 / D``
  with D-TRAK's evenly spaced timesteps ``t_k = k * T / K`` and one seeded noise per query and timestep
  (:func:`query_draws`).
- **Queries**: ``n_queries`` test-split digits, evenly spaced through the split.

The subset models are trained by a resumable job (one safetensors file per model, a progress log, models
already on disk skipped): ``python benchmarks/attribution_lds_truth.py train RUN_DIR``; then
``python benchmarks/attribution_lds_truth.py outputs RUN_DIR`` writes :data:`TRUTH_FILE` (masks, outputs, the
configuration), which ``carv bench attribution --lds`` scores any attribution against in seconds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from carv._runfolder import atomic_write_bytes, atomic_write_text, load_tensors, save_tensors
from carv.teachers.unet import UNetTeacher, load_unet_teacher, save_unet_teacher

__all__ = ["TRUTH", "TRUTH_FILE", "MODEL_FILE", "truth_fingerprint", "pool_indices", "subset_masks", "query_indices",
           "query_draws", "model_outputs", "train_truth_models", "cached_outputs", "write_truth", "save_model_samples",
           "load_truth"]

TRUTH = dict(
    pool_size=500,
    pool_seed=0,
    n_subsets=64,
    subset_ratio=0.5,
    mask_seed=1,
    train_seed=0,
    size=8,
    architecture={"base_channels": 16},
    training=dict(steps=300, batch_size=32, lr=2e-3, warmup=50, ema_decay=0.99),
    n_queries=100,
    query_timesteps=100,
    query_noise_seed=2,
)
TRUTH_FILE = Path("docs") / "attribution_lds_truth.safetensors"
MODEL_FILE = Path("docs") / "attribution_lds_model.safetensors"  # the whole-pool model (the one attributed)
SAMPLES_FILE = Path("docs") / "attribution_lds_model_samples.png"
FULL = "full"  # the model trained on the whole pool


def truth_fingerprint(cfg: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def pool_indices(cfg: dict = TRUTH) -> Tensor:
    """Positions in the digits train split of the training pool (sorted, int64)."""
    from carv.teachers.digits import load_digits_data

    n_train = load_digits_data("train")[0].shape[0]
    g = torch.Generator().manual_seed(cfg["pool_seed"])
    return torch.randperm(n_train, generator=g)[: cfg["pool_size"]].sort().values


def subset_masks(n_subsets: int, pool_size: int, ratio: float, seed: int) -> Tensor:
    """``[n_subsets, pool_size]`` bool; row ``m`` holds exactly ``round(ratio * pool_size)`` pool images, drawn by
    a generator seeded ``seed * 100003 + m`` (so row ``m`` does not depend on ``n_subsets``)."""
    for name, v in (("n_subsets", n_subsets), ("pool_size", pool_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if not isinstance(ratio, float) or not 0 < ratio < 1:
        raise ValueError(f"ratio: expected a float in (0, 1), got {ratio!r}")
    size = round(ratio * pool_size)
    if not 0 < size < pool_size:
        raise ValueError(f"ratio: {ratio} of {pool_size} images leaves an empty subset or its complement")
    masks = torch.zeros(n_subsets, pool_size, dtype=torch.bool)
    for m in range(n_subsets):
        g = torch.Generator().manual_seed(seed * 100003 + m)
        masks[m, torch.randperm(pool_size, generator=g)[:size]] = True
    return masks


def query_indices(cfg: dict = TRUTH) -> Tensor:
    """Positions in the digits test split of the queries (evenly spaced through the split)."""
    from carv.teachers.digits import load_digits_data

    n_test = load_digits_data("test")[0].shape[0]
    return torch.linspace(0, n_test - 1, cfg["n_queries"]).round().long()


def query_draws(cfg: dict = TRUTH, num_timesteps: int = 1000) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The queries and their fixed draws: ``(x0 [Q,1,16,16], labels [Q], t [Q,K], eps [Q,K,1,16,16])``;
    ``t`` is D-TRAK's grid ``range(0, T, T // K)``, ``eps`` one seeded noise per query and timestep."""
    from carv.objectives.attribution import dtrak_timesteps
    from carv.teachers.digits import load_digits_data

    x_te, y_te = load_digits_data("test", cfg["size"])
    qi = query_indices(cfg)
    x0, labels = x_te[qi], y_te[qi]
    ts = dtrak_timesteps(cfg["query_timesteps"], num_timesteps)
    g = torch.Generator().manual_seed(cfg["query_noise_seed"])
    eps = torch.randn(x0.shape[0], len(ts), *x0.shape[1:], generator=g)
    return x0, labels, ts.expand(x0.shape[0], -1).clone(), eps


@torch.no_grad()
def model_outputs(teacher: UNetTeacher, x0: Tensor, labels: Tensor, t: Tensor, eps: Tensor,
                  batch: int = 2000) -> Tensor:
    """D-TRAK's model output per query: the mean over its draws of ``||eps_theta(x_t, t, c) - eps||^2 / D`` ([Q])."""
    Q, K = t.shape
    xs = x0[:, None].expand(-1, K, *x0.shape[1:]).reshape(Q * K, *x0.shape[1:])
    ls = labels[:, None].expand(-1, K).reshape(-1)
    tf, ef = t.reshape(-1), eps.reshape(Q * K, *x0.shape[1:])
    out = []
    for s in range(0, Q * K, batch):
        sl = slice(s, s + batch)
        x_t = teacher.schedule.add_noise(xs[sl], tf[sl], ef[sl])
        out.append((teacher.model(x_t, tf[sl], ls[sl]) - ef[sl]).pow(2).flatten(1).mean(1))
    return torch.cat(out).reshape(Q, K).double().mean(1)


def _model_file(run_dir: Path, name: str) -> Path:
    return run_dir / "models" / f"{name}.safetensors"


CLAIM_TTL = 3600.0


def _claim(path: Path, ttl: float = CLAIM_TTL) -> bool:
    """Claim the file at ``path`` for this process (False: another live worker has it): ``path.claim`` is created
    exclusively; one older than ``ttl`` seconds is a dead worker's and is taken over."""
    claim = path.with_suffix(".claim")
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        if time.time() - claim.stat().st_mtime < ttl:
            return False
        claim.unlink(missing_ok=True)
        return _claim(path, ttl)


def train_truth_models(run_dir: str | Path, cfg: dict = TRUTH, n_subsets: int | None = None,
                       log=print, worker: int = 0, workers: int = 1) -> None:
    """Train the whole-pool model, then the subset models, skipping those already on disk (resumable).

    Each model is written atomically to ``RUN_DIR/models/{full,subset_XXX}.safetensors``; ``RUN_DIR/progress.log``
    gets one JSON line per finished model. ``n_subsets`` above ``cfg``'s trains more (the masks extend).
    Several processes may share the work: worker ``i`` of ``n`` first trains the models whose position is ``i``
    modulo ``n``, then any still missing. A worker claims a model with a ``.claim`` file (created exclusively);
    a claim older than ``CLAIM_TTL`` seconds is taken to be a dead worker's and taken over."""
    if not (isinstance(workers, int) and isinstance(worker, int) and 0 <= worker < workers):
        raise ValueError(f"worker, workers: expected 0 <= worker < workers, got {worker}, {workers}")
    from carv.teachers.digits import make_digits_schedule, train_digits_teacher

    run_dir = Path(run_dir)
    n = n_subsets or cfg["n_subsets"]
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps({**cfg, "fingerprint": truth_fingerprint(cfg)}, indent=2))
    pool = pool_indices(cfg)
    masks = subset_masks(n, cfg["pool_size"], cfg["subset_ratio"], cfg["mask_seed"])
    jobs = [(FULL, pool)] + [(f"subset_{m:03d}", pool[masks[m]]) for m in range(n)]
    mine = [j for k, j in enumerate(jobs) if k % workers == worker]
    for name, idx in mine + [j for k, j in enumerate(jobs) if k % workers != worker]:
        path = _model_file(run_dir, name)
        if path.is_file() or not _claim(path):
            continue
        t0 = time.perf_counter()
        ema, stats = train_digits_teacher(seed=cfg["train_seed"], progress=False, indices=idx,
                                          architecture=cfg["architecture"], size=cfg["size"], **cfg["training"])
        save_unet_teacher(path, ema, make_digits_schedule(),
                          meta={"lds_truth": truth_fingerprint(cfg), "model": name, "train_examples": len(idx)})
        line = {"model": name, "seconds": round(time.perf_counter() - t0, 1), "final_loss": stats["final_loss"],
                "time": time.strftime("%H:%M:%S", time.gmtime())}
        with open(run_dir / "progress.log", "a") as f:
            f.write(json.dumps(line) + "\n")
        path.with_suffix(".claim").unlink(missing_ok=True)
        if log is not None:
            log(json.dumps(line))


def cached_outputs(run_dir: str | Path, name: str, draws: tuple[Tensor, ...], fingerprint: str) -> Tensor | None:
    """Model ``name``'s outputs on the queries (``[Q]``), cached in ``RUN_DIR/outputs/``; None if not trained yet."""
    run_dir = Path(run_dir)
    model, cache = _model_file(run_dir, name), run_dir / "outputs" / f"{name}.safetensors"
    if cache.is_file():
        tensors, meta = load_tensors(cache, "model outputs")
        if meta.get("fingerprint") == fingerprint:
            return tensors["outputs"]
    if not model.is_file():
        return None
    out = model_outputs(load_unet_teacher(model), *draws)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(cache, {"outputs": out}, metadata={"fingerprint": fingerprint})
    return out


def write_truth(run_dir: str | Path, path: str | Path = TRUTH_FILE, cfg: dict = TRUTH,
                n_subsets: int | None = None, model_path: str | Path | None = MODEL_FILE) -> dict:
    """Evaluate every trained model on the queries and write the ground truth (safetensors: ``masks``
    ``[N, pool]``, ``outputs`` ``[N, Q]``, ``full_outputs`` ``[Q]``, ``pool``, ``queries``; the configuration
    in the metadata), and copy the whole-pool model to ``model_path``."""
    run_dir = Path(run_dir)
    n = n_subsets or cfg["n_subsets"]
    masks = subset_masks(n, cfg["pool_size"], cfg["subset_ratio"], cfg["mask_seed"])
    draws = query_draws(cfg)
    fp = truth_fingerprint(cfg)
    names = [f"subset_{m:03d}" for m in range(n)] + [FULL]
    outs = {name: cached_outputs(run_dir, name, draws, fp) for name in names}
    missing = [name for name, o in outs.items() if o is None]
    if missing:
        raise ValueError(f"run_dir: {len(missing)} model(s) not trained yet in {str(run_dir)!r} ({missing[:4]}...); "
                         f"run the training job first")
    tensors = {"masks": masks.to(torch.uint8), "outputs": torch.stack([outs[x] for x in names[:-1]]),
               "full_outputs": outs[FULL], "pool": pool_indices(cfg), "queries": query_indices(cfg)}
    meta = {"config": json.dumps({**cfg, "n_subsets": n}, sort_keys=True), "fingerprint": fp,
            "command": f"python benchmarks/attribution_lds_truth.py train {run_dir} && "
                       f"python benchmarks/attribution_lds_truth.py outputs {run_dir}"}
    save_tensors(path, tensors, metadata=meta)
    if model_path is not None:
        atomic_write_bytes(model_path, _model_file(run_dir, FULL).read_bytes())
        save_model_samples(model_path, Path(model_path).with_name(SAMPLES_FILE.name), cfg)
    return {"n_subsets": n, "queries": int(tensors["outputs"].shape[1]),
            "output_sd_over_subsets": float(tensors["outputs"].std(0).mean()),
            "output_mean": float(tensors["outputs"].mean())}


def save_model_samples(model_path: str | Path = MODEL_FILE, path: str | Path = SAMPLES_FILE,
                       cfg: dict = TRUTH) -> None:
    """A grid of DDIM samples of the whole-pool model (8 per class, guidance 2, 50 steps, seed 0), shown at 16x16
    (nearest-neighbour): the check that it samples recognisable digits."""
    import torch.nn.functional as F

    from carv.teachers.digits import save_sample_grid
    from carv.teachers.training import ddim_sample

    teacher = load_unet_teacher(model_path)
    labels = torch.arange(10).repeat_interleave(8)
    size = cfg["size"]
    x = ddim_sample(teacher, (80, 1, size, size), labels, 2.0, 50, torch.Generator().manual_seed(0))
    x = F.interpolate(x, size=(16, 16), mode="nearest")
    grid = x.view(10, 8, 1, 16, 16).transpose(0, 1).reshape(80, 1, 16, 16)
    save_sample_grid(grid, path, nrow=8, title=f"LDS whole-pool model: {cfg['pool_size']} digits at {size}x{size}, "
                                               f"{cfg['training']['steps']} steps")


def load_truth(path: str | Path = TRUTH_FILE) -> tuple[dict[str, Tensor], dict]:
    """The ground truth written by :func:`write_truth`: its tensors (``masks`` as bool) and configuration."""
    tensors, meta = load_tensors(path, "LDS ground truth")
    if "config" not in meta or not {"masks", "outputs", "pool", "queries"} <= set(tensors):
        raise ValueError(f"path: {str(path)!r} is not an LDS ground truth (written by write_truth)")
    tensors["masks"] = tensors["masks"].bool()
    return tensors, json.loads(meta["config"])
