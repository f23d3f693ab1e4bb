"""What a run folder records about the machine it ran on (so ratios can be read against their load), and how
much memory it has free (so work that cannot fit is refused before allocating, naming what to lower)."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator

import torch

from carv._validate import check_threads

__all__ = ["machine_info", "loadavg", "free_memory", "check_fits", "MemoryBudgetError", "torch_threads", "set_threads"]


def set_threads(n: int | None, name: str = "threads") -> None:
    """``torch.set_num_threads(n)`` after checking ``n`` against the machine (at most 4 per CPU core: a huge count
    hangs or crashes torch); None leaves torch's choice. Every command sets its threads through this."""
    if n is not None:
        check_threads(n, name)
        torch.set_num_threads(n)


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded to 0.01."""
    return [round(v, 2) for v in os.getloadavg()]


def machine_info(**extra) -> dict:
    """Platform, CPU count, torch version and thread count, followed by ``extra`` fields."""
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), **extra}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads (None: unchanged), restoring the previous count afterwards."""
    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device`` (CUDA: the driver's free memory; CPU: the kernel's
    MemAvailable, lowered to the cgroup's limit when one is set), or None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no usable CUDA context: nothing to check against
            return None
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for ln in f:
                if ln.startswith("MemAvailable:"):
                    free = int(ln.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
        if limit != "max":
            free = min(free if free is not None else 1 << 62, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return free


class MemoryBudgetError(MemoryError, ValueError):
    """Work refused before allocating because it cannot fit the free memory; the message names what to lower."""


def check_fits(nbytes: int, device: torch.device | str, name: str, what: str) -> None:
    """Raise :class:`MemoryBudgetError` naming ``name`` when ``nbytes`` (an estimate of ``what``) exceed the free
    memory of ``device``, before anything is allocated. No check where the free memory cannot be told, nor below
    64 MiB (so the common small call reads no system file)."""
    if nbytes < 64 << 20:
        return
    free = free_memory(device)
    if free is not None and nbytes > free:
        raise MemoryBudgetError(f"{name}: {what} needs about {nbytes / 2**30:.2f} GiB (estimated), but only "
                                f"{free / 2**30:.2f} GiB is free on {torch.device(device)}")
