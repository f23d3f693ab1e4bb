"""carv's guidance inside a real threestudio checkout, on CPU: two DreamFusion training steps, and a comparison
with threestudio's own guidance at K = 1 on shared timesteps and noise.

    python benchmarks/threestudio_check.py /path/to/threestudio [--out DIR]

Run it in a venv that has threestudio's pure-Python dependencies (threestudio is not on the package registry):
torch (the CPU wheel is enough; no torchvision), diffusers, transformers, lightning, omegaconf, jaxtyping,
typeguard, nerfacc==0.5.3, "libigl<2.6", trimesh, PyMCubes, xatlas, opencv-python-headless, imageio, einops,
accelerate, wandb, envlight, and carv (``pip install -e .`` or ``PYTHONPATH=src``). What the script changes so
that threestudio runs on a CPU, and nothing else:

- ``tinycudann`` and ``nvdiffrast`` (CUDA-only builds) are stub modules whose contents raise when used
  (``tinycudann.free_temporary_memory`` is a no-op: threestudio's ``cleanup()`` calls it); ``torchvision`` and
  ``controlnet_aux`` are stubs only while threestudio is imported (only co3d data, zero123 / ControlNet guidance
  and the perceptual loss use them, and a DreamFusion run executes none of those);
- ``threestudio.utils.misc.get_device`` (always ``cuda:<rank>``) returns the CPU;
- the geometry's hash-grid encoding (tinycudann) becomes threestudio's own ``ProgressiveBandFrequency``, the
  background a solid colour, and nerfacc's ray marching (CUDA) a small CPU volume renderer registered here
  (uniform samples along each ray inside the scene's sphere, alpha compositing), deterministic so that a view
  rendered twice is the same;
- the VAE's posterior is taken at its mean (in both guidances), so both see the same latents.

The teacher is carv's tiny random-weight Stable Diffusion pipeline (77-token text encoder, as threestudio's prompt
processor assumes), written offline into ``--out``. carv's guidance is loaded by threestudio's own extension
loader (``launch.py``'s ``load_custom_modules``) from ``custom/threestudio-carv/__init__.py``, written into the
checkout if it is absent (the README's two lines). The runs use ``configs/dreamfusion-sd.yaml`` with threestudio's
DreamFusion system, random-camera data module, prompt processor and a Lightning ``Trainer`` (CSV logger: every
value the system logs is in ``<out>/<run>/csv/metrics.csv``).

Checks (PASS/FAIL table at the end; exit status 1 on any FAIL):

1. two DreamFusion steps with carv's guidance at K = 1 (``proposal: none``, ``stratify: none``); at each step
   threestudio's ``StableDiffusionGuidance`` is called on the same render with carv's timesteps and noise:
   ``loss_sds`` and ``grad_norm`` agree to a relative 1e-5, ``min_step`` / ``max_step`` (a ``max_step_percent``
   schedule [0, 0.98, 0.5, 2]: 980 then 740) are equal;
2. two steps at K = 4 with the default (``auto``) proposal, ``nan_policy: skip`` and ``auto_k`` (batch of 2
   views): every guidance output is logged through Lightning, ``between`` / ``within`` among them;
3. every ``system.guidance`` block of the checkout's ``configs/**/*.yaml`` builds carv's guidance through
   threestudio's ``BaseObject`` (the teacher path replaced by the tiny pipeline).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.machinery
import os
import shutil
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

CARV_EXTENSION = "from carv.integrations.threestudio import register\nregister()\n"
STUBBED_FOR_IMPORT = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                      "torchvision.models", "controlnet_aux")
RENDERER = "carv-check-cpu-volume-renderer"
REL_TOL = 1e-5


# --------------------------------------------------------------------------- making threestudio importable on CPU
class Unavailable:
    """What a stub module hands out: anything used raises, naming what was stubbed."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a stub in this check (CUDA-only or not installed)")

    def __getattr__(self, attr: str):
        return Unavailable(f"{self._name}.{attr}")


def stub_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def getattr_(attr: str):
        if attr.startswith("__"):  # __file__, __path__, ...: absent, as for a namespace without them
            raise AttributeError(attr)
        return Unavailable(f"{name}.{attr}")

    mod.__getattr__ = getattr_
    mod.__dict__.update(attrs)
    return mod


def import_threestudio(root: Path) -> types.ModuleType:
    import diffusers  # noqa: F401 - imported before the stubs, so neither sees a torchvision stub
    import transformers  # noqa: F401

    sys.modules["tinycudann"] = stub_module("tinycudann", free_temporary_memory=lambda: None)
    sys.modules["nvdiffrast"] = stub_module("nvdiffrast")
    sys.modules["nvdiffrast.torch"] = sys.modules["nvdiffrast"].torch = stub_module("nvdiffrast.torch")
    for name in STUBBED_FOR_IMPORT:
        sys.modules[name] = stub_module(name)
    sys.path.insert(0, str(root))
    try:
        import threestudio
    finally:
        for name in STUBBED_FOR_IMPORT:
            sys.modules.pop(name, None)
    cpu = lambda: torch.device("cpu")  # noqa: E731 - threestudio's get_device() is always cuda:<rank>
    for name, mod in list(sys.modules.items()):
        if (name == "threestudio" or name.startswith("threestudio.")) and hasattr(mod, "get_device"):
            mod.get_device = cpu
    return threestudio


def load_extension(root: Path) -> str:
    """The README's route: ``custom/threestudio-carv/__init__.py`` calling ``register()``, loaded by launch.py's
    own ``load_custom_modules``. Returns what was done."""
    ext = root / "custom" / "threestudio-carv" / "__init__.py"
    made = not ext.exists()
    if made:
        ext.parent.mkdir(parents=True, exist_ok=True)
        ext.write_text(CARV_EXTENSION)
    import importlib.util

    spec = importlib.util.spec_from_file_location("threestudio_launch", root / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    here = os.getcwd()
    os.chdir(root)
    try:
        launch.load_custom_modules()
    finally:
        os.chdir(here)
    return f"{'wrote' if made else 'found'} {ext.relative_to(root)}"


def register_cpu_renderer(threestudio) -> None:
    from dataclasses import dataclass

    from threestudio.models.renderers.base import VolumeRenderer

    @threestudio.register(RENDERER)
    class CPUVolumeRenderer(VolumeRenderer):
        """Uniform samples along each ray through the scene's sphere, alpha-composited (nerfacc's ray marching
        needs CUDA). Outputs the keys threestudio's DreamFusion system reads."""

        @dataclass
        class Config(VolumeRenderer.Config):
            num_samples_per_ray: int = 32

        def forward(self, rays_o, rays_d, light_positions, bg_color=None, **kwargs):
            B, H, W = rays_o.shape[:3]
            o, d = rays_o.reshape(-1, 3), F.normalize(rays_d.reshape(-1, 3), dim=-1)
            n = self.cfg.num_samples_per_ray
            mid = -(o * d).sum(-1, keepdim=True)  # the ray's closest approach to the origin
            u = (torch.arange(n, dtype=o.dtype) + 0.5) / n
            t = (mid - self.cfg.radius + 2 * self.cfg.radius * u).clamp_min(0.0)  # [N, n]
            pts = o[:, None] + d[:, None] * t[..., None]
            light = light_positions.reshape(B, 1, 1, 3).expand(B, H, W, 3).reshape(-1, 1, 3).expand(-1, n, 3)
            geo = self.geometry(pts.reshape(-1, 3), output_normal=self.material.requires_normal)
            rgb = self.material(viewdirs=d[:, None].expand(-1, n, 3).reshape(-1, 3), positions=pts.reshape(-1, 3),
                                light_positions=light.reshape(-1, 3), **geo, **kwargs).reshape(-1, n, 3)
            delta = 2 * self.cfg.radius / n
            alpha = 1.0 - torch.exp(-geo["density"].reshape(-1, n) * delta)
            trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1] + 1e-10], -1), -1)
            w = alpha * trans
            opacity = w.sum(-1, keepdim=True)
            bg = self.background(dirs=rays_d).reshape(-1, 3) if bg_color is None else bg_color.reshape(-1, 3)
            comp = (w[..., None] * rgb).sum(1) + bg * (1.0 - opacity)
            depth = (w * t).sum(-1, keepdim=True)
            return {"comp_rgb": comp.view(B, H, W, 3), "opacity": opacity.view(B, H, W, 1),
                    "depth": depth.view(B, H, W, 1)}


# --------------------------------------------------------------------------- runs
def overrides(sd: Path, guidance: dict, batch_size: int, exp_root: Path) -> dict:
    """What this check changes in configs/dreamfusion-sd.yaml (merged over it, as launch.py merges the command line)."""
    g = {"pretrained_model_name_or_path": str(sd), "half_precision_weights": False, "seed": 0,
         "max_step_percent": [0, 0.98, 0.5, 2], **guidance}
    system = {"guidance_type": "carv-stable-diffusion-guidance", "guidance": g,
              "prompt_processor": {"prompt": "a hamburger", "pretrained_model_name_or_path": str(sd), "spawn": False},
              "geometry": {"pos_encoding_config": {"otype": "ProgressiveBandFrequency", "n_frequencies": 4}},
              "background_type": "solid-color-background", "renderer_type": RENDERER,
              "renderer": {"radius": 2.0, "num_samples_per_ray": 32}, "loss": {"lambda_orient": 0.0}}
    return {"system": system, "data": {"batch_size": batch_size, "width": 32, "height": 32},
            "trainer": {"max_steps": 2, "precision": 32, "enable_progress_bar": False},
            "use_timestamp": False, "tag": "carv-check", "exp_root_dir": str(exp_root)}


class SharedDraws:
    """Calls threestudio's StableDiffusionGuidance on the render of the step that carv's guidance just took, with
    carv's timesteps and noise (patched into torch.randint / torch.randn_like for that call only)."""

    def __init__(self, ts_guidance):
        self.ts, self.rows = ts_guidance, []

    def compare(self, system, batch) -> None:
        carv = system.guidance
        out = carv.last_output
        t = out.draws.t.reshape(-1).clone()
        eps = out.draws.eps.reshape(t.shape[0], *out.grad.shape[1:]).clone()
        self.ts.update_step(system.true_current_epoch, system.true_global_step)
        with torch.no_grad():
            rgb = system(batch)["comp_rgb"]
        randint, randn_like = torch.randint, torch.randn_like
        torch.randint = lambda lo, hi, size, **kw: t.to(kw.get("device", t.device))
        torch.randn_like = lambda x, **kw: eps.to(x)
        try:
            ref = self.ts(rgb, system.prompt_processor(), **batch, rgb_as_latents=False)
        finally:
            torch.randint, torch.randn_like = randint, randn_like
        self.rows.append({"t": t.tolist(), "loss_sds": float(ref["loss_sds"]), "grad_norm": float(ref["grad_norm"]),
                          "min_step": ref["min_step"], "max_step": ref["max_step"]})


def run(threestudio, root: Path, out: Path, name: str, sd: Path, guidance: dict, batch_size: int,
        compare: bool) -> tuple[list[dict], list[dict], object]:
    """Two DreamFusion training steps as launch.py runs them (on the CPU). Returns the logged rows (metrics.csv),
    the comparison rows and the guidance."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf
    from pytorch_lightning.loggers import CSVLogger
    from threestudio.utils.config import load_config

    base = OmegaConf.load(root / "configs" / "dreamfusion-sd.yaml")
    base.system.background = {}  # the neural environment map's options do not apply to a solid colour
    shutil.rmtree(out / name, ignore_errors=True)  # a fresh run folder and metrics.csv each time
    cfg = load_config(OmegaConf.to_yaml(base), from_string=True, **overrides(sd, guidance, batch_size, out / name))
    pl.seed_everything(cfg.seed, verbose=False)
    dm = threestudio.find(cfg.data_type)(cfg.data)
    system = threestudio.find(cfg.system_type)(cfg.system, resumed=False)
    system.set_save_dir(str(out / name / "save"))
    shared = None
    callbacks = []
    if compare:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        ts_cfg = {"pretrained_model_name_or_path": str(sd), "half_precision_weights": False, "guidance_scale": 100.0,
                  "weighting_strategy": "sds", "min_step_percent": 0.02, "max_step_percent": [0, 0.98, 0.5, 2]}
        shared = SharedDraws(threestudio.find("stable-diffusion-guidance")(OmegaConf.create(ts_cfg)))

        class Compare(pl.Callback):
            def on_before_backward(self, trainer, pl_module, loss):
                shared.compare(pl_module, pl_module.carv_check_batch)

        class KeepBatch(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                pl_module.carv_check_batch = batch

        callbacks = [KeepBatch(), Compare()]
        DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    trainer = pl.Trainer(callbacks=callbacks, logger=CSVLogger(str(out / name), name="csv", version=0),
                         inference_mode=False, accelerator="cpu", devices=1, enable_checkpointing=False,
                         **{k: v for k, v in cfg.trainer.items() if k not in ("accelerator", "devices")})
    trainer.fit(system, datamodule=dm)
    with open(out / name / "csv" / "version_0" / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/loss_sds")]
    return logged, (shared.rows if shared else []), system.guidance


def config_blocks(root: Path, threestudio, sd: Path) -> tuple[int, list[str], set[str]]:
    """Build carv's guidance from every system.guidance block of configs/**/*.yaml (threestudio's resolvers)."""
    from omegaconf import OmegaConf

    cls = threestudio.find("carv-stable-diffusion-guidance")
    n, failed, warned = 0, [], set()
    for path in sorted((root / "configs").rglob("*.yaml")):
        cfg = OmegaConf.load(path)
        block = OmegaConf.select(cfg, "system.guidance")
        if block is None:
            continue
        try:
            g = OmegaConf.to_container(block, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation into a value this check does not set (e.g. data paths)
            g = OmegaConf.to_container(block, resolve=False)
            g = {k: v for k, v in g.items() if not (isinstance(v, str) and "${" in v)}
        g.update(pretrained_model_name_or_path=str(sd), half_precision_weights=False, image_size=64)
        n += 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cls(OmegaConf.create(g))
            except Exception as e:  # noqa: BLE001 - reported in the table
                failed.append(f"{path.relative_to(root)}: {type(e).__name__}: {e}")
        warned |= {str(w.message).split("=")[0] for w in caught if "ignored by carv" in str(w.message)}
    return n, failed, warned


# --------------------------------------------------------------------------- report
def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("threestudio", type=Path, help="a threestudio checkout (threestudio-project/threestudio)")
    ap.add_argument("--out", type=Path, default=Path("runs/threestudio-check"))
    args = ap.parse_args()
    root, out = args.threestudio.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for category in (FutureWarning, DeprecationWarning):  # threestudio's torch.cuda.amp decorators and the like
        warnings.filterwarnings("ignore", category=category)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from carv.teachers.tiny_sd import save_tiny_sd_pipeline

    sd = out / "tiny-sd"
    if not (sd / "model_index.json").exists():
        save_tiny_sd_pipeline(sd, token_length=77)
    threestudio = import_threestudio(root)
    how = load_extension(root)
    register_cpu_renderer(threestudio)
    os.chdir(out)  # threestudio's prompt cache (.threestudio_cache) and outputs go here
    print(f"threestudio {getattr(threestudio, '__version__', '?')} from {root}; carv's guidance: {how}, loaded by "
          f"launch.py's load_custom_modules; torch {torch.__version__}, CPU")

    rows = []
    k1 = {"K": 1, "proposal": "none", "stratify": "none", "nan_policy": "raise"}
    logged, cmp, _ = run(threestudio, root, out, "k1", sd, k1, 1, compare=True)
    print("\nK = 1, shared timesteps and noise (carv: the values Lightning logged; threestudio: its guidance)")
    print(f"{'step':>4} {'t':>5} {'carv loss_sds':>16} {'threestudio':>16} {'rel':>8} {'carv grad_norm':>16} "
          f"{'threestudio':>16} {'rel':>8} {'max_step':>9}")
    for i, (c, r) in enumerate(zip(logged, cmp, strict=False)):
        ls, gn = float(c["train/loss_sds"]), float(c["train/grad_norm"])
        print(f"{i:>4} {r['t'][0]:>5} {ls:>16.9g} {r['loss_sds']:>16.9g} {rel(ls, r['loss_sds']):>8.1e} {gn:>16.9g} "
              f"{r['grad_norm']:>16.9g} {rel(gn, r['grad_norm']):>8.1e} {int(float(c['train/max_step'])):>4}/"
              f"{r['max_step']}")
        rows.append((f"K=1 step {i}: loss_sds, grad_norm within {REL_TOL:g}",
                     rel(ls, r["loss_sds"]) < REL_TOL and rel(gn, r["grad_norm"]) < REL_TOL))
        rows.append((f"K=1 step {i}: min/max_step equal ({int(float(c['train/min_step']))}/"
                     f"{int(float(c['train/max_step']))})",
                     (int(float(c["train/min_step"])), int(float(c["train/max_step"])))
                     == (r["min_step"], r["max_step"])))
    rows.append(("K=1: two DreamFusion steps logged", len(logged) == 2 and len(cmp) == 2))
    rows.append(("K=1: update_step dispatched (max_step 980 -> 740)",
                 [int(float(c["train/max_step"])) for c in logged] == [980, 740]))

    k4 = {"K": 4, "proposal": "auto", "stratify": "per_upstream", "nan_policy": "skip", "auto_k": True,
          "probe_every": 1, "choose_every": 1}
    logged4, _, g4 = run(threestudio, root, out, "k4", sd, k4, 2, compare=False)
    keys = sorted(k for k in (logged4[-1] if logged4 else {}) if k.startswith("train/") and logged4[-1][k] != "")
    print(f"\nK = 4, auto proposal, nan_policy skip, auto_k, 2 views: logged {keys}")
    for i, c in enumerate(logged4):
        print(f"  step {i}: loss_sds {float(c['train/loss_sds']):.6g}  K {c['train/K']}  R {c['train/R']}  "
              f"between {c.get('train/between', '')}  within {c.get('train/within', '')}")
    rows.append(("K=4: two DreamFusion steps, every guidance output logged by Lightning",
                 len(logged4) == 2 and {"train/K", "train/R", "train/skipped", "train/between", "train/within"}
                 <= set(keys)))
    rows.append(("K=4: the accountant ran from update_step", g4.accountant is not None and g4.accountant.steps >= 1))

    n, failed, warned = config_blocks(root, threestudio, sd)
    print(f"\nconfigs: {n} guidance blocks built carv's guidance; {len(failed)} failed; ignored keys warned: "
          f"{sorted(warned)}")
    for f in failed:
        print("  " + f)
    rows.append((f"configs/**/*.yaml: all {n} guidance blocks build", not failed and n > 0))

    print(f"\n{'check':<72} result")
    for what, ok in rows:
        print(f"{what:<72} {'PASS' if ok else 'FAIL'}")
    print(f"\n{sum(ok for _, ok in rows)}/{len(rows)} passed in {time.perf_counter() - t0:.0f} s; logs under {out}")
    return 0 if all(ok for _, ok in rows) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
