"""``carv bench sd``: latent score distillation with a Stable Diffusion pipeline, measured side by side.

Two measurements, on CUDA with a local (real or tiny) pipeline, or on CPU in smoke mode with the tiny
random-weight pipeline (:mod:`carv.teachers.tiny_sd`):

- **Cost split and ECM.** The upstream is DreamFusion's: a learnable voxel grid rendered from ``R`` random
  cameras (carv's renderer), resized (bilinear) to the VAE's input size, VAE-encoded (posterior mean); its
  backward pass runs once per step. The teacher draws are guided UNet calls. Configurations: uniform
  timesteps at ``K`` in {1, 2, 4, 8} and importance (``q ~ p w``, floor 0.1) + per-upstream strata at
  ``K`` in {2, 4, 8}, all at ``R = 2``, interleaved replicates (:func:`carv.bench.harness.measure`), the
  variance of the *grid* gradient against a high-sample reference (its own variance removed), ECM against
  uniform ``R = 2, K = 1``. Stage costs are medians per render (``c_up``: render + resize + encode +
  backward) and per guided draw (``c_draw``), pooled over the interleaved run.
- **Peak memory** of one latent SDS step (render-free: an image parameter at 8x the latent size, VAE encode,
  SDS, backward) at ``K`` in {1, 4, 16, 64} with the default chunking (``max_batch="auto"``) and without
  chunking (``max_batch=None``, small ``K`` only). On CUDA: ``torch.cuda.max_memory_allocated`` above what
  was allocated before the step. On CPU: each ``K`` runs in a fresh process; the figure is the process's
  peak resident set (``ru_maxrss``) after the step minus its resident set just before it.

Random weights make the tiny pipeline's cost ratio and variance split unrepresentative of a real model:
its numbers only show that the script runs; the figures that matter come from a GPU with a real pipeline.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from carv._machine import loadavg, set_threads
from carv._runfolder import atomic_write_json
from carv.accounting import CostMeter, timed_estimate
from carv.bench.harness import Config, measure, pooled_figures, reference_mean, run_record
from carv.objectives.sds import ScoreDistillation
from carv.objectives.weighting import weight_table
from carv.render import VoxelGrid, random_cameras, render
from carv.timesteps import TimestepSampler

__all__ = ["run_sd_bench", "step_memory"]

METHODS = {"uniform": ("none", "none"), "importance+strata": ("weight", "per_upstream")}


def _load(pipeline: str | None, device: torch.device, dtype: torch.dtype | None, tmp: Path):
    from carv.teachers.diffusers import DiffusersTeacher

    if pipeline is None:
        from carv.teachers.tiny_sd import save_tiny_sd_pipeline

        pipeline = str(tmp / "tiny-sd") if (tmp / "tiny-sd" / "model_index.json").is_file() else str(
            save_tiny_sd_pipeline(tmp / "tiny-sd"))
    return DiffusersTeacher.from_pretrained(pipeline, dtype=dtype, device=device), pipeline


def _sampler(teacher, method: str) -> TimestepSampler:
    proposal, stratify = METHODS[method]
    imp = weight_table("sds", teacher.schedule) if proposal == "weight" else None
    return TimestepSampler.from_percent(teacher.schedule.num_timesteps, 0.02, 0.98, importance=imp,
                                        floor=0.1 if imp is not None else 0.0, stratify=stratify,
                                        device=teacher.unet.device)


# --------------------------------------------------------------------------- memory
def step_memory(teacher, K: int, latent_size: int, R: int = 1, guidance_scale: float = 100.0,
                max_batch: Any = "auto") -> dict[str, float]:
    """Peak memory (MiB) of one latent SDS step above what was in use before it (see the module doc)."""
    dev = teacher.unet.device
    img = torch.rand(R, 3, 8 * latent_size, 8 * latent_size, device=dev, requires_grad=True)
    emb = teacher.encode_prompt("a hamburger")
    cond, uncond = emb.for_views(torch.zeros(R), torch.zeros(R))
    sds = ScoreDistillation(teacher, _sampler(teacher, "uniform"), K=K, guidance_scale=guidance_scale,
                            max_batch=max_batch)
    cond, uncond = cond.to(dev), uncond.to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = _rss_bytes()
        max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = sds(teacher.encode_images(img, size=None, chunk=1), cond, 0, uncond=uncond)
    out.loss.backward()
    secs = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        return {"K": K, "peak_mib": peak / 2**20, "seconds": secs, "measure": "cuda max_memory_allocated"}
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"K": K, "peak_mib": (after - before) / 2**20, "seconds": secs, "measure": "ru_maxrss - rss before",
            "step_set_the_peak": after > max_before}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _memory_child(args: str) -> None:
    """Entry point of the per-K CPU process: prints one JSON line."""
    a = json.loads(args)
    torch.set_num_threads(1)
    from carv.teachers.diffusers import DiffusersTeacher

    teacher = DiffusersTeacher.from_pretrained(a["pipeline"])
    print(json.dumps(step_memory(teacher, a["K"], a["latent_size"], a["R"], a["guidance_scale"], a["max_batch"])))


def _memory_rows(teacher, pipeline: str, Ks, latent_size: int, R: int, guidance_scale: float,
                 max_batch: Any) -> list[dict]:
    rows = []
    for K in Ks:
        if teacher.unet.device.type == "cuda":
            row = step_memory(teacher, K, latent_size, R, guidance_scale, max_batch)
        else:
            args = json.dumps({"pipeline": pipeline, "K": K, "latent_size": latent_size, "R": R,
                               "guidance_scale": guidance_scale, "max_batch": max_batch})
            res = subprocess.run([sys.executable, "-c", f"from carv.bench.sd import _memory_child; "
                                  f"_memory_child({args!r})"], capture_output=True, text=True, check=False)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode != 0 or not lines:
                raise RuntimeError(f"memory child for K={K} failed:\n{res.stderr[-2000:]}")
            row = json.loads(lines[-1])
        rows.append({**row, "max_batch": max_batch, "R": R, "latent_size": latent_size})
    return rows


# --------------------------------------------------------------------------- cost split and ECM
def _ecm_rows(teacher, device: torch.device, render_size: int, grid_res: int, reps: int, n_ref: int,
              guidance_scale: float, seed: int, progress: bool, smoke: bool = False) -> tuple[list[dict], dict]:
    emb = teacher.encode_prompt("a hamburger")
    vae_size = 8 * int(teacher.unet.config.sample_size)
    torch.manual_seed(seed)  # only the grid's initial values
    grid = VoxelGrid(grid_res, bound=1.0).to(device)
    grid.add_blob_(radius=0.5, peak=5.0)
    objectives: dict[tuple[str, int], ScoreDistillation] = {}

    def estimate(c: Config, gen: torch.Generator, meter: CostMeter):
        key = (c.method, c.K)
        if key not in objectives:
            objectives[key] = ScoreDistillation(teacher, _sampler(teacher, c.method), K=c.K,
                                                guidance_scale=guidance_scale)
        sds = objectives[key]
        cams = random_cameras(c.R, gen, (0.0, 40.0), 3.0, 40.0).to(device)
        cond, uncond = (e.to(device) for e in emb.for_views(cams.elevation_deg.cpu(), cams.azimuth_deg.cpu(),
                                                                     check_degrees=False))
        seed_ = int(torch.randint(0, 2**62, (1,), generator=gen))
        grid.zero_grad(set_to_none=True)

        def upstream():
            rgb = render(grid, cams, render_size, n_samples=32, bound=1.0).rgb
            rgb = F.interpolate(rgb, (vae_size, vae_size), mode="bilinear", align_corners=False)
            return teacher.encode_images(rgb, size=None)

        timed_estimate(upstream, lambda x: sds(x, cond, seed_, uncond=uncond), c.K, meter)
        return torch.cat([grid.density.grad.flatten(), grid.color.grad.flatten()])

    configs = [Config("uniform", 2, k) for k in (1, 2, 4, 8)] + [Config("importance+strata", 2, k) for k in (2, 4, 8)]
    ref, ref_var = reference_mean(estimate, Config("uniform", 8, 8), n_ref, seed=seed + 1, progress=progress)
    rows = measure(configs, estimate, ref, reps, seed=seed, progress=progress, desc="sd replicates",
                   reference_variance=ref_var, keep_replicates=True)
    summary = pooled_figures(rows, baseline=("uniform", 2, 1), bootstrap=200 if reps >= 10 else 0, seed=seed,
                             smoke=smoke)
    for r in rows:
        r.pop("replicates", None)
    summary["variance_of_reference"] = ref_var
    return rows, summary


def run_sd_bench(pipeline: str | None = None, smoke: bool = False, json_path: str | Path | None = None,
                 out_dir: str | Path = "runs/bench-sd", device: str | None = None, half: bool = True,
                 threads: int | None = None, seed: int = 0, progress: bool = True,
                 command: str | None = None, only: str | None = None) -> dict:
    """Run both measurements (see the module doc); writes ``sd_bench.json`` into ``out_dir`` (and ``json_path``)."""
    load_start = loadavg()
    set_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if (half and dev.type == "cuda") else None
    teacher, path = _load(pipeline, dev, dtype, out)
    latent = int(teacher.unet.config.sample_size)
    mem_latent = 64
    if smoke:
        mem_ks, reps, n_ref, render_size, grid_res, mem_none = (1, 4), 3, 3, 32, 16, (1,)
    else:
        mem_ks, reps, n_ref, render_size, grid_res, mem_none = (1, 4, 16, 64), 40, 24, 64, 48, (1, 4, 16)
    if only not in (None, "memory", "ecm"):
        raise ValueError(f"only: expected None, 'memory' or 'ecm', got {only!r}")
    t0 = time.perf_counter()
    rows, summary = ([], {}) if only == "memory" else _ecm_rows(teacher, dev, render_size, grid_res, reps, n_ref,
                                                                  100.0, seed, progress, smoke)
    t_ecm = time.perf_counter() - t0
    memory = []
    if only != "ecm":
        memory = _memory_rows(teacher, path, mem_ks, mem_latent, 1, 100.0, "auto")
        memory += _memory_rows(teacher, path, mem_none, mem_latent, 1, 100.0, None)
    res = {"run": run_record(command, load_start),
           "pipeline": pipeline or "tiny random-weight pipeline (carv.teachers.tiny_sd)",
           "device": str(dev), "dtype": str(teacher.dtype), "latent_size": latent, "render_size": render_size,
           "guidance_scale": 100.0, "rows": rows, "summary": summary, "memory": memory, "ecm_seconds": t_ecm,
           "smoke": smoke}
    atomic_write_json(out / "sd_bench.json", res)
    if json_path is not None:
        atomic_write_json(json_path, res)
    if progress:
        c_up, c_draw, ratio = summary.get("c_upstream_s"), summary.get("c_draw_s"), summary.get("cost_ratio")
        if c_up and c_draw:
            print(f"c_up {c_up * 1e3:.1f} ms per render, c_draw {c_draw * 1e3:.1f} ms per guided draw "
                  f"(ratio {ratio:.2f}; marginal seconds from the pooled stage model)")
        for r in rows:
            print(f"{r['method']:>18} R={r['R']} K={r['K']:<2} variance {r['variance']:.4g} "
                  f"(se {r['variance_se']:.2g}) cost {r['cost_s']:.3f} s ECM {r['ecm']:.2f}")
        for m in memory:
            print(f"memory K={m['K']:<2} max_batch={m['max_batch']}: {m['peak_mib']:.0f} MiB ({m['measure']})")
    return res
