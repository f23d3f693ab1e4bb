"""Argument checks shared across layers (below every layer of DESIGN.md section 3; imports nothing from carv)."""

from __future__ import annotations

__all__ = ["check_positive_int"]


def check_positive_int(v, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``v`` is an ``int`` >= 1 (``bool`` is not accepted)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")
