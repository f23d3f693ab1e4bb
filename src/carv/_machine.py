"""What a run folder records about the machine it ran on (so ratios can be read against their load)."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["machine_info", "loadavg"]


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded to 0.01."""
    return [round(v, 2) for v in os.getloadavg()]


def machine_info(**extra) -> dict:
    """Platform, CPU count, torch version and thread count, followed by ``extra`` fields."""
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), **extra}
