"""Argument checks shared across layers (below every layer of DESIGN.md section 3; imports nothing from carv)."""

from __future__ import annotations

import dataclasses
import math
import re

__all__ = ["check_positive_int", "check_int", "check_number", "check_seed", "check_field_types", "SEED_MAX"]

SEED_MAX = 2**63 - 1  # seeds are offset by small integers for sub-streams; torch takes up to 2**64 - 1


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

