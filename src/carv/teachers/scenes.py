"""The text-to-3D teacher: a prompt-, view- and camera-conditioned DDPM on renders of the procedural scenes.

Data
    Ground-truth renders of the scenes of :mod:`carv.render.scenes` from random cameras
    (:func:`carv.render.cameras.random_cameras`: azimuth uniform over 360 degrees, elevation
    uniform in ``[0, 40]`` degrees, radius 3.0, vertical field of view 40 degrees), 32x32 RGB,
    rendered with 2x2 supersampling and 40 samples per ray inside each scene's tight box from a
    96^3 bake of the analytic field (within ~45 dB of the analytic render). Background: a fixed
    mid-grey ``0.5`` (``0`` in the teacher's ``[-1, 1]`` range) -- it contrasts with every object
    (white snowman and lamp included) and it is what an empty or fresh :class:`VoxelGrid` renders
    to, so the text-to-3D app must composite onto the same grey. The (prompt, view) teachers use a
    horizontal flip as augmentation (a render from ``-azimuth``, same view label); it is only
    approximate, since the scenes' shapes are mirror-symmetric left/right but their light is not
    (:mod:`carv.render.scenes`), so camera-conditioned teachers do not flip: they render twice the
    views instead.

Labels
    ``cond [B, 2 + ...]`` long: column 0 the prompt index into ``meta["prompts"]`` (null = number of
    prompts), column 1 the view label ``0 front / 1 side / 2 back`` from the camera's azimuth
    (:func:`carv.render.cameras.view_label`: ``|az| < 45`` front, ``|az| > 135`` back; null = 3); then
    (teachers trained with elevation bins, ``meta["elevation_edges"]``; not the committed one) the camera's
    elevation bin (``--elevation-bins 4``: :data:`ELEVATION_EDGES`, 0-10, 10-20, 20-30, 30-40 degrees; null = 4);
    then (camera-conditioned teachers, ``meta["camera_columns"]``, ``--camera``: **the committed one**) the camera's
    azimuth and elevation in 0.01 degrees (:func:`carv.teachers.unet.angle_label`, embedded by Fourier features,
    :class:`~carv.teachers.unet.CompactUNet`'s ``angle_columns``). A view label alone averages over 90 degrees of
    azimuth and all of 0-40 of elevation, and score distillation then converges to that average (the mushroom
    without its stem); an elevation bin did not fix it, the camera columns did (docs/teachers.md).
    :func:`teacher_cond` builds a teacher's labels from a prompt and cameras
    following its file's meta (:func:`scene_cond` underneath); guidance uses all null labels.

Teacher
    :class:`~carv.teachers.unet.CompactUNet` (:data:`TEACHER_CONFIG`, about 1.2 M parameters,
    4.8 MB) on the linear DDPM schedule (1000 steps), trained by
    :func:`~carv.teachers.training.train_ddpm` with bfloat16 autocast (:data:`TEACHER_TRAINING`; float32 on
    CPUs without native bfloat16, :func:`fast_bfloat16`, so the bits differ there).
    ``carv train-teacher scenes`` (:func:`train_and_save`) trains a teacher and writes its weights, its stats JSON
    and its sample grid. The committed ``assets/scenes_teacher.safetensors`` (and ``docs/scenes_teacher_samples.png``)
    is three runs, each continuing the last (:data:`REPRODUCE`): a (prompt, view) teacher of 1500 steps, then 1200
    and 1000 steps with the camera columns at lower rates.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from carv._plotting import save_image_grid
from carv._progress import progress_bar
from carv._runfolder import atomic_write_text
from carv.render.cameras import (
    DEFAULT_ELEVATION_RANGE,
    DEFAULT_FOV_DEG,
    DEFAULT_RADIUS,
    VIEW_NAMES,
    Cameras,
    cameras_from_angles,
    random_cameras,
    view_label,
)
from carv.render.scenes import PROMPTS, get_scene, normalize_prompt
from carv.render.volume import render
from carv.schedules import VPSchedule
from carv.teachers.evaluation import GaussianLinearTeacher, heldout_denoising_mse
from carv.teachers.training import ddim_sample, train_ddpm
from carv.teachers.unet import (
    ANGLE_CLASSES,
    CompactUNet,
    UNetTeacher,
    angle_label,
    load_unet_teacher,
    save_unet_teacher,
)

__all__ = [
    "IMAGE_SIZE",
    "BACKGROUND",
    "TEACHER_CONFIG",
    "REPRODUCE",
    "ELEVATION_EDGES",
    "elevation_edges_for",
    "teacher_config",
    "fast_bfloat16",
    "TEACHER_TRAINING",
    "RENDER_SETTINGS",
    "render_views",
    "render_dataset",
    "scene_cond",
    "teacher_cond",
    "make_scenes_schedule",
    "train_scenes_teacher",
    "load_scenes_teacher",
    "sample_scenes",
    "save_sample_grid",
    "save_teacher_grid",
    "train_and_save",
]

IMAGE_SIZE = 32
BACKGROUND = 0.5
TEACHER_FILE = "scenes_teacher.safetensors"
STATS_FILE = "scenes_teacher_stats.json"
GRID_FILE = "scenes_teacher_samples.png"

# How the training images are made (also stored in the teacher's meta).
RENDER_SETTINGS = dict(
    image_size=IMAGE_SIZE,
    supersample=2,
    n_samples=40,
    bake_resolution=96,
    background=BACKGROUND,
    radius=DEFAULT_RADIUS,
    fov_deg=DEFAULT_FOV_DEG,
    elevation_range=list(DEFAULT_ELEVATION_RANGE),
)
N_VIEWS_PER_PROMPT = 512  # rendered once per training run; doubled by the horizontal flip
# elevation bins of the teacher's third label column (degrees; the training range split into 4 equal bins)
ELEVATION_EDGES: tuple[float, ...] = (0.0, 10.0, 20.0, 30.0, 40.0)


def elevation_edges_for(bins: int | None) -> tuple[float, ...] | None:
    """Edges of ``bins`` equal elevation bins over the training range (None or 0: None, no elevation label, as
    the committed teacher)."""
    if bins is None:
        return None
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 0:
        raise ValueError(f"elevation_bins: expected a non-negative integer (0: no elevation label), got {bins!r}")
    if bins == 0:
        return None
    lo, hi = DEFAULT_ELEVATION_RANGE
    return tuple(lo + (hi - lo) * i / bins for i in range(bins + 1))


def teacher_config(elevation_edges: Sequence[float] | None = None, camera: bool = False) -> dict:
    """The teacher's architecture; its label columns are (prompt, view), then the elevation bin when
    ``elevation_edges`` is given, then the camera's azimuth and elevation (angle columns) when ``camera``."""
    cond = (len(PROMPTS), len(VIEW_NAMES)) + ((len(elevation_edges) - 1,) if elevation_edges is not None else ())
    angles = (len(cond), len(cond) + 1) if camera else ()
    cond = cond + ((ANGLE_CLASSES, ANGLE_CLASSES) if camera else ())
    cfg = dict(in_channels=3, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attn_levels=(2,),
               cond_classes=cond)
    if camera:
        cfg["angle_columns"] = angles
    return cfg


TEACHER_CONFIG = teacher_config(camera=True)  # the committed teacher's: (prompt, view, azimuth, elevation) labels
# the commands that reproduce the committed teacher, each continuing the previous one's file (bfloat16 autocast
# where the CPU has it, else float32: the bits differ between machines)
REPRODUCE = (
    "carv train-teacher scenes --out runs/teachers/v1",
    "carv train-teacher scenes --init runs/teachers/v1/scenes_teacher.safetensors --camera --steps 1200 --lr 0.001 "
    "--warmup 100 --out runs/teachers/c1",
    "carv train-teacher scenes --init runs/teachers/c1/scenes_teacher.safetensors --camera --steps 1000 --lr 0.0005 "
    "--warmup 50",
)
TEACHER_TRAINING = dict(steps=1500, batch_size=64, lr=2e-3, warmup=200, label_dropout=0.1, ema_decay=0.999)
AMP_DTYPE = torch.bfloat16
GRID_GUIDANCE = 3.0
GRID_DDIM_STEPS = 50


def assets_dir() -> Path:
    """The package's data folder holding the committed weights (``src/carv/assets``)."""
    return Path(__file__).resolve().parent.parent / "assets"


def make_scenes_schedule() -> VPSchedule:
    return VPSchedule.from_betas(1e-4, 0.02, 1000, "linear")


def _prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    return [get_scene(p).prompt for p in prompts]


def scene_cond(prompt: str, cameras: Cameras | Tensor | Sequence[float],
               prompts: Sequence[str] = PROMPTS,
               elevation_edges: Sequence[float] | None = None, camera: bool = False) -> Tensor:
    """Teacher labels ``[B, 2]`` or ``[B, 3]`` (long) for one prompt seen from ``B`` cameras.

    ``prompts`` is the teacher's prompt list (``teacher.meta["prompts"]``; default: this version's).
    ``elevation_edges`` the teacher's elevation bins (``teacher.meta.get("elevation_edges")``; default None: a
    teacher with (prompt, view) labels only, which also accepts ``cameras`` as a list of
    azimuths in degrees). ``camera`` (``teacher.meta.get("camera_columns")``): append the cameras' azimuth and
    elevation as angle columns (:func:`carv.teachers.unet.angle_label`).
    """
    key = normalize_prompt(prompt)
    prompts = [normalize_prompt(p) for p in prompts]
    if key not in prompts:
        raise ValueError(f"prompt: the teacher was not trained on {prompt!r}; allowed prompts: {prompts}")
    if isinstance(cameras, Cameras):
        views, device = cameras.view_labels, cameras.device
    elif elevation_edges is not None or camera:
        raise TypeError(f"cameras: a teacher with elevation or camera labels needs Cameras (their elevations), "
                        f"got {type(cameras).__name__}; pass elevation_edges=None and camera=False for (prompt, "
                        f"view) labels only")
    else:
        az = torch.as_tensor(cameras, dtype=torch.float64).reshape(-1)
        views, device = view_label(az), az.device
    p = torch.full_like(views, prompts.index(key))
    cols = [p, views]
    if elevation_edges is not None:
        cols.append(cameras.elevation_labels(elevation_edges))
    if camera:
        cols += [angle_label(cameras.azimuth_deg).to(device), angle_label(cameras.elevation_deg).to(device)]
    return torch.stack(cols, -1).to(device)


def teacher_cond(teacher: UNetTeacher, prompt: str, cameras: Cameras) -> Tensor:
    """:func:`scene_cond` for ``teacher``: its prompt list, and elevation or camera columns when its meta says it
    was trained with them (the one place that reads those conventions from a teacher file)."""
    meta = teacher.meta
    return scene_cond(prompt, cameras, meta.get("prompts", PROMPTS), meta.get("elevation_edges"),
                      bool(meta.get("camera_columns", False)))


@torch.no_grad()
def render_views(prompt: str, cameras: Cameras, baked: bool = True, **overrides) -> Tensor:
    """Ground-truth images ``[B, 3, 32, 32]`` in ``[-1, 1]`` of ``prompt`` from ``cameras``, made the way
    the training images are (:data:`RENDER_SETTINGS`). ``baked=False`` renders the analytic field
    (exact, slower); ``overrides`` replace ``supersample``/``n_samples``/``image_size``."""
    scene = get_scene(prompt)
    cfg = {**RENDER_SETTINGS, **overrides}
    field = scene.bake(cfg["bake_resolution"]) if baked else scene
    out = render(field, cameras, cfg["image_size"], n_samples=cfg["n_samples"], bound=scene.aabb,
                 background=cfg["background"], supersample=cfg["supersample"], chunk_cameras=64)
    return out.rgb * 2.0 - 1.0


@torch.no_grad()
def render_dataset(n_per_prompt: int, generator: torch.Generator, prompts: Sequence[str] = PROMPTS,
                   baked: bool = True, progress: bool = False,
                   elevation_edges: Sequence[float] | None = None, camera: bool = False,
                   **overrides) -> tuple[Tensor, Tensor]:
    """``(images [N, 3, 32, 32] in [-1, 1], labels [N, 2 or 3])``: ``n_per_prompt`` random views of each prompt
    (labels from :func:`scene_cond` with ``elevation_edges``)."""
    if isinstance(n_per_prompt, bool) or not isinstance(n_per_prompt, int) or n_per_prompt < 1:
        raise ValueError(f"n_per_prompt: expected a positive integer, got {n_per_prompt!r}")
    cfg = {**RENDER_SETTINGS, **overrides}
    all_prompts = list(PROMPTS)
    xs, ys = [], []
    for prompt in progress_bar(_prompt_list(prompts), progress, desc="render scenes"):
        cams = random_cameras(n_per_prompt, generator, elevation_range=tuple(cfg["elevation_range"]),
                              radius=cfg["radius"], fov_deg=cfg["fov_deg"])
        xs.append(render_views(prompt, cams, baked=baked, **overrides))
        ys.append(scene_cond(prompt, cams, all_prompts, elevation_edges, camera))
    return torch.cat(xs), torch.cat(ys)


def train_scenes_teacher(seed: int = 0, n_per_prompt: int | None = None, progress: bool = True,
                         log=None, elevation_edges: Sequence[float] | None = None,
                         init: str | Path | None = None, camera: bool = False,
                         **overrides) -> tuple[CompactUNet, dict]:
    """Render the dataset and train the teacher (``overrides`` replace :data:`TEACHER_TRAINING`
    keywords, e.g. ``steps=100`` for a smoke run; ``elevation_edges=None`` trains (prompt, view) labels only).

    ``init``: a teacher file to continue from (its weights; a missing elevation column is added with a zero
    embedding, so training starts from exactly that teacher's predictions). Returns (EMA model, stats)."""
    unknown = set(overrides) - set(TEACHER_TRAINING)
    if unknown:
        raise ValueError(
            f"overrides: unknown training keyword(s) {sorted(unknown)}; allowed: {sorted(TEACHER_TRAINING)}"
        )
    if n_per_prompt is None:  # camera teachers do not flip, so they render twice the views instead
        n_per_prompt = N_VIEWS_PER_PROMPT * (2 if camera else 1)
    torch.manual_seed(seed)  # parameter init; the training loop uses its own generator
    model = CompactUNet(**teacher_config(elevation_edges, camera))
    if init is not None:  # before the dataset's minutes of rendering: a bad file fails at once
        _load_for_finetune(model, init)
    t0 = time.perf_counter()
    images, labels = render_dataset(n_per_prompt, torch.Generator().manual_seed(seed), progress=progress,
                                    elevation_edges=elevation_edges, camera=camera)
    render_time = time.perf_counter() - t0

    def sample_batch(batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        i = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = images[i]
        if camera:  # no flip: the mirror image is lit from the other side, not the view from -azimuth
            return x, labels[i]
        flip = torch.rand(batch_size, generator=g) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x), labels[i]

    cfg = {**TEACHER_TRAINING, **overrides}
    ema, stats = train_ddpm(model, make_scenes_schedule(), sample_batch, seed=seed, progress=progress, log=log,
                            amp_dtype=AMP_DTYPE if fast_bfloat16() else None, **cfg)
    stats.update(num_params=sum(p.numel() for p in ema.parameters()), n_train_images=int(images.shape[0]),
                 dataset_render_time_s=render_time)
    return ema, stats


def fast_bfloat16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX). Where it does, bfloat16 autocast
    makes a training step about 1.6x faster; where it does not (e.g. the AMD EPYC hosts here, no
    ``avx512_bf16``) it is emulated and a step is about 20x slower than in float32 (50 s against 2.5 s)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _load_for_finetune(model: CompactUNet, path: str | Path) -> None:
    """Copy a teacher file's weights into ``model``; label tables that ``model`` has and the file lacks (an
    added elevation column) start at zero, so ``model`` predicts exactly what the file's teacher does."""
    try:
        src = load_unet_teacher(path).model
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"init: {e}") from None
    want, have = model.cond_classes, src.cond_classes
    if want[:len(have)] != have or src.angle_columns != tuple(i for i in model.angle_columns if i < len(have)):
        raise ValueError(f"init: {str(path)!r} has label columns {have}, which are not a prefix of {want}")
    state = src.state_dict()
    for i in range(len(have), len(want)):
        if i in model.angle_columns:  # a fresh angle MLP: its last layer is zero, so it adds nothing yet
            state.update({f"label_emb.{i}.{k}": v for k, v in model.label_emb[i].state_dict().items()})
        else:
            state[f"label_emb.{i}.weight"] = torch.zeros_like(model.label_emb[i].weight)
    model.load_state_dict(state)


def teacher_meta(elevation_edges: Sequence[float] | None = None, camera: bool = False) -> dict:
    return {
        "prompts": list(PROMPTS),
        "views": list(VIEW_NAMES),
        "cond_columns": ["prompt", "view"] + (["elevation"] if elevation_edges is not None else [])
                        + (["azimuth_angle", "elevation_angle"] if camera else []),
        "elevation_edges": None if elevation_edges is None else [float(e) for e in elevation_edges],
        "camera_columns": bool(camera),
        "view_rule": "azimuth in degrees, wrapped to (-180, 180]: |az| < 45 front (0), |az| > 135 back (2), "
                     "else side (1); null labels = (n_prompts, 3)",
        "camera_convention": "+z up, objects face +x, azimuth from +x towards +y, camera looks at the origin",
        "value_range": [-1.0, 1.0],
        "render": RENDER_SETTINGS,
    }


def load_scenes_teacher(device: str | torch.device = "cpu", path: str | Path | None = None) -> UNetTeacher:
    """The committed text-to-3D teacher (``assets/scenes_teacher.safetensors``), frozen, in eval mode.

    ``teacher.meta["prompts"]`` is its prompt list; build labels with :func:`scene_cond`.
    """
    p = Path(path) if path is not None else assets_dir() / TEACHER_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"path: no scenes teacher weights at {str(p)!r}; run `carv train-teacher scenes` to create them"
        )
    return load_unet_teacher(p, device=device)


def sample_scenes(teacher: UNetTeacher, cond: Tensor, guidance_scale: float = GRID_GUIDANCE,
                  steps: int = GRID_DDIM_STEPS, seed: int = 0, batch_size: int = 256) -> Tensor:
    """DDIM samples ``[N, 3, 32, 32]`` in ``[-1, 1]`` for labels ``cond [N, 2]`` (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, cond.shape[0], batch_size):
        c = cond[s:s + batch_size]
        out.append(ddim_sample(teacher, (c.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE), c, guidance_scale, steps, g))
    return torch.cat(out)


def save_sample_grid(rows: list[Tensor], row_names: list[str], col_names: list[str], path: str | Path,
                     title: str | None = None) -> None:
    """Save a grid (``rows[i]`` is ``[ncol, 3, H, W]`` in ``[-1, 1]``) with row and column labels."""
    save_image_grid(rows, row_names, path, col_names, title, value_range=(-1.0, 1.0), cell=0.8, dpi=100, fontsize=6,
                    left=0.2)


def _default_grid_path(out_dir: Path) -> Path:
    """``docs/`` of the source checkout when writing into the package assets of one, else ``out_dir``."""
    repo = assets_dir().parents[2]
    if out_dir.resolve() == assets_dir() and (repo / "pyproject.toml").is_file():
        return repo / "docs" / GRID_FILE
    return out_dir / GRID_FILE


def heldout_set(seed: int = 12345, n_per_prompt: int = 16, baked: bool = True,
                elevation_edges: Sequence[float] | None = None, camera: bool = False,
                **overrides) -> tuple[Tensor, Tensor]:
    """Fresh renders (cameras from ``seed``, disjoint from training draws) for held-out checks."""
    return render_dataset(n_per_prompt, torch.Generator().manual_seed(seed), baked=baked,
                          elevation_edges=elevation_edges, camera=camera, **overrides)


def save_teacher_grid(teacher: UNetTeacher, path: str | Path, seed: int = 1) -> float:
    """The teacher's sample grid PNG at ``path``: per prompt, the ground truth from the front, side and back
    (azimuth 0/90/180, elevation 20), then two DDIM samples (:data:`GRID_DDIM_STEPS` steps, guidance
    :data:`GRID_GUIDANCE`, noise seed ``seed``) per view, labelled as the teacher's file says
    (:func:`teacher_cond`). Returns the sampling time in seconds."""
    gt_cams = cameras_from_angles([0.0, 90.0, 180.0], 20.0)
    sample_cams = cameras_from_angles([0.0, 0.0, 90.0, 90.0, 180.0, 180.0], 20.0)
    prompts = teacher.meta.get("prompts", PROMPTS)
    cond = torch.cat([teacher_cond(teacher, prompt, sample_cams) for prompt in prompts])
    t0 = time.perf_counter()
    samples = sample_scenes(teacher, cond, seed=seed)
    sample_time = time.perf_counter() - t0
    rows = [torch.cat([render_views(prompt, gt_cams), samples[p * 6:(p + 1) * 6]]) for p, prompt in enumerate(prompts)]
    col_names = ["GT front", "GT side", "GT back"] + [VIEW_NAMES[v] for v in (0, 1, 2) for _ in range(2)]
    labels = "prompt, view"
    if teacher.meta.get("elevation_edges") is not None:
        labels += ", elevation bin"
    if teacher.meta.get("camera_columns", False):
        labels += ", camera azimuth and elevation"
    title = (f"scenes teacher: ground truth (az 0/90/180, el 20) | DDIM {GRID_DDIM_STEPS} steps, "
             f"guidance {GRID_GUIDANCE}, labels ({labels}) at az 0/90/180, el 20")
    save_sample_grid(rows, list(prompts), col_names, path, title)
    return sample_time


def train_and_save(out_dir: str | Path | None = None, seed: int = 0, grid_path: str | Path | None = None,
                   progress: bool = True, n_per_prompt: int | None = None,
                   elevation_edges: Sequence[float] | None = None, init: str | Path | None = None,
                   camera: bool = False, **overrides) -> dict:
    """Render the dataset, train the teacher, evaluate it, and write

    - ``out_dir/scenes_teacher.safetensors`` (weights, architecture, schedule, prompts and view rule),
    - ``out_dir/scenes_teacher_stats.json`` (timings, threads, machine load, losses),
    - the sample grid PNG (prompt x view: ground truth, then DDIM 50-step samples with guidance 3):
      ``grid_path``, default ``docs/scenes_teacher_samples.png`` of the source checkout when ``out_dir``
      is the package assets folder, else ``out_dir/scenes_teacher_samples.png``.

    ``out_dir`` defaults to the package assets folder. ``overrides`` go to the training loop (e.g. ``steps``);
    ``elevation_edges=None`` trains a teacher with (prompt, view) labels only; ``init`` continues from a teacher
    file (:func:`train_scenes_teacher`). Returns the stats dict.
    """

    out = Path(out_dir) if out_dir is not None else assets_dir()
    out.mkdir(parents=True, exist_ok=True)
    grid = Path(grid_path) if grid_path is not None else _default_grid_path(out)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    edges = elevation_edges
    model, t_stats = train_scenes_teacher(seed=seed, n_per_prompt=n_per_prompt, progress=progress,
                                          elevation_edges=edges, init=init, camera=camera, **overrides)
    meta = {**teacher_meta(edges, camera), "guidance_default": GRID_GUIDANCE, "seed": seed, **t_stats}
    save_unet_teacher(out / TEACHER_FILE, model, make_scenes_schedule(), meta=meta)
    teacher = load_scenes_teacher(path=out / TEACHER_FILE)
    load_after_train = os.getloadavg()

    # --- evaluation on fresh views (never seen in training)
    x_ho, y_ho = heldout_set(seed=seed + 12345, elevation_edges=edges, camera=camera)
    ho_mse, ho_se = heldout_denoising_mse(teacher, x_ho, y_ho)
    ho_uncond, ho_uncond_se = heldout_denoising_mse(teacher, x_ho, teacher.null_cond(y_ho))
    x_tr, _ = render_dataset(32, torch.Generator().manual_seed(seed + 999), elevation_edges=edges, camera=camera)
    lin_mse, lin_se = heldout_denoising_mse(GaussianLinearTeacher(x_tr, teacher.schedule), x_ho, y_ho)

    sample_time = save_teacher_grid(teacher, grid, seed=seed + 1)

    command = "carv train-teacher scenes" + (f" --seed {seed}" if seed else "")
    if init is not None:
        command += f" --init {init}"
    for key in ("steps", "lr", "warmup"):
        if key in overrides and overrides[key] != TEACHER_TRAINING[key]:
            command += f" --{key} {overrides[key]}"
    if edges is not None:
        command += f" --elevation-bins {len(edges) - 1}"
    if camera:
        command += " --camera"
    stats = {
        "command": command,
        "machine": {"platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after_teacher": [round(v, 2) for v in load_after_train],
                    "note": "2-core machine shared with other jobs; a load average above 2 means the "
                            "timings are inflated by contention"},
        "teacher": {"config": teacher_config(edges, camera), "elevation_edges": edges, "camera_columns": camera,
                    "init": None if init is None else str(init), "training": {**TEACHER_TRAINING, **overrides},
                    "n_views_per_prompt": t_stats["n_train_images"] // len(PROMPTS), "render": RENDER_SETTINGS,
                    **t_stats,
                    "heldout_denoising_mse": ho_mse, "heldout_denoising_mse_se": ho_se,
                    "heldout_denoising_mse_unconditional": ho_uncond,
                    "heldout_denoising_mse_unconditional_se": ho_uncond_se,
                    "heldout_denoising_mse_best_linear_baseline": lin_mse,
                    "heldout_denoising_mse_best_linear_baseline_se": lin_se,
                    "denoising_mse_protocol": "conditional (its own labels), 16 fresh views per prompt "
                                              f"(camera seed {seed + 12345}), 10 midpoint timesteps per "
                                              "image, noise seed 0; eps_hat = 0 scores 1.0"},
        "samples": {"ddim_steps": GRID_DDIM_STEPS, "guidance_scale": GRID_GUIDANCE,
                    "n": 6 * len(PROMPTS), "sampling_time_s": sample_time},
        "total_time_s": time.perf_counter() - t_start,
    }
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=2, default=_json_default) + "\n")
    return stats


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
