"""Argument checks shared across layers (below every layer of DESIGN.md section 3; imports nothing from carv)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re

__all__ = ["check_positive_int", "check_int", "check_number", "check_seed", "check_field_types", "SEED_MAX",
           "check_threads", "threads_max", "THREADS_PER_CPU", "check_steps", "STEPS_MAX", "check_lr", "LR_MAX",
           "check_nonneg", "check_share", "check_span", "check_guidance", "GUIDANCE_MAX", "SEARCH_MAX",
           "check_timesteps", "check_finite_parameters"]

SEED_MAX = 2**63 - 1  # seeds are offset by small integers for sub-streams; torch takes up to 2**64 - 1
THREADS_PER_CPU = 4  # more threads than this per core only adds contention (and torch hangs at ~10^5 threads)
STEPS_MAX = 2**53  # step counters are written as JSON numbers, which are exact up to 2**53
LR_MAX = 100.0  # Adam moves a parameter by about lr per step; carv's parameters (logits, densities, network
#                 weights) live on a scale of 1-10, so a larger rate only turns them into inf/NaN on the first steps
GUIDANCE_MAX = 1e4  # classifier-free guidance scales the teacher's eps difference; threestudio's largest is 100, and
#                     far beyond 1e4 the float32 guided prediction only saturates or overflows to inf
SEARCH_MAX = 10**6  # integer ranges an exact search visits value by value (about a second of Python)


def threads_max() -> int:
    """The most torch threads a command accepts on this machine: :data:`THREADS_PER_CPU` per CPU core."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def check_threads(v, name: str = "threads") -> None:
    """A thread count: an integer in ``1..threads_max()`` (None is checked by the caller: torch's choice)."""
    hi = threads_max()
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise ValueError(f"{name}: expected an integer in 1..{hi} ({THREADS_PER_CPU} per CPU core; this machine has "
                         f"{os.cpu_count()}), got {v!r}")


def check_steps(v, name: str = "steps") -> None:
    """A number of steps: an integer in ``1..2**53`` (JSON numbers stay exact up to there)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= STEPS_MAX:
        raise ValueError(f"{name}: expected an integer in 1..{STEPS_MAX} (2**53, where step counters stop being "
                         f"exact in JSON), got {v!r}")


def check_lr(v, name: str = "lr") -> None:
    """An optimiser's learning rate: a finite number in ``(0, LR_MAX]``."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= LR_MAX
    if not ok:
        raise ValueError(f"{name}: expected a learning rate in (0, {LR_MAX:g}] (Adam moves a parameter by about "
                         f"the rate per step; a larger one only makes the parameters inf/NaN), got {v!r}")


def check_guidance(v, name: str = "guidance_scale") -> None:
    """A classifier-free guidance scale: a finite number in ``[0, GUIDANCE_MAX]``."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= GUIDANCE_MAX
    if not ok:
        raise ValueError(f"{name}: expected a guidance scale in [0, {GUIDANCE_MAX:g}] (beyond it the guided "
                         f"prediction only saturates or overflows to inf), got {v!r}")


def check_nonneg(name: str, v) -> None:
    """A finite non-negative real number: Python's or numpy's (``np.float32(1.0)`` is a number)."""
    if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{name}: expected a finite non-negative number, got {v!r} ({type(v).__name__})")


def check_share(name: str, v) -> None:
    """A share: a Python ``int`` or ``float`` (not a bool) in ``[0, 1]`` (NaN is refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a share in [0, 1], got {v!r}")


def check_span(lo: int, hi: int, name: str, limit: int = SEARCH_MAX) -> None:
    """Refuse an integer range ``lo..hi`` that an exact search would visit value by value when it holds more
    than ``limit`` values (it would run for minutes instead of refusing at once)."""
    if hi - lo + 1 > limit:
        raise ValueError(f"{name}: ({lo}, {hi}) holds {hi - lo + 1} values; the exact search visits each one, so "
                         f"at most {limit} ({lo}, {lo + limit - 1}) are allowed")


def check_timesteps(t, num_timesteps: int, name: str = "t") -> None:
    """Integer timesteps in ``0..num_timesteps - 1`` (a tensor; a float tensor must hold whole numbers): -1 is
    refused, never read from the end of a table."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of integer timesteps, got {type(t).__name__}")
    if t.numel() == 0:
        return
    if t.is_floating_point() or t.is_complex():
        if not torch.isfinite(t).all() or bool((t != t.round()).any()):
            raise ValueError(f"{name}: expected whole-number timesteps, got values such as "
                             f"{t.reshape(-1)[(t != t.round()) | ~torch.isfinite(t)].reshape(-1)[0].item()!r}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_timesteps:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: expected timesteps in 0..{num_timesteps - 1}, got {bad}")


def check_finite_parameters(params, name: str, value) -> None:
    """After an optimiser step: raise ``ValueError`` naming the rate ``name`` when a parameter became inf/NaN."""
    import torch

    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise ValueError(f"{name}: the optimiser step at {name}={value!r} made the parameters inf/NaN; lower {name}")


def check_positive_int(v, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``v`` is an ``int`` >= 1 (``bool`` is not accepted)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")


def check_int(v, name: str, lo: int | None = None, hi: int | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``v`` is an ``int`` in ``lo..hi`` (inclusive, either open)."""
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{'-inf' if lo is None else lo}..{'inf' if hi is None else hi}"
        raise ValueError(f"{name}: expected an integer in {rng}, got {v!r}")


def check_number(v, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``v`` is a finite real number in the interval (``lo``/``hi``
    None: unbounded; ``*_open``: the end is excluded). NaN and inf are never accepted."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        left = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        raise ValueError(f"{name}: expected a finite number in {left}, {right}, got {v!r}")


def check_seed(v, name: str = "seed") -> None:
    """A random seed: an integer in ``0..2**63 - 1`` (64-bit, with headroom for the derived sub-seeds)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= SEED_MAX:
        raise ValueError(f"{name}: expected an integer seed in 0..{SEED_MAX} (2**63 - 1), got {v!r}")


_SIMPLE = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _matches(v, ann: str) -> bool:
    ann = ann.strip()
    alts = [a.strip() for a in _split_union(ann)]
    if len(alts) > 1:
        return any(_matches(v, a) for a in alts)
    if ann == "None":
        return v is None
    if ann in _SIMPLE:
        if ann != "bool" and isinstance(v, bool):
            return False
        return isinstance(v, _SIMPLE[ann])
    m = re.fullmatch(r"(list|tuple)\[(.*)\]", ann)
    if m:
        if not isinstance(v, (list, tuple)):
            return False
        inner = [a.strip() for a in _split_union(m.group(2), ",")]  # top-level commas only (nested tuples)
        if m.group(1) == "list" or (len(inner) == 2 and inner[1] == "..."):
            return all(_matches(x, inner[0]) for x in v)
        return len(v) == len(inner) and all(_matches(x, a) for x, a in zip(v, inner, strict=True))
    return True  # an annotation this check does not know: the config's own validate() decides


def _split_union(ann: str, sep: str = "|") -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in ann:
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def check_field_types(cfg) -> None:
    """Raise ``ValueError`` naming the field, its value and the expected type for every field of the
    dataclass ``cfg`` whose value does not match its annotation (``int`` excludes ``bool``; ``float`` takes
    ints; ``X | None``, ``list[X]`` and ``tuple[X, Y]`` are understood). Config files and flags go through
    this before any other check, so a mistyped key is named instead of failing later with a TypeError."""
    hints = {f.name: f.type for f in dataclasses.fields(cfg)}
    for name, ann in hints.items():
        ann = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        v = getattr(cfg, name)
        if not _matches(v, ann):
            raise ValueError(f"{name}: expected {ann}, got {v!r} ({type(v).__name__})")

