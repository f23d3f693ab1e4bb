"""Progress bars: one place that decides how they behave.

tqdm redraws many times a second; in a log file (no terminal) that floods the output, so away from a
terminal the bar refreshes at most every 10 seconds.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable=None, enabled: bool = True, **kw):
    if not sys.stderr.isatty():
        kw.setdefault("mininterval", 10.0)
    return tqdm(iterable, disable=not enabled, **kw)
