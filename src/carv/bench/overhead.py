"""Overheads of carv's own machinery, measured side by side in one run.

1. Sampler: drawing ``10^6`` timesteps with importance weights and stratification (each stratify
   mode) against ``torch.randint`` of the same size. Repeats are interleaved and the ratio of medians
   is reported, so load on a shared machine affects both sides alike.
2. Accountant: the per-step cost of what the accountant adds (variance components of the per-draw
   values, the cost meter's timers, the auto-K update) against one teacher call on the same batch.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from carv._runfolder import atomic_write_json
from carv.accounting import AutoK, CostMeter, variance_components
from carv.estimator import reduce_draws
from carv.schedules import VPSchedule
from carv.teachers.unet import CompactUNet
from carv.timesteps import STRATIFY_MODES, TimestepSampler

__all__ = ["sampler_overhead", "accountant_overhead", "run_overhead"]


def _interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each function per round; every round runs every function once, back to back."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in _interleaved_times(fns, repeats, warmup).items()}


def _paired_ratio(times: dict[str, list[float]], base: str) -> dict[str, float]:
    """Median over rounds of ``time / time of base in the same round``: the load of another job changes
    from second to second, and a ratio taken within one round (milliseconds apart) cancels it better than
    a ratio of medians taken over the whole run."""
    return {k: statistics.median(a / b for a, b in zip(v, times[base], strict=True))
            for k, v in times.items() if k != base}


def sampler_overhead(n: int = 1_000_000, T: int = 1000, repeats: int = 30, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sched = VPSchedule.from_betas(1e-4, 0.02, T)
    imp = 1.0 - sched.alphas_cumprod
    K = 16
    R = n // K
    fns: dict[str, Callable[[], object]] = {"torch.randint": lambda: torch.randint(0, T, (R, K), generator=g)}
    for mode in STRATIFY_MODES:
        s = TimestepSampler(T, importance=imp, floor=0.1, stratify=mode)
        fns[f"importance+{mode}"] = (lambda s=s: s.sample(R, K, g))
    times = _interleaved_times(fns, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"n": R * K, "T": T, "R": R, "K": K, "repeats": repeats, "median_s": med,
            "ratio_vs_randint": _paired_ratio(times, "torch.randint"),
            "ratio_of_medians": {k: v / med["torch.randint"] for k, v in med.items() if k != "torch.randint"}}


def accountant_overhead(R: int = 2, K: int = 8, shape: tuple[int, ...] = (4, 32, 32), repeats: int = 30,
                        seed: int = 0) -> dict:
    """Accountant cost per step vs one teacher forward on the ``R*K`` batch (a compact UNet teacher)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CompactUNet(in_channels=shape[0], base_channels=32, channel_mults=(1, 2, 2)).eval()
    x = torch.randn(R * K, *shape, generator=g)
    t = torch.randint(0, 1000, (R * K,), generator=g)
    values = torch.randn(R, K, *shape, generator=g)
    weight = torch.rand(R, K, generator=g)
    meter, autok = CostMeter(), AutoK(k_init=K, every=1)
    meter.add("upstream", 1.0)
    meter.add("draw", 0.1)

    def teacher():
        with torch.no_grad():
            model(x, t)

    weighted = values * weight[..., None, None, None]

    def reduce():  # the estimator's own work, paid with or without the accountant
        reduce_draws(values, weight, t.reshape(R, K), stats=False)

    def accountant():  # what the accountant adds per step: components, two timers, the auto-K update
        comps = variance_components(weighted)
        with meter.stage("upstream", count=R):
            pass
        with meter.stage("draw", count=R * K):
            pass
        autok.observe(comps.between, comps.within)
        autok.step(meter)

    med = _interleaved_medians({"teacher": teacher, "reduce": reduce, "accountant": accountant}, repeats)
    return {"R": R, "K": K, "shape": list(shape), "repeats": repeats, "median_s": med,
            "accountant_s": med["accountant"], "fraction_of_teacher_call": med["accountant"] / med["teacher"],
            "teacher": "CompactUNet(base 32, mults 1,2,2), 2.9M params, no grad"}


def run_overhead(json_path: str | Path | None = None, quick: bool = False) -> dict:
    reps = 10 if quick else 30
    res = {
        "command": "carv bench overhead" + (" --quick" if quick else "") + f" --threads {torch.get_num_threads()}",
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "sampler": sampler_overhead(repeats=3 * reps),
        "accountant": accountant_overhead(repeats=reps),
    }
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, res)
    return res
