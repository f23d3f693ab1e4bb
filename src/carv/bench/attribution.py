"""Benchmark: how many evaluations per data point a stable attribution ranking costs (digits teacher).

Set-up. The committed digits DDPM (:func:`~carv.teachers.digits.load_digits_teacher`) is the model
being attributed. The examples are a fixed random subset of the training split (``num_train``) and
the queries: held-out test digits and teacher samples (DDIM, fixed seed). Each example's feature is
its projected, MC-averaged loss gradient (:class:`~carv.objectives.attribution.GradientFeatures`,
all parameters by default); a query's scores are the cosine similarities with the training features.

Estimators over the draws (``K`` evaluations per data point), each with independent draws per
example and with common random numbers (one set of ``K`` draws shared by every example):

- ``iid``: uniform iid timesteps, fresh noise per example, the bench's loss weighting: the baseline without CRN;
- ``journey-trak``: journey-TRAK as its users run it (MadryLab/journey-TRAK ``examples/featurize_cifar10.py``,
  ``diffusion_trak/``): ``K`` timesteps iid uniform on ``0..T-1`` per example, one fresh noise per example and
  timestep, and its output function, the *unweighted* DDPM loss ``F.mse_loss(noise_pred, noise)``
  (:func:`~carv.objectives.attribution.journey_trak_draws`); with the bench's default ``weighting="sds"`` that is
  a different objective from the reference's, so its error includes a bias (``bias2``) and its ranking converges
  to another one; with ``weighting="uniform"`` it is the ``iid`` row with its own random stream;
- ``grid``: evenly spaced timesteps at stratum midpoints (deterministic; a biased quadrature);
- ``d-trak``: D-TRAK as its users run it (sail-sg/D-TRAK ``grad_unconditional.py``): its timesteps
  ``range(0, T, T // K)`` and one noise per timestep seeded by the timestep
  (:func:`~carv.objectives.attribution.dtrak_draws`; ``e_seed`` is the replicate's seed); with
  ``dtrak_objective`` it is also measured on its own output function (the squared norm of the model
  output, D-TRAK's default) against a reference of that objective, beside iid and carv's stratified draws on
  the same objective;
- ``stratified``: one jittered timestep per stratum of the inverse CDF;
- ``stratified+importance``: the same under the free proposal ``q ~ p w`` (``w`` the loss weighting,
  or ``proposal_weighting``), floor-mixed with ``p``;
- ``stratified+learned``: under ``q ~ p sqrt(E||grad||^2 | t)``, learned by
  :class:`~carv.LearnedProposal` from the per-draw gradient norms of a small pilot.

Measurements (side by side, interleaved, :func:`carv.bench.harness.measure`): the *feature variance*
``E ||Phi_hat - Phi_ref||^2`` over all examples' features (trace, against the reference), and per
replicate the mean over queries of the Spearman correlation of the query's ranking of the training
examples with the reference ranking, and the top-k overlap. The reference averages independent
stratified estimates with ``reference_evals`` evaluations per data point in all.

ECM at equal ranking correlation (:func:`ecm_at_equal_metric`): interpolate the baseline's (``iid``,
independent draws) mean-Spearman-vs-budget curve linearly in ``log K`` to find the budget ``K_B`` at which
it matches the method's correlation at budget ``K``; every estimator does the same work per evaluation (one
teacher forward/backward per draw), so ``ECM = K_B / K`` (the budget ratio; D-TRAK's budget is the number
of timesteps it evaluates). Whether the baseline curve needed patching (a running maximum) to be monotone is
reported (``baseline_curve_monotone``); its replicates are ``baseline_factor`` times the others' so that it
should not. ``ecm_wall`` is the same with the measured seconds (the check); ``ecm_total`` also charges the
once-per-example projection. The learned proposal's pilot (``pilot_examples x pilot_K`` evaluations) is
charged to the learned rows twice: spread over this benchmark's examples (``ecm_pilot_bench``) and
amortised over the whole training split plus the queries (``ecm_pilot_trainset``). A method beyond the
baseline's largest budget gets a lower bound (``ecm_bound: ">="``), one below its smallest an upper bound
(``"<="``). The headline is fixed in advance: ``carv attribute``'s default sampler (stratified, shared
draws) at 4 evaluations per data point; the best row at that budget is reported as an upper bound with N.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from carv._machine import loadavg, set_threads
from carv._runfolder import RunFolder, atomic_path, atomic_write_json, atomic_write_text, read_json, save_figure
from carv._validate import check_seed, check_threads
from carv.accounting import CostMeter
from carv.bench.harness import SMOKE_NOTE, Config, measure, reference_mean, run_record
from carv.bench.report import markdown_table, plot_metric_vs_k, print_table
from carv.objectives.attribution import (
    GaussianProjection,
    GradientFeatures,
    cosine_scores,
    dtrak_draws,
    dtrak_timesteps,
    journey_trak_draws,
)
from carv.objectives.weighting import weight_table
from carv.timesteps import LearnedProposal, TimestepSampler

__all__ = ["METHODS", "AttributionBenchConfig", "AttributionProblem", "spearman", "topk_overlap", "docs_json",
           "ecm_at_equal_metric", "pivot_markdown", "run_attribution_bench"]

# name -> (stratify, proposal)
METHODS = {
    "iid": ("none", "none"),
    "grid": ("grid", "none"),
    "stratified": ("per_upstream", "none"),
    "stratified+importance": ("per_upstream", "weight"),
    "stratified+learned": ("per_upstream", "learned"),
    "d-trak": ("d-trak", "none"),  # D-TRAK's own timesteps and seeded noise (dtrak_draws)
    "journey-trak": ("journey-trak", "none"),  # journey-TRAK's iid timesteps, fresh noise, unweighted loss
}
# peers whose draws are their own (not the estimator's): D-TRAK's are shared by batch position (CRN by construction),
# journey-TRAK's independent per example
OWN_DRAWS = {"d-trak": True, "journey-trak": False}
BASELINE = "iid"
HEADLINE = {"method": "stratified", "crn": True, "K": 4}  # carv attribute's default sampler, at the target budget
TRAIN_SPLIT = 1442


@dataclass
class AttributionBenchConfig:
    num_train: int = 64              # training examples ranked (a fixed random subset of the train split)
    num_test_queries: int = 8        # held-out test digits as queries
    num_sample_queries: int = 8      # teacher samples as queries
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    baseline_budgets: list[int] = field(default_factory=lambda: [128, 256, 512])  # extra budgets, baseline only
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    crn: list[bool] = field(default_factory=lambda: [False, True])
    # only these rows, as "method|indep" / "method|crn" (None: every method with every crn): a smaller configuration
    # that keeps the baseline and the rows it is about
    only_rows: list[str] | None = None
    weighting: str = "sds"           # the loss weighting w(t) = 1 - alphabar_t ("uniform": the plain DDPM loss)
    proposal_weighting: str | None = None  # the free proposal's table (None: the loss weighting)
    floor: float = 0.1
    params: str | list[str] = "all"
    proj_dim: int = 256
    proj_seed: int = 0
    reference_evals: int = 1024      # evaluations per data point in the reference
    reference_K: int = 256           # ... made of reference_evals / reference_K independent estimates
    replicates: int = 16             # replicates per configuration (at least)
    small_k_replicates: int = 64     # replicates at budget K: max(replicates, small_k_replicates // K)
    baseline_factor: int = 4         # the baseline (iid, independent draws) gets this many times more
    dtrak_objective: bool = True     # also measure D-TRAK's own output function (squared norm), own reference
    dtrak_batch_size: int = 16       # D-TRAK's data-loader batch (its noise is seeded per batch position)
    pilot_examples: int = 16
    pilot_K: int = 32
    pilot_bins: int = 25
    top_k: int = 10
    max_batch: int = 256
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        check_seed(self.seed)
        for name in ("num_train", "budgets", "reference_evals", "reference_K", "replicates", "pilot_examples",
                     "pilot_K", "pilot_bins", "top_k", "max_batch", "proj_dim", "baseline_factor", "dtrak_batch_size"):
            v = getattr(self, name)
            vals = v if isinstance(v, list) else [v]
            if (isinstance(v, list) and not v) or any(not isinstance(x, int) or isinstance(x, bool) or x < 1
                                                      for x in vals):
                raise ValueError(f"{name}: expected positive integer(s), got {v!r}")
        for name in ("num_test_queries", "num_sample_queries", "small_k_replicates"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        if self.num_test_queries + self.num_sample_queries < 1:
            raise ValueError("num_test_queries, num_sample_queries: need at least one query in all")
        if any(not isinstance(x, int) or x < 1 for x in self.baseline_budgets):
            raise ValueError(f"baseline_budgets: expected positive integers, got {self.baseline_budgets!r}")
        if self.replicates < 2:
            raise ValueError(f"replicates: need at least 2, got {self.replicates}")
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ValueError(f"methods: expected a non-empty subset of {list(METHODS)}, got {self.methods!r}")
        if BASELINE not in self.methods or False not in self.crn:
            raise ValueError(f"methods, crn: the baseline ({BASELINE!r} with independent draws) must be measured")
        if not self.crn or any(not isinstance(c, bool) for c in self.crn):
            raise ValueError(f"crn: expected a non-empty list of booleans, got {self.crn!r}")
        if self.only_rows is not None:
            allowed = row_keys(self.methods, self.crn)
            ok = isinstance(self.only_rows, list) and all(r in allowed for r in self.only_rows)
            if not ok or _key(BASELINE, False) not in self.only_rows:
                raise ValueError(f"only_rows: expected a list of {allowed} including the baseline "
                                 f"{_key(BASELINE, False)!r}, got {self.only_rows!r}")
        if self.reference_evals % self.reference_K:
            raise ValueError(f"reference_evals: must be a multiple of reference_K={self.reference_K}, "
                             f"got {self.reference_evals}")
        if self.reference_evals // self.reference_K < 2:
            raise ValueError(f"reference_evals: need at least 2 estimates of reference_K={self.reference_K} "
                             f"(to measure the reference's own variance), got {self.reference_evals}")
        if self.num_train > 1442:
            raise ValueError(f"num_train: the digits train split has 1442 images, got {self.num_train}")
        if self.num_test_queries > 355:
            raise ValueError(f"num_test_queries: the digits test split has 355 images, got {self.num_test_queries}")
        if self.top_k > self.num_train:
            raise ValueError(f"top_k: at most num_train={self.num_train}, got {self.top_k}")
        if not 0 < self.floor <= 1:
            raise ValueError(f"floor: expected a number in (0, 1], got {self.floor}")
        if self.threads is not None:
            check_threads(self.threads)


# a smoke run: about 17 k per-example gradient evaluations in all (about 2 CPU-minutes at one thread): every
# code path of the default (independent and shared draws, the learned proposal and its pilot, both peers, D-TRAK's
# own objective) but not the grid and weight-importance rows (samplers of the same kind) and no baseline budget
# beyond the methods' (with all seven methods and the baseline also at 32 it took 199 s of CPU, 4:56 of wall-clock
# at load 4-5)
QUICK = dict(num_train=16, num_test_queries=2, num_sample_queries=2, budgets=[1, 4, 16], baseline_budgets=[],
             methods=["iid", "stratified", "stratified+learned", "d-trak", "journey-trak"],
             reference_evals=128, reference_K=64, replicates=2, small_k_replicates=4, baseline_factor=2,
             pilot_examples=4, pilot_K=16)


# ---------------------------------------------------------------------------------------------- metrics
def _ranks(x: Tensor) -> Tensor:
    return torch.argsort(torch.argsort(x, dim=-1), dim=-1).to(torch.float64)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation along the last dimension (ties broken by position; scores are continuous)."""
    if a.shape != b.shape or a.shape[-1] < 2:
        raise ValueError(f"a, b: expected equal shapes with at least 2 items, got {tuple(a.shape)}, {tuple(b.shape)}")
    ra, rb = _ranks(a), _ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.pow(2).sum(-1) * rb.pow(2).sum(-1)).sqrt()


def topk_overlap(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Fraction of the ``k`` highest-scoring items of ``b`` that are also among the ``k`` highest of ``a``."""
    ia, ib = a.topk(k, dim=-1).indices, b.topk(k, dim=-1).indices
    return (ia[..., :, None] == ib[..., None, :]).any(-1).double().mean(-1)


def ecm_at_equal_metric(base: list[tuple[float, float, float]], metric: float, cost: float) -> tuple[float, str]:
    """Baseline cost over method cost at equal ``metric`` (higher is better).

    ``base``: ``(budget, metric, cost)`` of the baseline. Its metric is made monotone in budget (running
    maximum) and interpolated linearly in ``log budget`` to find the budget that matches ``metric``; the
    baseline's cost there is interpolated linearly in log-log. Returns ``(ecm, bound)`` with ``bound``
    ``"="`` (interpolated), ``">="`` (the method beats the baseline's largest budget: a lower bound) or
    ``"<="`` (the method is below the baseline's smallest budget: an upper bound).
    """
    if not base:
        raise ValueError("base: expected at least one (budget, metric, cost) point")
    if not (cost > 0):
        raise ValueError(f"cost: expected a positive number, got {cost!r}")
    pts = sorted(base)
    mono, best = [], -math.inf
    for k, m, c in pts:
        best = max(best, m)
        mono.append((k, best, c))
    if metric <= mono[0][1]:
        return mono[0][2] / cost, "<="
    if metric > mono[-1][1]:
        return mono[-1][2] / cost, ">="
    for (_, m0, c0), (_, m1, c1) in zip(mono, mono[1:], strict=False):
        if m0 < metric <= m1:
            f = (metric - m0) / (m1 - m0)  # the same fraction of the way in log K and (log-log) in log C
            log_c = math.log(c0) + f * (math.log(c1) - math.log(c0))
            return math.exp(log_c) / cost, "="
    raise AssertionError("unreachable: the monotone curve brackets metric")


def _interp_budget(base: list[tuple[float, float]], metric: float) -> float | None:
    """The baseline budget matching ``metric`` (same monotone log-linear interpolation), None outside."""
    pts = sorted(base)
    mono, best = [], -math.inf
    for k, m in pts:
        best = max(best, m)
        mono.append((k, best))
    for (k0, m0), (k1, m1) in zip(mono, mono[1:], strict=False):
        if m0 < metric <= m1:
            f = (metric - m0) / (m1 - m0)
            return math.exp(math.log(k0) + f * (math.log(k1) - math.log(k0)))
    return None


# ---------------------------------------------------------------------------------------------- problem
class AttributionProblem:
    """Teacher, examples (training subset + queries), shared projection and one estimator per method."""

    def __init__(self, cfg: AttributionBenchConfig, learned: LearnedProposal | None = None):
        from carv.teachers.digits import load_digits_data, load_digits_teacher, sample_digits

        cfg.validate()
        self.cfg = cfg
        self.teacher = load_digits_teacher()
        T = self.teacher.schedule.num_timesteps
        x_tr, y_tr = load_digits_data("train")
        g = torch.Generator().manual_seed(cfg.seed)
        self.train_index = torch.randperm(x_tr.shape[0], generator=g)[: cfg.num_train].sort().values
        x_te, y_te = load_digits_data("test")
        self.test_index = torch.linspace(0, x_te.shape[0] - 1, cfg.num_test_queries).round().long() \
            if cfg.num_test_queries else torch.zeros(0, dtype=torch.long)
        sample_labels = torch.arange(cfg.num_sample_queries) % 10
        samples = sample_digits(self.teacher, sample_labels, seed=cfg.seed + 1) if cfg.num_sample_queries \
            else torch.zeros(0, *x_tr.shape[1:])
        self.x = torch.cat([x_tr[self.train_index], x_te[self.test_index], samples])
        self.y = torch.cat([y_tr[self.train_index], y_te[self.test_index], sample_labels])
        self.num_train, self.num_queries = cfg.num_train, cfg.num_test_queries + cfg.num_sample_queries
        self.T = T
        base = GradientFeatures(self.teacher, TimestepSampler(T), weighting=cfg.weighting, params=cfg.params,
                                proj_dim=cfg.proj_dim, proj_seed=cfg.proj_seed, max_batch=cfg.max_batch)
        self.projection: GaussianProjection = base.projection
        self.num_params = base.num_params
        self.learned = learned
        self._features: dict[tuple[str, bool, str], GradientFeatures] = {}

    def sampler(self, method: str) -> TimestepSampler:
        stratify, proposal = METHODS[method]
        cfg = self.cfg
        if stratify in OWN_DRAWS:  # its draws are made by dtrak_draws / journey_trak_draws; the sampler is unused
            return TimestepSampler(self.T)
        if proposal == "none":
            return TimestepSampler(self.T, stratify=stratify)
        if proposal == "weight":
            table = weight_table(cfg.proposal_weighting or cfg.weighting, self.teacher.schedule)
            return TimestepSampler(self.T, importance=table, floor=cfg.floor, stratify=stratify)
        if self.learned is None or not self.learned.ready:
            raise ValueError("learned: the learned proposal has seen no draws yet; run the pilot first")
        return TimestepSampler(self.T, importance=self.learned.importance(), floor=cfg.floor, stratify=stratify)

    def features(self, method: str, crn: bool, output: str = "loss") -> GradientFeatures:
        key = (method, crn, output)
        if key not in self._features:
            # journey-TRAK differentiates its own output function: the unweighted DDPM loss
            weighting = "uniform" if method == "journey-trak" else self.cfg.weighting
            self._features[key] = GradientFeatures(
                self.teacher, self.sampler(method), K=1, noise="crn" if crn else "iid", weighting=weighting,
                params=self.cfg.params, max_batch=self.cfg.max_batch, projection=self.projection, output=output)
        return self._features[key]

    def estimate(self, method: str, crn: bool, K: int, generator: torch.Generator,
                 meter: CostMeter | None = None, output: str = "loss") -> Tensor:
        """Features of every example (training subset, then queries): ``[N, proj_dim]``."""
        feats = self.features(method, crn, output)
        if method == "d-trak":  # D-TRAK's timesteps and per-timestep seeded noise; e_seed from the replicate
            e_seed = int(torch.randint(0, 2**20, (1,), generator=generator))
            batch = dtrak_draws(self.x, self.y, K, self.T, e_seed=e_seed, batch_size=self.cfg.dtrak_batch_size)
            return feats.features_of(batch, meter)
        if method == "journey-trak":  # its iid timesteps and fresh noise, from the replicate's generator
            return feats.features_of(journey_trak_draws(self.x, self.y, K, self.T, generator), meter)
        feats.K = K
        return feats(self.x, self.y, generator, meter)

    def scores(self, phi: Tensor) -> Tensor:
        """Query x training cosine scores ``[Q, num_train]`` from features ``[N, d]`` (or flat)."""
        phi = phi.reshape(self.x.shape[0], -1)
        return cosine_scores(phi[self.num_train:], phi[: self.num_train])

    def pilot(self, generator: torch.Generator) -> tuple[LearnedProposal, dict]:
        """Learn ``q ~ p sqrt(E||grad||^2 | t)`` from per-draw gradient norms of a few training examples."""
        cfg = self.cfg
        learned = LearnedProposal(self.T, num_bins=cfg.pilot_bins, smoothing=1)
        feats = GradientFeatures(self.teacher, TimestepSampler(self.T, stratify="per_upstream"), K=cfg.pilot_K,
                                 weighting=cfg.weighting, params=cfg.params, max_batch=cfg.max_batch,
                                 projection=self.projection)
        n = min(cfg.pilot_examples, self.num_train)
        t0 = time.perf_counter()
        batch = feats.draw(self.x[:n], self.y[:n], generator)
        sq = feats.per_draw_sq_norms(batch)
        seconds = time.perf_counter() - t0
        learned.update(batch[2], sq)
        self.learned = learned
        for key in [k for k in self._features if k[0] == "stratified+learned"]:
            self._features.pop(key)
        bins = torch.arange(cfg.pilot_bins) * (self.T // cfg.pilot_bins) + self.T // (2 * cfg.pilot_bins)
        return learned, {"examples": n, "K": cfg.pilot_K, "seconds": seconds,
                         "rms_grad_norm_by_bin": {int(b): float(v) for b, v in
                                                  zip(bins.tolist(), learned.m2.sqrt().tolist(), strict=True)}}


# ---------------------------------------------------------------------------------------------- run
def _key(method: str, crn: bool, output: str = "loss") -> str:
    return f"{method}|{'crn' if crn else 'indep'}" + ("" if output == "loss" else f"|{output}")


def row_keys(methods: list[str], crn: list[bool]) -> list[str]:
    """The rows a configuration measures, as ``method|indep`` / ``method|crn``: every method with every ``crn``,
    except the peers with their own draws (D-TRAK's are shared, journey-TRAK's independent)."""
    return [_key(m, OWN_DRAWS[m]) if m in OWN_DRAWS else _key(m, c) for m in methods
            for c in ([None] if m in OWN_DRAWS else crn)]


def evaluations(method: str, K: int, T: int = 1000) -> int:
    """Evaluations per data point a row spends: ``K``, except D-TRAK's ``len(range(0, T, T // K))``."""
    return len(dtrak_timesteps(K, T)) if method == "d-trak" else K


def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def run_attribution_bench(out_dir: str | Path = "runs/bench-attribution", quick: bool = False,
                          json_path: str | Path | None = None, progress: bool = True,
                          cfg: AttributionBenchConfig | None = None, command: str | None = None) -> dict:
    """Measure every estimator x budget x (independent / shared draws) side by side; write a run folder."""
    cfg = cfg or AttributionBenchConfig()
    if quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    cfg.validate()
    set_threads(cfg.threads)
    # the run folder: locked, with a manifest (carv._runfolder); the resumable state below has its own fingerprints
    with RunFolder(out_dir, "carv bench attribution", {"quick": quick}):
        return _run_attribution_bench(Path(out_dir), quick, json_path, progress, cfg, command)


def _run_attribution_bench(out: Path, quick: bool, json_path: str | Path | None, progress: bool,
                           cfg: AttributionBenchConfig, command: str | None) -> dict:
    atomic_write_json(out / "config.json", asdict(cfg))
    fp_pilot, fp_ref = _fingerprints(cfg)
    t_start = time.perf_counter()
    load0 = loadavg()
    prob = AttributionProblem(cfg)
    pilot_info = _pilot(out, prob, cfg, fp_pilot)

    def estimate(c: Config, gen: torch.Generator, meter: CostMeter) -> Tensor:
        method, kind, *output = c.method.split("|")
        return prob.estimate(method, kind == "crn", c.K, gen, meter, output[0] if output else "loss").flatten()

    # reference: independent stratified estimates, reference_evals evaluations per data point in all
    reference, ref_info = _reference(out, "reference", None, estimate, prob, cfg, fp_ref, cfg.seed + 3,
                                     f"reference ({cfg.reference_evals} evals/point)", progress)
    N = prob.x.shape[0]
    # the peers' own draws: D-TRAK's noise is shared by batch position (common random numbers by construction),
    # journey-TRAK's fresh per example
    keys = [k for k in row_keys(cfg.methods, cfg.crn) if cfg.only_rows is None or k in cfg.only_rows]
    configs = [Config(k, N, K) for k in keys for K in cfg.budgets]
    configs += [Config(_key(BASELINE, False), N, K) for K in cfg.baseline_budgets if K not in cfg.budgets]
    n_rep = _replicates(cfg)
    rows = measure(configs, estimate, reference, n_rep, seed=cfg.seed + 4, state_dir=out / "state",
                   progress=progress, desc="side-by-side replicates", metrics=_metrics_against(
                       prob, cfg, prob.scores(reference)), reference_variance=float(ref_info["variance_of_reference"]))
    summary = _add_ecm(rows, cfg, N)
    summary_dtrak, rows_dtrak, ref2_info = None, [], None
    if cfg.dtrak_objective and "d-trak" in cfg.methods:
        # D-TRAK's own output function is a different objective: its own reference, its own iid baseline
        reference2, ref2_info = _reference(out, "reference_squared_norm", "squared_norm", estimate, prob, cfg, fp_ref,
                                           cfg.seed + 5, "reference (D-TRAK's objective)", progress)
        cfgs2 = [Config(_key(m, crn, "squared_norm"), N, K)
                 for m, crn in ((BASELINE, False), ("stratified", True), ("d-trak", True)) for K in cfg.budgets]
        cfgs2 += [Config(_key(BASELINE, False, "squared_norm"), N, K) for K in cfg.baseline_budgets
                  if K not in cfg.budgets]
        rows_dtrak = measure(cfgs2, estimate, reference2, n_rep, seed=cfg.seed + 6, state_dir=out / "state-dtrak",
                             progress=progress, desc="D-TRAK's objective", metrics=_metrics_against(
                                 prob, cfg, prob.scores(reference2)),
                             reference_variance=float(ref2_info["variance_of_reference"]))
        summary_dtrak = _add_ecm(rows_dtrak, cfg, N)
    head, best = _headline(rows, cfg)
    result = {
        **run_record(command or ("carv bench attribution" + (" --quick" if quick else "")), load0),
        "smoke": SMOKE_NOTE if quick else None,
        "headline": head,
        "best_of_n": best,
        "config": asdict(cfg),
        "problem": {"examples": N, "train": prob.num_train, "queries": prob.num_queries,
                    "train_index": prob.train_index.tolist(), "test_query_index": prob.test_index.tolist(),
                    "num_params": prob.num_params, "proj_dim": cfg.proj_dim},
        "reference": ref_info,
        "pilot": pilot_info,
        "summary": summary,
        "rows": rows,
        "dtrak_objective": {"reference": ref2_info, "summary": summary_dtrak, "rows": rows_dtrak},
        "seconds": time.perf_counter() - t_start,
    }
    _write_outputs(out, result, rows_dtrak, cfg, quick, json_path, progress)
    return result


def _fingerprints(cfg: AttributionBenchConfig) -> tuple[str, str]:
    """The fingerprints of the pilot's and the reference's settings (a resumed run reuses them only when equal)."""
    common = {k: getattr(cfg, k) for k in ("num_train", "num_test_queries", "num_sample_queries", "weighting",
                                           "params", "proj_dim", "proj_seed", "seed")}
    return (_fingerprint({**common, **{k: getattr(cfg, k) for k in ("pilot_examples", "pilot_K", "pilot_bins")}}),
            _fingerprint({**common, **{k: getattr(cfg, k) for k in ("reference_evals", "reference_K")}}))


def _pilot(out: Path, prob: AttributionProblem, cfg: AttributionBenchConfig, fingerprint: str) -> dict:
    """The learned proposal's pilot, saved (so a resumed run uses the same proposal) or read back; sets
    ``prob.learned`` and returns the pilot's record."""
    pilot_file = out / "learned_proposal.safetensors"
    if pilot_file.is_file() and read_json(out / "pilot.json", "benchmark state").get("fingerprint") == fingerprint:
        learned = LearnedProposal(prob.T, num_bins=cfg.pilot_bins, smoothing=1)
        learned.load_state_dict(load_file(str(pilot_file)))
        prob.learned = learned
        return read_json(out / "pilot.json", "benchmark state")
    learned, pilot_info = prob.pilot(torch.Generator().manual_seed(cfg.seed + 2))
    with atomic_path(pilot_file) as tmp:
        save_file(learned.state_dict(), str(tmp))
    pilot_info["fingerprint"] = fingerprint
    atomic_write_json(out / "pilot.json", pilot_info)
    return pilot_info


def _reference(out: Path, name: str, output: str | None, estimate, prob: AttributionProblem,
               cfg: AttributionBenchConfig, fingerprint: str, seed: int, desc: str,
               progress: bool) -> tuple[Tensor, dict]:
    """``(features, record)`` of a reference (independent stratified estimates, ``reference_evals`` evaluations
    per data point) of the output function ``output`` (None: the loss), saved as ``<name>.safetensors`` /
    ``<name>.json`` or read back when its fingerprint matches."""
    ref_file, info_file = out / f"{name}.safetensors", out / f"{name}.json"
    if ref_file.is_file() and read_json(info_file, "benchmark state").get("fingerprint") == fingerprint:
        return load_file(str(ref_file))["features"], read_json(info_file, "benchmark state")
    n_ref = cfg.reference_evals // cfg.reference_K
    ref_cfg = Config(_key("stratified", False, *([output] if output else [])), prob.x.shape[0], cfg.reference_K)
    t0 = time.perf_counter()
    reference, ref_var = reference_mean(estimate, ref_cfg, n_ref, seed=seed, progress=progress, desc=desc)
    info = {"method": "stratified", **({"output": output} if output else {"crn": False}), "estimates": n_ref,
            "K": cfg.reference_K, "evals_per_point": cfg.reference_evals, "variance_of_reference": ref_var,
            "seconds": time.perf_counter() - t0, "fingerprint": fingerprint}
    with atomic_path(ref_file) as tmp:
        save_file({"features": reference.contiguous()}, str(tmp))
    atomic_write_json(info_file, info)
    return reference, info


def _metrics_against(prob: AttributionProblem, cfg: AttributionBenchConfig, ref_scores: Tensor):
    """The per-replicate ranking metrics against a reference's scores: mean Spearman (all queries, the test
    queries, the sample queries) and top-k overlap."""
    q_test = cfg.num_test_queries

    def metrics(c: Config, g: Tensor) -> dict[str, float]:
        s = prob.scores(g)
        rho = spearman(s, ref_scores)
        m = {"spearman": float(rho.mean()), f"top{cfg.top_k}": float(topk_overlap(s, ref_scores, cfg.top_k).mean())}
        if q_test:
            m["spearman_test"] = float(rho[:q_test].mean())
        if q_test < rho.shape[0]:
            m["spearman_samples"] = float(rho[q_test:].mean())
        return m
    return metrics


def _replicates(cfg: AttributionBenchConfig):
    """Replicates per configuration: at least ``replicates``, more at small ``K``, ``baseline_factor`` times as many
    for the baseline."""
    base_key = _key(BASELINE, False)

    def n_rep(c: Config) -> int:
        n = max(cfg.replicates, cfg.small_k_replicates // c.K)
        return n * cfg.baseline_factor if c.method.startswith(base_key) else n
    return n_rep


def _write_outputs(out: Path, result: dict, rows_dtrak: list[dict], cfg: AttributionBenchConfig, quick: bool,
                   json_path: str | Path | None, progress: bool) -> None:
    """results.json, metrics.jsonl, table.md, the plots, the ``--json`` file and the console summary."""
    rows, summary, head, best = result["rows"], result["summary"], result["headline"], result["best_of_n"]
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cols = ("method", "crn", "K", "n", "variance", "spearman", "spearman_se", f"top{cfg.top_k}", "ecm",
            "ecm_bound", "ecm_wall", "ecm_pilot_bench", "ecm_pilot_trainset")
    pivots = "\n\n".join(f"**{title}**\n\n" + pivot_markdown(rows, m, f, se) for title, m, f, se in (
        ("Mean Spearman vs the reference ranking (± s.e. over replicates)", "spearman", "{:.3f}", True),
        (f"Top-{cfg.top_k} overlap", f"top{cfg.top_k}", "{:.2f}", False),
        ("Feature variance E||Phi - Phi_ref||^2 (trace, all examples)", "variance", "{:.3g}", False),
        ("ECM at equal Spearman vs iid (independent draws), cost = evaluations (budget ratio)", "ecm", "{:.2f}",
         False),
        ("ECM with measured seconds (the check)", "ecm_wall", "{:.2f}", False),
        ("ECM range from the method's Spearman -1 / +1 s.e.", "ecm_range", "{}", False),
        ("ECM incl. the once-per-example projection", "ecm_total", "{:.2f}", False)))
    dtrak_md = ("\n\n**D-TRAK's own objective (squared norm of the output), against its own reference**\n\n"
                + markdown_table(rows_dtrak, cols, smoke=quick)) if rows_dtrak else ""
    atomic_write_text(out / "table.md", pivots + "\n\n**All rows**\n\n" + markdown_table(rows, cols, smoke=quick)
                                  + dtrak_md + "\n")
    _plots(rows, out, cfg)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, docs_json(result))
    if progress:
        note = f" ({SMOKE_NOTE})" if quick else ""
        print_table(rows, cols, title="carv bench attribution: digits teacher, gradient-feature rankings", smoke=quick)
        if rows_dtrak:
            print_table(rows_dtrak, cols, title="D-TRAK's own objective (squared norm), own reference", smoke=quick)
        if head is not None:
            print(f"headline (a priori): {head['config']} ECM {head['value']:.2f}x +- {head['se'] or 0:.2f}{note}; "
                  f"best of {best['n']} rows at K = {HEADLINE['K']}: {best['value']:.2f}x +- {best['se'] or 0:.2f} "
                  f"(upper bound){note}")
        print(f"baseline curve monotone without patching: {summary['baseline_curve_monotone']}; run folder: {out}")


def docs_json(result: dict) -> dict:
    """The ``--json`` file (what docs/attribution*_bench.json hold) from a run folder's ``results.json``: the run
    record, headline, best-of-N, summary, reference and the rows without the per-example index lists."""
    top = f"top{result['config']['top_k']}"

    def slim_rows(rs):
        return [{"method": r["method"], "crn": r["crn"], "budget": r["K"], "n": r["n"], "variance": r["variance"],
                 "var_replicates": r.get("var_replicates"), "bias2": r.get("bias2"), "spearman": r["spearman"],
                 "spearman_se": r.get("spearman_se"), top: r.get(top), "ecm": r["ecm"], "ecm_se": r.get("ecm_se"),
                 "ecm_bound": r["ecm_bound"], "ecm_wall": r["ecm_wall"], "ecm_pilot_bench": r.get("ecm_pilot_bench"),
                 "ecm_pilot_trainset": r.get("ecm_pilot_trainset")} for r in rs]
    out = {k: result[k] for k in ("command", "machine", "date", "smoke", "headline", "best_of_n")}
    dt = result["dtrak_objective"]
    out.update({"config": result["config"], "rows": slim_rows(result["rows"]), "summary": result["summary"],
                "reference": result["reference"], "seconds": result.get("seconds"),
                "dtrak_objective": {"reference": dt["reference"], "summary": dt["summary"],
                                    "rows": slim_rows(dt["rows"])}})
    return out


def _add_ecm(rows: list[dict], cfg: AttributionBenchConfig, n_examples: int) -> dict:
    """Split the method key into (method, crn) and add ECM at equal Spearman against the baseline: ``ecm`` from
    the budget ratio (evaluations per data point), ``ecm_wall`` from the measured seconds (the check), the
    pilot charged two ways for the learned rows, and whether the baseline curve is monotone unpatched."""
    for r in rows:
        m, kind, *_ = r["method"].split("|")
        r["method"], r["crn"] = m, kind == "crn"
        r["evals"] = evaluations(m, r["K"])
    # per-evaluation seconds at each budget, pooled over the estimators (all run the same per-draw computation)
    c_eval = {K: statistics.median(r["c_draw_s"] for r in rows if r["K"] == K) for K in {r["K"] for r in rows}}
    c_up = statistics.median(r["c_upstream_s"] for r in rows)
    base = sorted((r for r in rows if r["method"] == BASELINE and not r["crn"]), key=lambda r: r["K"])
    curve = [(r["K"], r["spearman"], float(r["K"])) for r in base]
    curve_wall = [(r["K"], r["spearman"], r["K"] * c_eval[r["K"]]) for r in base]
    curve_total = [(r["K"], r["spearman"], c_up + r["K"] * c_eval[r["K"]]) for r in base]
    monotone = all(b["spearman"] > a["spearman"] for a, b in zip(base, base[1:], strict=False))
    pilot_evals = cfg.pilot_examples * cfg.pilot_K
    for r in rows:
        K, e = r["K"], r["evals"]
        r["ecm"], r["ecm_bound"] = ecm_at_equal_metric(curve, r["spearman"], float(e))
        se = r.get("spearman_se") or 0.0  # the method's own uncertainty (the baseline's is not propagated)
        r["ecm_range"] = [ecm_at_equal_metric(curve, r["spearman"] + d, float(e))[0] for d in (-se, se)]
        r["ecm_se"] = (r["ecm_range"][1] - r["ecm_range"][0]) / 2
        r["ecm_wall"], _ = ecm_at_equal_metric(curve_wall, r["spearman"], e * c_eval[K])
        r["ecm_total"], _ = ecm_at_equal_metric(curve_total, r["spearman"], c_up + e * c_eval[K])
        r["baseline_budget"] = _interp_budget([(k, m) for k, m, _ in curve], r["spearman"])
        if METHODS[r["method"]][1] == "learned":
            r["ecm_pilot_bench"], _ = ecm_at_equal_metric(curve, r["spearman"], e + pilot_evals / n_examples)
            n_all = TRAIN_SPLIT + (n_examples - cfg.num_train)
            r["ecm_pilot_trainset"], _ = ecm_at_equal_metric(curve, r["spearman"], e + pilot_evals / n_all)
    return {"c_eval_s": {str(k): v for k, v in sorted(c_eval.items())}, "c_upstream_s": c_up,
            "baseline_curve": [{"K": k, "spearman": m} for k, m, _ in curve], "baseline_curve_monotone": monotone,
            "pilot_evaluations": pilot_evals,
            "pilot_charged_per_point": {"bench": pilot_evals / n_examples,
                                        "trainset": pilot_evals / (TRAIN_SPLIT + n_examples - cfg.num_train)}}


def _headline(rows: list[dict], cfg: AttributionBenchConfig) -> tuple[dict | None, dict | None]:
    """The a-priori headline (carv attribute's default sampler with shared draws, at 4 evaluations per data
    point) and the best row at that budget as an upper bound labelled with N."""
    want = HEADLINE
    hit = [r for r in rows if r["method"] == want["method"] and r["crn"] == want["crn"] and r["K"] == want["K"]]
    if not hit:
        return None, None
    r = hit[0]
    head = {"config": {"method": r["method"], "R": r["R"], "K": r["K"], "crn": r["crn"]}, "value": r["ecm"],
            "se": r["ecm_se"], "ecm_bound": r["ecm_bound"], "metric": "ecm at equal Spearman (budget ratio)",
            "chosen_by": "a priori: carv attribute's default sampler (stratified, shared draws) at the 4-evaluation "
                         "budget the target names",
            "charged": ["evaluations per data point (every estimator does the same work per evaluation)"]}
    cands = [q for q in rows if q["K"] == want["K"] and not (q["method"] == BASELINE and not q["crn"])]
    b = max(cands, key=lambda q: q["ecm"])
    best = {"n": len(cands), "config": {"method": b["method"], "R": b["R"], "K": b["K"], "crn": b["crn"]},
            "value": b["ecm"], "se": b["ecm_se"], "metric": head["metric"],
            "note": f"maximum over {len(cands)} rows at K = {want['K']}: an upper bound"}
    return head, best


def pivot_markdown(rows: list[dict], metric: str, fmt: str = "{:.3f}", with_se: bool = False) -> str:
    """A Markdown table of one metric: a row per (method, crn), a column per budget."""
    budgets = sorted({r["K"] for r in rows})
    keys = list(dict.fromkeys((r["method"], r["crn"]) for r in rows))
    by = {(r["method"], r["crn"], r["K"]): r for r in rows}
    lines = ["| method | draws | " + " | ".join(f"K={k}" for k in budgets) + " |",
             "| --- | --- | " + " | ".join("---" for _ in budgets) + " |"]
    for m, crn in keys:
        cells = []
        for k in budgets:
            r = by.get((m, crn, k))
            v = None if r is None else r.get(metric)
            if v is None:
                cells.append("")
                continue
            cell = "–".join(f"{x:.2f}" for x in v) if isinstance(v, list) else fmt.format(v)
            if metric == "ecm" and r.get("ecm_bound", "=") != "=":
                cell = r["ecm_bound"] + cell
            if with_se and r.get(f"{metric}_se") is not None:
                cell += " ± " + fmt.format(r[f"{metric}_se"])
            cells.append(cell)
        lines.append(f"| {m} | {'CRN' if crn else 'indep.'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(rows: list[dict], out: Path, cfg: AttributionBenchConfig) -> None:
    keyed = [{**r, "method": _key(r["method"], r["crn"])} for r in rows]
    x = "K (evaluations per data point)"
    plot_metric_vs_k(keyed, out / "variance_vs_k.png", "variance", "feature variance E||Phi - Phi_ref||^2 (trace)",
                     "digits attribution: feature variance vs evaluations per data point", logy=True, xlabel=x)
    plot_metric_vs_k(keyed, out / "spearman_vs_k.png", "spearman", "mean Spearman vs reference ranking",
                     "digits attribution: ranking stability vs evaluations per data point", xlabel=x)
    plot_metric_vs_k(keyed, out / f"top{cfg.top_k}_vs_k.png", f"top{cfg.top_k}", f"top-{cfg.top_k} overlap",
                     f"digits attribution: top-{cfg.top_k} overlap with the reference", xlabel=x)
    plot_metric_vs_k([r for r in keyed if r["K"] in cfg.budgets], out / "ecm_vs_k.png", "ecm",
                     "ECM at equal Spearman vs iid (independent)", "digits attribution: effective compute multiplier",
                     logy=True, xlabel=x, hline=1.0)
    _plot_pilot(out)


def _plot_pilot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = read_json(out / "pilot.json", "benchmark state")["rms_grad_norm_by_bin"]
    ts, v = [int(k) for k in info], list(info.values())
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(ts, v, "o-")
    ax.set_yscale("log")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("RMS per-draw gradient norm")
    ax.set_title("pilot: sqrt(E||grad L||^2 | t) (the learned proposal's shape)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "pilot_grad_norm_vs_t.png")
    plt.close(fig)
