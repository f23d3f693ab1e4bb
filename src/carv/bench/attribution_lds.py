"""Benchmark: the linear datamodeling score (LDS) of diffusion attributions against evaluations per example.

``carv bench attribution --lds``. The model attributed is the digits DDPM trained on the whole pool of the LDS
ground truth (:mod:`carv.bench.lds_truth`; ``docs/attribution_lds_model.safetensors``); the ground truth is the
diffusion loss of ``n_subsets`` models, each trained on a random half of the pool, on fixed queries at fixed
``(t, eps)`` draws (``docs/attribution_lds_truth.safetensors``).

For each method and budget ``K`` (evaluations per example), each replicate computes every pool example's and
every query's gradient feature (:class:`~carv.objectives.attribution.GradientFeatures`, projected to
``proj_dim``) and the TRAK scores ``tau(q, i) = phi_q^T (Phi^T Phi + lambda I)^{-1} phi_i`` (``Phi`` the pool's
features, ``lambda = damping * trace(Phi^T Phi) / proj_dim``); cosine scores (``carv attribute``'s) are reported
beside them. Methods (the draws and the function differentiated):

- ``carv``: ``carv attribute``'s default (:class:`~carv.apps.attribute.AttributeConfig`): stratified
  timesteps, common random numbers shared by every example, the ``sds``-weighted loss;
- ``iid``: iid uniform timesteps and fresh noise per example, the same weighted loss;
- ``d-trak``: D-TRAK's grid ``range(0, T, T // K)`` and per-timestep seeded noise
  (:func:`~carv.objectives.attribution.dtrak_draws`), on its own output function (squared norm of the model
  output); its evaluations are the grid's length (e.g. 67 at ``K = 64``);
- ``d-trak-sds``: D-TRAK's draws on carv's objective (the ``sds``-weighted loss);
- ``journey-trak``: journey-TRAK's iid timesteps and fresh noise on the unweighted DDPM loss
  (:func:`~carv.objectives.attribution.journey_trak_draws`).

LDS (:func:`lds`, the definition of ``dattri.metric.lds``): for query ``q``, the Spearman correlation over the
subsets ``S`` of ``sum_{i in S} tau(q, i)`` with minus the query's loss under the model trained on ``S`` (a
positive score means the example lowers the query's loss). ``lds`` is the mean over queries and replicates;
``lds_se`` its standard error over both (:func:`crossed_se`: replicates and queries as crossed random effects).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from carv._runfolder import RunFolder, atomic_write_json, load_tensors, save_figure, save_tensors
from carv._validate import check_positive_int, check_seed
from carv.bench.lds_truth import MODEL_FILE, TRUTH, TRUTH_FILE, _claim, load_truth, pool_indices, query_indices
from carv.objectives.attribution import (
    GaussianProjection,
    GradientFeatures,
    cosine_scores,
    dtrak_draws,
    journey_trak_draws,
)
from carv.timesteps import TimestepSampler

__all__ = ["LDS_METHODS", "JSON_FILE", "LdsBenchConfig", "lds_config_from_flags", "lds", "crossed_se", "trak_scores",
           "lds_markdown", "lds_result", "run_lds_bench"]

LDS_METHODS = ("carv", "iid", "d-trak", "d-trak-sds", "journey-trak")
JSON_FILE = Path("docs") / "attribution_lds.json"
PLOT_FILE = Path("docs") / "attribution_lds_vs_evaluations.png"


@dataclass
class LdsBenchConfig:
    truth: str = str(TRUTH_FILE)
    model: str = str(MODEL_FILE)
    methods: list[str] = field(default_factory=lambda: list(LDS_METHODS))
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    replicates: int = 2              # replicates per (method, budget) at least ...
    small_k_replicates: int = 8      # ... and max(replicates, small_k_replicates // K) at budget K
    proj_dim: int = 256
    proj_seed: int = 0
    damping: float = 1e-3            # lambda = damping * trace(Phi^T Phi) / proj_dim
    dtrak_batch_size: int = 16
    max_batch: int = 256
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        check_seed(self.seed)
        check_seed(self.proj_seed, "proj_seed")
        for name in ("replicates", "small_k_replicates", "proj_dim", "dtrak_batch_size", "max_batch"):
            check_positive_int(getattr(self, name), name)
        if not self.budgets or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.budgets):
            raise ValueError(f"budgets: expected a non-empty list of positive integers, got {self.budgets!r}")
        if not self.methods or any(m not in LDS_METHODS for m in self.methods):
            raise ValueError(f"methods: expected a non-empty subset of {list(LDS_METHODS)}, got {self.methods!r}")
        if not (isinstance(self.damping, float) and self.damping > 0):
            raise ValueError(f"damping: expected a positive float, got {self.damping!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: expected a positive integer or None, got {self.threads!r}")

    def n_rep(self, K: int) -> int:
        return max(self.replicates, self.small_k_replicates // K)


# a smoke run: two methods, two budgets (about a CPU-minute at one thread); its JSON goes only where --json says
QUICK = dict(methods=["carv", "iid"], budgets=[1, 4], replicates=2, small_k_replicates=2)


def lds_config_from_flags(config: str | Path | None = None, quick: bool = False, **fixed) -> LdsBenchConfig:
    """The benchmark's settings from ``carv bench attribution --lds`` flags: ``--config`` JSON (fields of
    :class:`LdsBenchConfig`), ``--quick``, and ``fixed`` fields (``seed``, ``threads``); validated."""
    from carv.bench.harness import settings_from_json

    cfg = settings_from_json(LdsBenchConfig, config, **fixed) if config is not None else LdsBenchConfig(**fixed)
    if quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------- metric
def _average_ranks(x: Tensor) -> Tensor:
    """Ranks along dim 0 (0-based, ties get their average rank), float64."""
    from scipy.stats import rankdata

    return torch.from_numpy(rankdata(x.double().numpy(), axis=0)).double()


def lds(scores: Tensor, masks: Tensor, outputs: Tensor) -> Tensor:
    """Per-query LDS ``[Q]``: Spearman correlation over subsets of the summed scores with ``-outputs``.

    ``scores`` ``[Q, n]`` (query x pool example, higher = more helpful), ``masks`` ``[N, n]`` bool (the subsets),
    ``outputs`` ``[N, Q]`` (the query's loss under each subset model). The definition of ``dattri.metric.lds``
    (which takes ``score.T``, ``-outputs`` and the subsets' index lists; ties get average ranks as in
    ``scipy.stats.spearmanr``)."""
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        raise ValueError(f"scores: expected a [Q, n] tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    if (not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.ndim != 2
            or masks.shape[1] != scores.shape[1]):
        raise ValueError(f"masks: expected a bool [N, {scores.shape[1]}] tensor, got "
                         f"{getattr(masks, 'dtype', type(masks).__name__)} {tuple(getattr(masks, 'shape', ()))}")
    if not isinstance(outputs, Tensor) or outputs.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"outputs: expected shape {(masks.shape[0], scores.shape[0])} (subsets x queries), got "
                         f"{tuple(getattr(outputs, 'shape', ()))}")
    if masks.shape[0] < 3:
        raise ValueError(f"masks: need at least 3 subsets for a rank correlation, got {masks.shape[0]}")
    summed = masks.double() @ scores.double().T  # [N, Q]
    ra, rb = _average_ranks(summed), _average_ranks(-outputs)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    return (ra * rb).sum(0) / (ra.pow(2).sum(0) * rb.pow(2).sum(0)).sqrt()


def crossed_se(values: Tensor) -> float:
    """Standard error of the grand mean of ``values`` ``[R, Q]`` (replicates x queries as crossed random effects):
    ``sqrt((MS_r + MS_q - MS_e) / (R Q))`` from the two-way mean squares (at least ``MS_e / (R Q)``); with one
    replicate, the standard error over queries."""
    v = values.double()
    R, Q = v.shape
    if Q < 2:
        raise ValueError(f"values: need at least 2 queries, got shape {tuple(v.shape)}")
    if R == 1:
        return float(v[0].std() / math.sqrt(Q))
    m, mr, mq = v.mean(), v.mean(1), v.mean(0)
    ms_r = Q * (mr - m).pow(2).sum() / (R - 1)
    ms_q = R * (mq - m).pow(2).sum() / (Q - 1)
    ms_e = (v - mr[:, None] - mq[None, :] + m).pow(2).sum() / ((R - 1) * (Q - 1))
    return float(torch.clamp(ms_r + ms_q - ms_e, min=ms_e).div(R * Q).sqrt())


def trak_scores(query: Tensor, train: Tensor, damping: float = 1e-3) -> Tensor:
    """TRAK scores ``[Q, n]``: ``phi_q^T (Phi^T Phi + lambda I)^{-1} phi_i`` with ``lambda = damping *
    trace(Phi^T Phi) / d`` (``Phi`` the ``[n, d]`` training features)."""
    if query.ndim != 2 or train.ndim != 2 or query.shape[1] != train.shape[1]:
        raise ValueError(f"query, train: expected [Q, d] and [n, d] features, got {tuple(query.shape)} and "
                         f"{tuple(train.shape)}")
    phi = train.double()
    gram = phi.T @ phi
    lam = damping * float(gram.diagonal().sum()) / gram.shape[0]
    gram = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    return query.double() @ torch.linalg.solve(gram, phi.T)


# ---------------------------------------------------------------------------------------------- features
class LdsProblem:
    """The attributed model, the pool and the queries (from the ground truth), and one estimator per method."""

    def __init__(self, cfg: LdsBenchConfig):
        from carv.apps.attribute import AttributeConfig
        from carv.bench.attribution import METHODS
        from carv.teachers.digits import load_digits_data, load_digits_teacher

        self.cfg = cfg
        self._truth: dict[str, Tensor] | None = None
        self.teacher = load_digits_teacher(path=cfg.model)
        self.T = self.teacher.schedule.num_timesteps
        x_tr, y_tr = load_digits_data("train", TRUTH["size"])
        x_te, y_te = load_digits_data("test", TRUTH["size"])
        # the pool and the queries are fixed by the ground truth's configuration: features can be computed while
        # the subset models still train; the truth file is checked against them when the LDS is computed
        pool, qi = pool_indices(TRUTH), query_indices(TRUTH)
        self.pool, self.queries = pool, qi
        self.x = torch.cat([x_tr[pool], x_te[qi]])
        self.y = torch.cat([y_tr[pool], y_te[qi]])
        self.n_pool = len(pool)
        self.carv_default = AttributeConfig()
        stratify = METHODS[self.carv_default.method][0]
        base = GradientFeatures(self.teacher, TimestepSampler(self.T), proj_dim=cfg.proj_dim, proj_seed=cfg.proj_seed)
        self.projection: GaussianProjection = base.projection

        def make(sampler, noise, weighting, output="loss"):
            return GradientFeatures(self.teacher, sampler, K=1, noise=noise, weighting=weighting, output=output,
                                    projection=self.projection, max_batch=cfg.max_batch)

        w = self.carv_default.weighting
        self.features = {
            "carv": make(TimestepSampler(self.T, stratify=stratify), "crn" if self.carv_default.crn else "iid", w),
            "iid": make(TimestepSampler(self.T), "iid", w),
            "d-trak": make(TimestepSampler(self.T), "iid", "uniform", "squared_norm"),
            "d-trak-sds": make(TimestepSampler(self.T), "iid", w),
            "journey-trak": make(TimestepSampler(self.T), "iid", "uniform"),
        }

    def estimate(self, method: str, K: int, generator: torch.Generator) -> Tensor:
        """Features ``[n_pool + Q, proj_dim]`` of every pool example and query."""
        feats = self.features[method]
        if method.startswith("d-trak"):
            e_seed = int(torch.randint(0, 2**20, (1,), generator=generator))
            return feats.features_of(dtrak_draws(self.x, self.y, K, self.T, e_seed=e_seed,
                                                 batch_size=self.cfg.dtrak_batch_size))
        if method == "journey-trak":
            return feats.features_of(journey_trak_draws(self.x, self.y, K, self.T, generator))
        feats.K = K
        return feats(self.x, self.y, generator)

    def evaluations(self, method: str, K: int) -> int:
        from carv.bench.attribution import evaluations

        return evaluations("d-trak" if method.startswith("d-trak") else method, K, self.T)

    @property
    def truth(self) -> dict[str, Tensor]:
        if self._truth is None:
            truth, _ = load_truth(self.cfg.truth)
            if not (torch.equal(truth["pool"], self.pool) and torch.equal(truth["queries"], self.queries)):
                raise ValueError(f"truth: {self.cfg.truth!r} has another pool or other queries than carv's LDS "
                                 f"ground-truth configuration (carv.bench.lds_truth.TRUTH)")
            self._truth = truth
        return self._truth

    def lds_of(self, phi: Tensor, scorer: str) -> Tensor:
        q, tr = phi[self.n_pool:], phi[: self.n_pool]
        s = trak_scores(q, tr, self.cfg.damping) if scorer == "trak" else cosine_scores(q, tr)
        return lds(s, self.truth["masks"], self.truth["outputs"])


# ---------------------------------------------------------------------------------------------- run
def _jobs(cfg: LdsBenchConfig) -> list[tuple[int, str, int]]:
    """``(replicate, method, K)`` in the order computed: the first two replicates of every row before the rest,
    carv's and iid's (the target's rows) before the peers', small budgets first."""
    jobs = [(r, m, K) for m in cfg.methods for K in cfg.budgets for r in range(cfg.n_rep(K))]
    order = {m: i for i, m in enumerate(LDS_METHODS)}
    return sorted(jobs, key=lambda j: (j[0] >= 2, j[1] not in ("carv", "iid"), j[0], order[j[1]], j[2]))


def _generator(cfg: LdsBenchConfig, method: str, K: int, rep: int) -> torch.Generator:
    code = LDS_METHODS.index(method)
    return torch.Generator().manual_seed(((cfg.seed * 7 + code) * 1009 + K) * 10007 + rep)


def _feature_file(out: Path, method: str, K: int, rep: int) -> Path:
    return out / "features" / f"{method}_K{K}_r{rep}.safetensors"


def compute_features(prob: LdsProblem, out: Path, progress: bool = True, worker: int = 0, workers: int = 1) -> None:
    """Every replicate's features, one file each, skipping those on disk (resumable). Several processes may share
    the work (``python benchmarks/attribution_lds_features.py``): worker ``i`` of ``n`` takes every ``n``-th job
    first, then the rest; each file is claimed first (see :func:`carv.bench.lds_truth.train_truth_models`)."""
    cfg = prob.cfg
    (out / "features").mkdir(parents=True, exist_ok=True)
    jobs = _jobs(cfg)
    mine = [j for k, j in enumerate(jobs) if k % workers == worker]
    for rep, method, K in mine + [j for k, j in enumerate(jobs) if k % workers != worker]:
        path = _feature_file(out, method, K, rep)
        if path.is_file() or not _claim(path, ttl=1800.0):
            continue
        t0 = time.perf_counter()
        phi = prob.estimate(method, K, _generator(cfg, method, K, rep))
        seconds = time.perf_counter() - t0
        save_tensors(path, {"features": phi.contiguous()}, metadata={"seconds": f"{seconds:.2f}"})
        path.with_suffix(".claim").unlink(missing_ok=True)
        if progress:
            print(json.dumps({"method": method, "K": K, "replicate": rep, "seconds": round(seconds, 1),
                              "time": time.strftime("%H:%M:%S", time.gmtime())}), flush=True)


def lds_rows(prob: LdsProblem, out: Path, scorer: str = "trak") -> list[dict]:
    """One row per (method, budget) from the saved features: LDS mean and s.e. over queries and replicates."""
    cfg = prob.cfg
    rows = []
    for method in cfg.methods:
        for K in cfg.budgets:
            per = []
            for rep in range(cfg.n_rep(K)):
                path = _feature_file(out, method, K, rep)
                if path.is_file():
                    per.append(prob.lds_of(load_tensors(path, "features")[0]["features"], scorer))
            if not per:
                continue
            v = torch.stack(per)
            rows.append({"method": method, "evaluations": prob.evaluations(method, K), "K": K,
                         "lds": float(v.mean()), "lds_se": crossed_se(v), "replicates": len(per),
                         "queries": v.shape[1]})
    return rows


def reach(rows: list[dict], method: str, baseline: str = "iid", at: int = 64) -> dict:
    """The fewest evaluations at which ``method``'s LDS reaches ``baseline``'s at ``at`` evaluations (None if
    never), with the baseline's value and its s.e."""
    base = next((r for r in rows if r["method"] == baseline and r["K"] == at), None)
    if base is None:
        return {}
    hits = sorted(r["evaluations"] for r in rows if r["method"] == method and r["lds"] >= base["lds"])
    return {"method": method, "baseline": baseline, "baseline_evaluations": at, "baseline_lds": base["lds"],
            "baseline_lds_se": base["lds_se"], "baseline_resolved": base["lds_se"] < 0.25 * abs(base["lds"]),
            "evaluations_to_reach": hits[0] if hits else None}


def run_lds_bench(out_dir: str | Path = "runs/bench-attribution-lds", json_path: str | Path | None = JSON_FILE,
                  progress: bool = True, cfg: LdsBenchConfig | None = None, command: str | None = None) -> dict:
    """Features for every method x budget x replicate (resumable), then the LDS table, JSON and plot."""
    cfg = cfg or LdsBenchConfig()
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    with RunFolder(out, "carv bench attribution --lds", asdict(cfg)):
        t0 = time.perf_counter()
        prob = LdsProblem(cfg)
        compute_features(prob, out, progress)
        return lds_result(prob, out, json_path, command, progress, seconds=time.perf_counter() - t0)


def lds_result(prob: LdsProblem, out: Path, json_path: str | Path | None = JSON_FILE, command: str | None = None,
               progress: bool = True, seconds: float | None = None) -> dict:
    """The LDS table from the features on disk (rows list their replicates; ``complete`` says whether every
    configured replicate was there); writes ``results.json``, ``json_path`` and the plot beside it."""
    cfg = prob.cfg
    rows, rows_cos = lds_rows(prob, out, "trak"), lds_rows(prob, out, "cosine")
    expected = sum(cfg.n_rep(K) for K in cfg.budgets) * len(cfg.methods)
    result = {"n_subsets": int(prob.truth["masks"].shape[0]), "subset_ratio": load_truth(cfg.truth)[1][
                  "subset_ratio"], "rows": rows, "scorer": "trak", "rows_cosine": rows_cos,
              "target": reach(rows, "carv"), "target_cosine": reach(rows_cos, "carv"),
              "complete": sum(r["replicates"] for r in rows) == expected,
              "pool": prob.n_pool, "queries": int(prob.queries.numel()), "config": asdict(cfg),
              "command": command or "carv bench attribution --lds", "seconds": seconds}
    atomic_write_json(out / "results.json", result)
    if json_path is not None:
        atomic_write_json(json_path, result)
        plot_lds(result, Path(json_path).with_name(PLOT_FILE.name))
    if progress:
        for r in rows:
            print(f"{r['method']:>13} K={r['K']:>3} evals={r['evaluations']:>3}  LDS {r['lds']:.4f} "
                  f"+- {r['lds_se']:.4f} (n={r['replicates']})  cosine {_match(rows_cos, r)['lds']:.4f}")
        print(json.dumps(result["target"]))
    return result


def _match(rows: list[dict], row: dict) -> dict:
    return next(r for r in rows if r["method"] == row["method"] and r["K"] == row["K"])


def plot_lds(result: dict, path: str | Path) -> None:
    """LDS (TRAK scores, +-1 s.e.) against evaluations per example, one line per method; iid's LDS at 64 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rs = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["evaluations"])
        ax.errorbar([r["evaluations"] for r in rs], [r["lds"] for r in rs], yerr=[r["lds_se"] for r in rs],
                    marker="o", ms=3, capsize=2, label=method)
    tgt = result.get("target") or {}
    if tgt:
        ax.axhline(tgt["baseline_lds"], color="grey", ls="--", lw=0.8, label="iid at 64 evaluations")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluations per example (timestep, noise draws)")
    ax.set_ylabel("LDS (mean over queries and replicates)")
    ax.set_title(f"digits DDPM: LDS vs evaluations ({result['n_subsets']} subset models, "
                 f"{result['queries']} queries, TRAK scores)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def lds_markdown(result: dict, key: str = "rows") -> str:
    """A markdown table: one row per method, one column per budget ``K``, cells ``LDS +- s.e.`` (with the
    evaluations where they differ from ``K``, and the replicates when fewer than two)."""
    rows = result[key]
    budgets = sorted({r["K"] for r in rows})
    lines = ["| method | " + " | ".join(f"K = {k}" for k in budgets) + " |",
             "| --- |" + " --- |" * len(budgets)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for k in budgets:
            r = next((x for x in rows if x["method"] == method and x["K"] == k), None)
            if r is None:
                cells.append("")
                continue
            extra = [f"{r['evaluations']} evals"] if r["evaluations"] != k else []
            extra += [f"{r['replicates']} replicate"] if r["replicates"] < 2 else []
            cells.append(f"{r['lds']:.3f} ± {r['lds_se']:.3f}" + (f" ({', '.join(extra)})" if extra else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
