"""Training the built-in teachers: plain DDPM epsilon-prediction with label dropout and an EMA.

Used by the scripts that reproduce the committed teacher weights (``carv train-teacher ...``);
it is not on any estimation path. One function serves every built-in teacher: the data source is a
callable ``sample_batch(batch_size, generator) -> (x0, labels)``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from carv._progress import progress_bar
from carv.schedules import VPSchedule, broadcast_to
from carv.teachers.unet import CompactUNet

__all__ = ["train_ddpm", "ddim_sample"]


def train_ddpm(
    model: CompactUNet,
    schedule: VPSchedule,
    sample_batch: Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]],
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup: int = 200,
    label_dropout: float = 0.1,
    ema_decay: float = 0.999,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> tuple[CompactUNet, dict]:
    """Train ``model`` to predict eps; returns (EMA copy of the model, stats).

    Each label column is independently replaced by its null index with probability
    ``label_dropout`` so that the model also learns the unconditional score (guidance).
    ``amp_dtype=torch.bfloat16`` runs the forward pass under autocast (weights, optimiser, EMA and
    the loss stay float32): on these AVX512-BF16 CPUs a 1.2 M-parameter UNet step at 32x32, batch 64
    drops from about 0.77 s to 0.47 s.
    """
    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps}")
    g = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_at(i: int) -> float:
        if i < warmup:
            return lr * (i + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    null = torch.tensor(model.cond_classes, dtype=torch.long)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = progress_bar(range(steps), progress, desc="train teacher")
    for i in bar:
        x0, labels = sample_batch(batch_size, g)
        b = x0.shape[0]
        t = torch.randint(0, schedule.num_timesteps, (b,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, t, eps)
        if labels is not None and model.cond_classes:
            labels = labels.reshape(b, -1)
            drop = torch.rand(labels.shape, generator=g) < label_dropout
            labels = torch.where(drop, null.expand_as(labels), labels)
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        with torch.autocast(x0.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            pred = model(x_t, t, labels)
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if (i + 1) % 50 == 0:
            recent = sum(losses[-50:]) / 50
            bar.set_postfix(loss=f"{recent:.4f}")
            if log is not None:
                log({"step": i + 1, "loss": recent, "time_s": time.perf_counter() - t0})
    stats = {
        "steps": steps,
        "batch_size": batch_size,
        "final_loss": sum(losses[-100:]) / min(100, len(losses)),
        "train_time_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "amp_dtype": None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
    }
    return ema.eval(), stats


@torch.no_grad()
def ddim_sample(
    teacher,
    shape: tuple[int, ...],
    cond: Tensor | None = None,
    guidance_scale: float = 1.0,
    steps: int = 50,
    generator: torch.Generator | None = None,
    clip: float | None = 1.0,
) -> Tensor:
    """Deterministic DDIM sampling from a teacher (for sample grids and held-out checks)."""
    sched = teacher.schedule
    T = sched.num_timesteps
    p = next(iter([*teacher.parameters(), *teacher.buffers()]), None)  # the teacher's device
    device = p.device if p is not None else torch.device("cpu")
    ts = torch.linspace(T - 1, 0, steps).round().long().to(device)
    gen_device = generator.device if generator is not None else device
    x = torch.randn(shape, generator=generator, device=gen_device).to(device)
    if isinstance(cond, Tensor):
        cond = cond.to(device)
    for i, t in enumerate(ts):
        tt = t.expand(shape[0])
        eps = teacher.guided_eps(x, tt, cond, guidance_scale)
        a, s = sched.a(tt, x.dtype), sched.s(tt, x.dtype)
        x0 = (x - broadcast_to(s, x) * eps) / broadcast_to(a, x)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (x - broadcast_to(a, x) * x0) / broadcast_to(s, x)
        if i + 1 < len(ts):
            tn = ts[i + 1].expand(shape[0])
            x = broadcast_to(sched.a(tn, x.dtype), x) * x0 + broadcast_to(sched.s(tn, x.dtype), x) * eps
        else:
            x = x0
    return x
