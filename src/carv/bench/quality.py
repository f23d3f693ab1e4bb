"""Quality-based comparison of two training runs: :func:`equal_quality_ecm` (time or steps for a baseline to
reach its final quality / time or steps for a method to reach it)."""

from __future__ import annotations

from typing import Any

__all__ = ["equal_quality_ecm", "min_evaluations", "eval_interval_for"]


def min_evaluations(window: int = 3) -> int:
    """The fewest evaluations a curve needs for :func:`equal_quality_ecm`'s reading: the target is the baseline's
    final ``window``-evaluation average, which spans ``window - 1`` evaluation intervals, and with fewer than
    ``4 (window - 1) + 1`` evaluations that span is over a quarter of the run, so the target (and every crossing of
    it) moves with the evaluation interval rather than the runs. Evaluations of ``carv text-to-3d`` come every
    ``eval_every_s`` seconds of training, so a fast machine makes fewer."""
    return 4 * (window - 1) + 1


def eval_interval_for(train_seconds: float, window: int = 3) -> float:
    """Seconds of training between evaluations that give a run of ``train_seconds`` about twice
    :func:`min_evaluations` (at least 0.1 s): what to rerun with where a reading had too few."""
    return max(train_seconds / (2 * min_evaluations(window)), 0.1)


def equal_quality_ecm(base: list[dict], method: list[dict], key: str = "psnr", window: int = 3,
                      x: str = "elapsed_s", align: str = "center") -> dict:
    """Time for the baseline to reach its final quality / time for the method to reach it (``x="step"``:
    optimisation steps instead of seconds; the result keys keep their ``_s`` names).

    Curves are evaluation rows (``elapsed_s``, ``key``), smoothed by a moving average over ``window``
    evaluations (a single evaluation fluctuates by a few tenths of a dB at the plateau); the target is the
    baseline's final smoothed value and "reach" is the first crossing of the smoothed curve, linearly
    interpolated between evaluations.

    ``align="center"`` (the default) places each average at the mean ``x`` of the evaluations it averages;
    ``"trailing"`` at the last of them. On a rising
    curve a trailing average is the curve delayed by about ``(window - 1) / 2`` evaluation intervals, and that
    delay is not symmetric here: the baseline's crossing of its own smoothed final is its last evaluation
    whatever the delay, while the method's crossing is delayed by it, so the ratio is pulled towards 1 (for two
    straight lines, one twice as steep, evaluated every 50 steps to step 400, window 3: 2.00x centred, 1.78x
    trailing; ``tests/test_text_to_3d.py``). Centred, both crossings are read at the times the averaged
    quality was had. When the method never reaches the target,
    ``ecm`` is None and ``upper_bound`` = ``t_base / t_method_total`` (it would need more than its run).
    ``readable`` is False where either curve has fewer than :func:`min_evaluations` evaluations (``evaluations``:
    the two counts): the result then measures the evaluation interval as much as the runs, and callers report it
    as unread.
    """
    if not base or not method:
        raise ValueError("base, method: need at least one evaluation each")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive integer, got {window!r}")
    if align not in ("center", "trailing"):
        raise ValueError(f"align: expected 'center' or 'trailing', got {align!r}")
    sb, sm = _smooth(base, key, window, align), _smooth(method, key, window, align)
    target = sb[-1][key]
    t_base = _first_crossing(sb, key, target, x)
    t_method = _first_crossing(sm, key, target, x)
    res: dict[str, Any] = {"key": key, "window": window, "align": align, "target": target, "t_base_s": t_base,
                           "t_method_s": t_method, "method_final": sm[-1][key], "ecm": None,
                           "evaluations": [len(base), len(method)],
                           "readable": min(len(base), len(method)) >= min_evaluations(window)}
    if t_method is None:
        total = method[-1][x]
        res["upper_bound"] = t_base / total if total > 0 else None
        res["note"] = f"never reached the baseline's final {key} {target:.3f}"
    elif t_method <= 0 or t_base <= 0:
        res["note"] = "target reached at time 0 (the initial grid already scores it)"
    else:
        res["ecm"] = t_base / t_method
    return res


def _first_crossing(rows: list[dict], key: str, target: float, x: str = "elapsed_s") -> float | None:
    prev = None
    for r in rows:
        if r[key] >= target - 1e-12:
            if prev is None or r[key] == prev[key]:
                return r[x]
            f = (target - prev[key]) / (r[key] - prev[key])
            return prev[x] + f * (r[x] - prev[x])
        prev = r
    return None


def _smooth(rows: list[dict], key: str, window: int, align: str = "center") -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        win = rows[max(0, i - window + 1):i + 1]
        vals = [q[key] for q in win]
        if align == "center":  # at the mean position of the averaged evaluations (no delay on a straight line)
            pos = {"elapsed_s": sum(q["elapsed_s"] for q in win) / len(win),
                   "step": (sum(q["step"] for q in win) / len(win)) if all("step" in q for q in win) else None}
        else:
            pos = {"elapsed_s": r["elapsed_s"], "step": r.get("step")}
        out.append({**pos, key: sum(vals) / len(vals)})
    return out
