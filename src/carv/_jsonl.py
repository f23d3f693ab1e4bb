"""Metrics as JSON lines, shared by every run folder: append a row, read them back, and drop the rows a
resumed run will write again. Plain ``json``; one object per line so a killed run leaves at most one
partial last line, which :func:`read_jsonl` and :func:`filter_jsonl` skip."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

__all__ = ["append_jsonl", "read_jsonl", "filter_jsonl"]


def append_jsonl(path: str | Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _rows(path: Path) -> list[tuple[str, dict]]:
    out = []
    for ln in path.read_text().splitlines():
        if not ln.strip():
            continue
        try:
            out.append((ln, json.loads(ln)))
        except json.JSONDecodeError:  # the partial last line of a killed run
            continue
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    return [row for _, row in _rows(path)] if path.is_file() else []


def filter_jsonl(path: str | Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite ``path`` with only the rows for which ``keep(row)`` is true (no-op if the file is missing)."""
    path = Path(path)
    if not path.is_file():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln, row in _rows(path) if keep(row)))
    tmp.replace(path)
