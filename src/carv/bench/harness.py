"""Side-by-side measurement of estimator variance and cost.

Every benchmark in carv measures the same way, so the logic lives here once:

- **Variance by replicates against a reference.** For each configuration (method, R, K) the estimate
  is repeated ``n`` times with independent seeds; ``variance`` is the mean of ``||g_i - ref||^2`` in
  the space the user pays for (the parameter gradient), where ``ref`` is a high-sample reference.
  ``var_replicates`` (the unbiased trace of the replicate covariance) and ``bias2`` (``||mean - ref||^2``)
  are reported beside it, so a biased peer shows up as ``variance >> var_replicates``.
- **Per-replicate metrics.** ``metrics(config, estimate)`` (optional) maps each replicate to named
  scalars (e.g. a ranking correlation against the reference); rows report their mean and standard
  error over the replicates (``name``, ``name_se``), and they are saved and resumed with the rest.
- **Side by side.** Replicates are interleaved round-robin over the configurations, in a shuffled
  order each round, so machine noise (these machines are shared) hits every configuration alike.
  Costs are medians of wall-clock seconds per estimate, measured in the same run.
- **Resumable.** With ``state_dir`` the accumulators are saved after every round (JSON for scalars,
  safetensors for tensors; nothing is pickled) and a rerun continues where it stopped. A rerun that
  asks for more replicates of the same configurations extends a saved run (replicate ``r`` of a
  configuration always uses the same seed, so the result equals a fresh run with the larger count).

:func:`add_figures` turns rows into ECM / RE / bound figures with :mod:`carv.accounting`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from carv._progress import progress_bar
from carv.accounting import CostMeter, ecm, efficiency_bound, fraction_of_bound, optimal_k, relative_efficiency

__all__ = ["Config", "measure", "add_figures", "fit_components", "reference_mean"]


@dataclass(frozen=True)
class Config:
    method: str
    R: int
    K: int

    @property
    def key(self) -> str:
        return f"{self.method}|R={self.R}|K={self.K}"


EstimateFn = Callable[[Config, torch.Generator, CostMeter], Tensor]
# fields every row has (metrics may not reuse them, nor their "_se" forms)
_RESERVED = frozenset({"method", "R", "K", "n", "variance", "variance_se", "var_replicates", "bias2", "cost_s",
                       "c_upstream_s", "c_draw_s", "ecm", "re", "bound_fraction"})
MetricsFn = Callable[[Config, Tensor], dict[str, float]]


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:6], "little")


def reference_mean(estimate: EstimateFn, config: Config, n: int, seed: int = 0, progress: bool = True,
                   desc: str = "reference") -> tuple[Tensor, float]:
    """Mean of ``n`` independent estimates (the high-sample reference) and its own variance (trace)."""
    meter = CostMeter()
    total, total_sq = None, 0.0
    for i in progress_bar(range(n), progress, desc=desc, leave=False):
        g = estimate(config, torch.Generator().manual_seed(_seed("ref", seed, i)), meter).detach().double().flatten()
        total = g.clone() if total is None else total + g
        total_sq += float(g.pow(2).sum())
    mean = total / n
    var_single = (total_sq - n * float(mean.pow(2).sum())) / max(n - 1, 1)
    return mean, var_single / n


class _Acc:
    def __init__(self, dim: int):
        self.n = 0
        self.sum_err2 = 0.0
        self.sum_err4 = 0.0
        self.sum_g = torch.zeros(dim, dtype=torch.float64)
        self.sum_g2 = 0.0
        self.times: list[float] = []
        self.meter = CostMeter(window=10_000)
        self.metric_sum: dict[str, float] = {}
        self.metric_sq: dict[str, float] = {}

    def add_metrics(self, values: dict[str, float]) -> None:
        clash = sorted(set(values) & _RESERVED)
        if clash:
            raise ValueError(f"metrics: names {clash} clash with the row's own fields {sorted(_RESERVED)}; "
                             f"rename them")
        for k, v in values.items():
            v = float(v)
            self.metric_sum[k] = self.metric_sum.get(k, 0.0) + v
            self.metric_sq[k] = self.metric_sq.get(k, 0.0) + v * v

    def to_state(self) -> tuple[dict, dict[str, Tensor]]:
        state = {"n": self.n, "sum_err2": self.sum_err2, "sum_err4": self.sum_err4, "sum_g2": self.sum_g2,
                 "times": self.times, "meter": self.meter.state_dict()}
        if self.metric_sum:
            state["metric_sum"], state["metric_sq"] = self.metric_sum, self.metric_sq
        return state, {"sum_g": self.sum_g}

    def load(self, scalars: dict, tensors: dict[str, Tensor]) -> None:
        self.n, self.sum_err2, self.sum_err4 = scalars["n"], scalars["sum_err2"], scalars["sum_err4"]
        self.sum_g2, self.times = scalars["sum_g2"], list(scalars["times"])
        self.meter.load_state_dict(scalars["meter"])
        self.sum_g = tensors["sum_g"].clone()
        self.metric_sum = dict(scalars.get("metric_sum", {}))
        self.metric_sq = dict(scalars.get("metric_sq", {}))


def measure(
    configs: Sequence[Config],
    estimate: EstimateFn,
    reference: Tensor,
    replicates: int | Callable[[Config], int],
    seed: int = 0,
    state_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "replicates",
    time_budget_s: float | None = None,
    metrics: MetricsFn | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """Measure every configuration by interleaved replicates; returns one row (dict) per configuration.

    ``estimate(config, generator, meter)`` must return the flattened estimate (e.g. the parameter
    gradient) and may time its stages with ``meter.stage(name, count)``; the medians of the stages
    ``"upstream"`` (per upstream sample) and ``"draw"`` (per teacher draw) are reported when present.
    ``time_budget_s`` stops early (after a full round) and reports what was measured. ``metrics(config,
    estimate)`` (optional) returns named scalars per replicate; rows get their mean (``name``) and
    standard error (``name_se``). ``clock`` times each estimate (``cost_s``): wall-clock by default; on a
    CPU shared with other jobs, ``time.process_time`` (this process's CPU seconds; single-threaded torch)
    does not move with the other jobs' load, while wall-clock medians can differ several-fold between
    rounds.
    """
    if not configs:
        raise ValueError("configs: expected at least one configuration")
    keys = [c.key for c in configs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"configs: duplicate configurations {sorted(k for k in keys if keys.count(k) > 1)}")
    ref = reference.detach().double().flatten()
    n_of = {c.key: (replicates(c) if callable(replicates) else replicates) for c in configs}
    for k, n in n_of.items():
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"replicates: need an integer >= 2 per configuration, got {n!r} for {k}")
    accs = {c.key: _Acc(ref.numel()) for c in configs}
    fingerprint = {"keys": keys, "seed": seed, "n": n_of, "ref": hashlib.sha256(ref.numpy().tobytes()).hexdigest()}
    if metrics is not None:  # only then, so that states saved without metrics still resume
        fingerprint["metrics"] = True
    state_dir = Path(state_dir) if state_dir is not None else None
    start_round = 0
    if state_dir is not None and (state_dir / "measure_state.json").is_file():
        saved = json.loads((state_dir / "measure_state.json").read_text())
        if _extends(saved["fingerprint"], fingerprint):
            tensors = load_file(str(state_dir / "measure_state.safetensors"))
            for i, c in enumerate(configs):
                accs[c.key].load(saved["accs"][c.key], {"sum_g": tensors[f"sum_g.{i}"]})
            start_round = min(a.n for a in accs.values())  # replicate r of a configuration is its round r
    rounds = max(n_of.values())
    order_rng = random.Random(_seed("order", seed))
    orders = [order_rng.sample(range(len(configs)), len(configs)) for _ in range(rounds)]
    total = sum(n_of.values())
    done = sum(a.n for a in accs.values())
    bar = progress_bar(None, progress, total=total, initial=done, desc=desc)
    t_start = time.perf_counter()
    for r in range(start_round, rounds):
        for idx in orders[r]:
            c = configs[idx]
            acc = accs[c.key]
            if r >= n_of[c.key] or r < acc.n:
                continue
            gen = torch.Generator().manual_seed(_seed(seed, c.key, r))
            t0 = clock()
            g = estimate(c, gen, acc.meter).detach()
            acc.times.append(clock() - t0)
            g = g.double().flatten()
            if g.numel() != ref.numel():
                raise ValueError(f"estimate: returned {g.numel()} values for {c.key}, the reference has {ref.numel()}")
            if not torch.isfinite(g).all():
                raise FloatingPointError(f"estimate: non-finite values for {c.key} at replicate {r}")
            err2 = float((g - ref).pow(2).sum())
            acc.n += 1
            acc.sum_err2 += err2
            acc.sum_err4 += err2 * err2
            acc.sum_g += g
            acc.sum_g2 += float(g.pow(2).sum())
            if metrics is not None:
                acc.add_metrics(metrics(c, g))
            bar.update(1)
        if state_dir is not None:
            _save_state(state_dir, fingerprint, r + 1, configs, accs)
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s and r >= 1:
            break
    bar.close()
    return [_row(c, accs[c.key], ref) for c in configs if accs[c.key].n >= 2]


def _extends(saved: dict, new: dict) -> bool:
    """A saved state continues into ``new`` if only the replicate counts differ and none of them shrinks."""
    same = {k: v for k, v in saved.items() if k != "n"} == {k: v for k, v in new.items() if k != "n"}
    return same and all(saved.get("n", {}).get(k, 0) <= n for k, n in new["n"].items())


def _save_state(state_dir: Path, fingerprint: dict, round_: int, configs: Sequence[Config], accs: dict) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    scalars, tensors = {}, {}
    for i, c in enumerate(configs):
        s, t = accs[c.key].to_state()
        scalars[c.key] = s
        tensors[f"sum_g.{i}"] = t["sum_g"].contiguous()
    tmp = state_dir / "measure_state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(state_dir / "measure_state.safetensors")
    tmpj = state_dir / "measure_state.json.tmp"
    tmpj.write_text(json.dumps({"fingerprint": fingerprint, "round": round_, "accs": scalars}))
    tmpj.replace(state_dir / "measure_state.json")


def _row(c: Config, a: _Acc, ref: Tensor) -> dict:
    n = a.n
    mean = a.sum_g / n
    variance = a.sum_err2 / n
    var_err2 = max(a.sum_err4 / n - variance**2, 0.0) * n / max(n - 1, 1)
    var_rep = (a.sum_g2 - n * float(mean.pow(2).sum())) / (n - 1)
    row = {
        "method": c.method, "R": c.R, "K": c.K, "n": n,
        "variance": variance,
        "variance_se": math.sqrt(var_err2 / n),
        "var_replicates": var_rep,
        "bias2": float((mean - ref).pow(2).sum()),
        "cost_s": statistics.median(a.times),
    }
    for stage in ("upstream", "draw"):
        if a.meter.times.get(stage):
            row[f"c_{stage}_s"] = a.meter.median(stage)
    for k, total in a.metric_sum.items():
        m = total / n
        row[k] = m
        row[f"{k}_se"] = math.sqrt(max(a.metric_sq[k] / n - m * m, 0.0) / max(n - 1, 1))
    return row


def fit_components(rows: Sequence[dict], method: str) -> tuple[float, float] | None:
    """Least-squares fit of ``variance = b / R + w / (R K)`` over a method's rows (weights ``1/variance``,
    so every row counts relatively); returns ``(b, w)`` clipped at 0, or None with fewer than 2 rows."""
    rs = [r for r in rows if r["method"] == method]
    if len({(r["R"], r["K"]) for r in rs}) < 2:
        return None
    A = torch.tensor([[1 / r["R"], 1 / (r["R"] * r["K"])] for r in rs], dtype=torch.float64)
    y = torch.tensor([r["variance"] for r in rs], dtype=torch.float64)
    wts = 1.0 / y
    sol = torch.linalg.lstsq(A * wts[:, None], (y * wts)[:, None]).solution.flatten()
    b, w = float(sol[0]), float(sol[1])
    if b < 0 or w < 0:  # constrained fit on the boundary
        cands = []
        for j in (0, 1):  # one component only: ordinary 1-parameter weighted least squares
            col = A[:, j] * wts
            coef = max(float(col @ (y * wts)) / float(col @ col), 0.0)
            resid = float((col * coef - y * wts).pow(2).sum())
            cands.append((resid, (coef, 0.0) if j == 0 else (0.0, coef)))
        b, w = min(cands)[1]
    return max(b, 0.0), max(w, 0.0)


def add_figures(rows: list[dict], baseline: tuple[str, int, int] = ("uniform", 2, 1), uniform: str = "uniform",
                c_upstream: float | None = None, c_draw: float | None = None, k_max: int = 64) -> dict:
    """Add ``ecm`` (against ``baseline``), ``re`` (against ``uniform`` at the same R, K) and, where the
    components can be fitted, ``bound_fraction`` to each row; return a summary with the fitted
    components, the stage costs and the K the accountant picks per method."""
    by = {(r["method"], r["R"], r["K"]): r for r in rows}
    if baseline not in by:
        raise ValueError(f"baseline: no row for {baseline}; rows have {sorted(by)[:10]}...")
    base = by[baseline]
    if c_upstream is None:
        ups = [r["c_upstream_s"] for r in rows if "c_upstream_s" in r]
        c_upstream = statistics.median(ups) if ups else None
    if c_draw is None:
        draws = [r["c_draw_s"] for r in rows if "c_draw_s" in r]
        c_draw = statistics.median(draws) if draws else None
    summary: dict = {"baseline": list(baseline), "c_upstream_s": c_upstream, "c_draw_s": c_draw,
                     "cost_ratio": (c_upstream / c_draw) if c_upstream and c_draw else None, "methods": {}}
    for r in rows:
        r["ecm"] = ecm(base["variance"], base["cost_s"], r["variance"], r["cost_s"])
        u = by.get((uniform, r["R"], r["K"]))
        r["re"] = relative_efficiency(u["variance"], r["variance"]) if u else None
    for m in dict.fromkeys(r["method"] for r in rows):
        comps = fit_components(rows, m)
        if comps is None or c_upstream is None or c_draw is None:
            continue
        b, w = comps
        bound = efficiency_bound(b, w, c_upstream, c_draw)
        info = {"between": b, "within": w, "bound": bound}
        if b > 0 or w == 0:
            info["auto_k"] = optimal_k(b, w, c_upstream, c_draw, k_max=k_max)
        else:
            info["auto_k"] = k_max
        summary["methods"][m] = info
        for r in rows:
            if r["method"] == m:
                model_cost = r["R"] * (c_upstream + r["K"] * c_draw)
                r["bound_fraction"] = fraction_of_bound(bound, r["variance"], model_cost)
    return summary
