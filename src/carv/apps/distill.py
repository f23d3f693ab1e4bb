"""One-step distillation of the digits teacher by distribution matching (DMD / DMD2), through carv.

Pieces (everything random draws from the run's own ``torch.Generator``):

- **Generator** (:class:`OneStepGenerator`): the teacher's :class:`~carv.teachers.unet.CompactUNet`
  (0.28 M parameters), initialised from the teacher, used as a one-step map

      x = G(z, c) = (x_g - s_g eps_theta(x_g, t_g, c)) / a_g,   x_g = s_g z,   z ~ N(0, I)

  i.e. the teacher's own ``x_0`` prediction from pure noise at a fixed level ``t_g`` (SiD's
  initialisation, ``sigma_g = s_g / a_g ~ 2.3`` at ``t_g = 430``). The usual DMD choice ``t_g = T - 1``
  does not work on this schedule: ``a_{T-1} = 0.0064`` amplifies the network's error 157x and the
  initial samples are noise. The generator has the teacher's
  size because it must start as a good denoiser; smaller nets would start from scratch.
- **Fake score**: another copy of the teacher, trained online on the generator's (detached)
  samples with the denoising loss (:class:`~carv.objectives.dmd.DenoisingLoss`), ``fake_updates``
  updates per generator update at its own learning rate (DMD2's two-time-scale rule).
- **Real score**: the frozen teacher with classifier-free guidance ``guidance_scale``.
- **Generator gradient**: :class:`~carv.objectives.dmd.DistributionMatching` through carv's
  estimator: ``R`` generator samples x ``K`` draws, a timestep proposal (``"none"``, ``"weight"``
  (``q ~ p w``) or ``"learned"`` (:class:`~carv.LearnedProposal`, learned online from the squared
  residual norms every step computes anyway)) and stratification.

:func:`run_distill` trains one run into a run folder (``config.json``, ``metrics.jsonl``, sample
grids, plots, safetensors checkpoints, resume state) and resumes it after an interruption.
The side-by-side benchmark (``carv bench distill``, :mod:`carv.bench.distill`) drives this pipeline;
no benchmark code lives here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from carv import runner
from carv._machine import torch_threads
from carv._progress import progress_bar
from carv._runfolder import RunFolder, RunState, atomic_write_json, load_tensors, read_json, save_figure, save_tensors
from carv._validate import (
    check_field_types,
    check_guidance,
    check_int,
    check_lr,
    check_number,
    check_positive_int,
    check_seed,
    check_steps,
    check_threads,
)
from carv.accounting import ComponentProbe, CostMeter, VarianceComponents, accounting_summary, timed_estimate
from carv.objectives.dmd import DMD_WEIGHTINGS, DenoisingLoss, DistributionMatching
from carv.objectives.weighting import weight_table
from carv.schedules import VPSchedule
from carv.teachers import digits_metrics as dm
from carv.teachers.digits import NUM_CLASSES, load_digits_teacher, save_sample_grid
from carv.teachers.unet import CompactUNet, UNetTeacher
from carv.timesteps import STRATIFY_MODES, LearnedProposal, TimestepSampler
from carv.upstream import UpstreamSampler, balanced_labels, sobol_normal

__all__ = ["DistillConfig", "OneStepGenerator", "Distiller", "run_distill", "plot_quality", "resume_run",
           "CARV_ESTIMATOR",
           "teacher_from_path"]

PROPOSALS = ("none", "weight", "learned")
UPSTREAM_CHOICES = ("iid", "strata")
EVAL_SEED = 10_000  # the evaluation latents are common to every run (common random numbers)
# fields that may change when a run is resumed (they do not change what a step computes)
RESUMABLE_CHANGES = ("steps", "time_budget_s", "eval_every", "grid_every", "checkpoint_steps", "threads")
# carv's default estimator for `carv distill` (the benchmark's carv run): K = 16 draws per generator sample, the
# learned timestep proposal and per-sample strata, at DistillConfig's R = 8
CARV_ESTIMATOR = {"K": 16, "proposal": "learned", "stratify": "per_upstream"}


@dataclass
class DistillConfig:
    """One distillation run. Defaults: the baseline estimator (``R = 8``, ``K = 1``, uniform ``t``)."""

    seed: int = 0
    steps: int = 1000
    time_budget_s: float | None = None  # also stop once this many seconds of step compute are spent
    # the generator-gradient estimator
    R: int = 8
    K: int = 1
    proposal: str = "none"
    stratify: str = "none"
    # the R generator samples of a step: "iid" labels and latents, or "strata" (balanced labels across the R
    # samples and randomised-QMC latents: scrambled Sobol points; carv.upstream); each sample stays marginally
    # uniform / N(0, I), so the gradient estimate stays unbiased
    upstream: str = "iid"
    noise: str = "iid"
    floor: float = 0.1
    proposal_refresh: int = 10  # steps between refreshes of a learned proposal
    weighting: str = "dmd"
    guidance_scale: float = 1.0
    t_min: int = 20
    t_max: int = 980
    # networks and optimisers
    generator_t: int = 430
    generator_lr: float = 3e-5
    fake_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    fake_updates: int = 2
    fake_batch: int = 16
    fake_warmup: int = 100  # fake-score updates before the first generator update (charged to compute)
    max_batch: int | None = None
    # run folder
    eval_every: int = 100
    eval_per_class: int = 50
    grid_every: int = 500
    checkpoint_steps: list[int] = field(default_factory=list)
    threads: int | None = 1

    def validate(self) -> None:
        check_field_types(self)  # a mistyped config-file value is named before anything else looks at it
        check_seed(self.seed)
        for name in ("guidance_scale", "generator_lr", "fake_lr", "floor"):
            check_number(getattr(self, name), name)  # finite: inf would only surface as a NaN "from the teacher"
        if self.time_budget_s is not None:
            check_number(self.time_budget_s, "time_budget_s", 0, lo_open=True)
        for name, hi in (("R", 4096), ("K", 10**7), ("fake_batch", 4096), ("eval_per_class", 10**4)):
            check_int(getattr(self, name), name, 1, hi)
        for name in ("steps", "R", "K", "proposal_refresh", "fake_batch", "eval_every", "eval_per_class",
                     "grid_every"):
            check_positive_int(getattr(self, name), name)
        for name in ("seed", "fake_updates", "fake_warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        if self.proposal not in PROPOSALS:
            raise ValueError(f"proposal: expected one of {PROPOSALS}, got {self.proposal!r}")
        if self.upstream not in UPSTREAM_CHOICES:
            raise ValueError(f"upstream: expected one of {UPSTREAM_CHOICES}, got {self.upstream!r}")
        if self.stratify not in STRATIFY_MODES or self.stratify == "grid":
            allowed = tuple(m for m in STRATIFY_MODES if m != "grid")
            raise ValueError(f"stratify: expected one of {allowed} ('grid' is biased), got {self.stratify!r}")
        if self.weighting not in DMD_WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {DMD_WEIGHTINGS}, got {self.weighting!r}")
        if self.proposal == "weight" and self.weighting == "dmd":
            raise ValueError("proposal: 'weight' (q ~ p w) needs a weight table, but weighting='dmd' normalises per "
                             "draw and has none; use proposal='learned' or a table weighting ('sds', 'snr', 'uniform')")
        if not (isinstance(self.floor, (int, float)) and 0 < self.floor <= 1):
            raise ValueError(f"floor: expected a number in (0, 1], got {self.floor!r}")
        if not (isinstance(self.guidance_scale, (int, float)) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale: expected a non-negative number, got {self.guidance_scale!r}")
        if not (isinstance(self.t_min, int) and isinstance(self.t_max, int) and 0 <= self.t_min <= self.t_max <= 999):
            raise ValueError(f"t_min, t_max: need 0 <= t_min <= t_max <= 999, got {self.t_min}, {self.t_max}")
        if not (isinstance(self.generator_t, int) and 1 <= self.generator_t <= 999):
            raise ValueError(f"generator_t: expected an integer timestep in 1..999, got {self.generator_t!r}")
        for name in ("generator_lr", "fake_lr"):
            check_lr(getattr(self, name), name)
        check_guidance(self.guidance_scale)
        check_steps(self.steps)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        if self.time_budget_s is not None and not (isinstance(self.time_budget_s, (int, float))
                                                   and self.time_budget_s > 0):
            raise ValueError(f"time_budget_s: expected a positive number of seconds or None, "
                             f"got {self.time_budget_s!r}")
        if self.max_batch is not None:
            check_positive_int(self.max_batch, "max_batch")
        if self.threads is not None:
            check_threads(self.threads)
        if self.noise == "antithetic" and self.K % 2:
            raise ValueError(f"K: antithetic noise pairs draws, so K must be even, got K={self.K}")
        if self.noise not in ("iid", "antithetic", "crn"):
            raise ValueError(f"noise: expected one of ('iid', 'antithetic', 'crn'), got {self.noise!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.checkpoint_steps):
            raise ValueError(f"checkpoint_steps: expected non-negative integers, got {self.checkpoint_steps!r}")

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; allowed: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("betas"), list):
            d["betas"] = tuple(d["betas"])
        return cls(**d)


class OneStepGenerator(nn.Module):
    """``x = (x_g - s_g eps_theta(x_g, t_g, c)) / a_g`` with ``x_g = s_g z``: the teacher's x0-prediction
    from pure noise at level ``t_g``, as a trainable one-step map (see module doc)."""

    def __init__(self, net: CompactUNet, schedule: VPSchedule, t_g: int):
        super().__init__()
        self.net = net
        self.t_g = int(t_g)
        t = torch.tensor(self.t_g)
        self.a_g, self.s_g = float(schedule.a(t, torch.float64)), float(schedule.s(t, torch.float64))

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        x_g = self.s_g * z
        t = torch.full((z.shape[0],), self.t_g, dtype=torch.long, device=z.device)
        return (x_g - self.s_g * self.net(x_g, t, c)) / self.a_g


class Distiller:
    """Training state of one run: generator, fake score, optimisers, proposal, RNG, clocks."""

    def __init__(self, cfg: DistillConfig, teacher: UNetTeacher | None = None):
        cfg.validate()
        self.cfg = cfg
        self.teacher = teacher if teacher is not None else load_digits_teacher()
        sched = self.teacher.schedule
        self.T = sched.num_timesteps
        if not (cfg.t_max < self.T and cfg.generator_t < self.T):
            raise ValueError(f"t_max, generator_t: must be below the teacher's T={self.T}")
        self.image_shape = (self.teacher.model.config["in_channels"], 16, 16)
        self.generator = OneStepGenerator(copy.deepcopy(self.teacher.model), sched, cfg.generator_t)
        self.generator.requires_grad_(True).train()
        fake_net = copy.deepcopy(self.teacher.model)
        self.fake = UNetTeacher(fake_net, sched)  # freezes: re-enable grads for the online training
        fake_net.requires_grad_(True)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.generator_lr, betas=tuple(cfg.betas))
        self.opt_f = torch.optim.Adam(fake_net.parameters(), lr=cfg.fake_lr, betas=tuple(cfg.betas))
        self.learned = LearnedProposal(self.T, num_bins=50)
        self.sampler = self.make_sampler(cfg.proposal, cfg.stratify)
        self.dmd = self.make_objective(self.sampler, cfg.K)
        self.denoise = DenoisingLoss(sched)
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.compute_s = 0.0
        self.warmed = cfg.fake_warmup == 0
        self.meter = CostMeter()
        self.last: dict[str, Any] = {}
        self.components: list[tuple[float, float]] = []  # the estimator's own (between, within) per step

    # ------------------------------------------------------------------ estimator pieces
    def make_sampler(self, proposal: str, stratify: str) -> TimestepSampler:
        cfg = self.cfg
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal: expected one of {PROPOSALS}, got {proposal!r}")
        imp = None
        if proposal == "weight":
            imp = weight_table(cfg.weighting, self.teacher.schedule)
        elif proposal == "learned":
            imp = self._learned_importance()
        return TimestepSampler(self.T, t_min=cfg.t_min, t_max=cfg.t_max, importance=imp, floor=cfg.floor,
                               stratify=stratify)

    def _learned_importance(self) -> Tensor | None:
        """The learned table, or None (``q = p``) until it has seen a non-zero residual."""
        imp = self.learned.importance((self.cfg.t_min, self.cfg.t_max))
        if imp is None or not bool((imp[self.cfg.t_min:self.cfg.t_max + 1] > 0).any()):
            return None
        return imp

    def make_objective(self, sampler: TimestepSampler, K: int) -> DistributionMatching:
        cfg = self.cfg
        return DistributionMatching(self.teacher, self.fake, sampler, K, cfg.weighting, cfg.guidance_scale,
                                    cfg.noise, cfg.max_batch)

    def latents(self, n: int, generator: torch.Generator | None = None, upstream: str = "iid") -> tuple[Tensor, Tensor]:
        """``(z [n, *image_shape], labels [n])``: iid, or (``upstream="strata"``) labels balanced across the
        ``n`` samples and randomised-QMC latents (:mod:`carv.upstream`), each still marginally uniform / N(0, I)."""
        g = generator if generator is not None else self.rng
        if upstream == "strata":
            c = balanced_labels(UpstreamSampler(1, "strata").draw(n, g)[:, 0], NUM_CLASSES)
            return sobol_normal(n, tuple(self.image_shape), g), c
        if upstream != "iid":
            raise ValueError(f"upstream: expected one of {UPSTREAM_CHOICES}, got {upstream!r}")
        c = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        return torch.randn((n, *self.image_shape), generator=g), c

    # ------------------------------------------------------------------ training
    def fake_update(self) -> float:
        """One update of the fake score on a fresh batch of (detached) generator samples; returns its loss."""
        z, c = self.latents(self.cfg.fake_batch)
        with torch.no_grad():
            x = self.generator(z, c)
        loss = self.denoise(self.fake.model, x, c, self.rng)
        self.opt_f.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_f.step()
        return loss.item()

    def fake_catch_up(self) -> float:
        """The ``fake_updates`` fake-score updates that :meth:`step` starts with, without its generator update;
        returns the last loss (nan with none). The next generator gradient is taken at this state, the fake score
        caught up with the generator: a benchmark measuring that gradient's variance at a checkpoint (saved after
        a generator update) runs this first, else it measures against a fake score one generator update behind,
        which no step of the run sees. A run that then goes on training gives its next step these updates twice."""
        loss = float("nan")
        for _ in range(self.cfg.fake_updates):
            loss = self.fake_update()
        return loss

    def warmup(self) -> None:
        """``fake_warmup`` fake-score updates before the first generator update (charged to ``compute_s``).
        At initialisation the fake score *is* the teacher, so without guidance the DMD gradient is exactly
        zero until the fake score has learned the generator's distribution."""
        if self.warmed:
            return
        sw = self.meter.stopwatch()
        for _ in range(self.cfg.fake_warmup):
            self.last["fake_loss"] = self.fake_update()
        self.warmed = True
        sw.lap("fake_warmup")
        sw.record({"fake_warmup": 1})
        self.compute_s += sw.elapsed()

    def step(self) -> dict[str, Any]:
        """One training step: ``fake_updates`` fake-score updates, then one generator update
        (the first step first runs the fake-score warm-up)."""
        self.warmup()
        cfg = self.cfg
        sw = self.meter.stopwatch()
        fake_loss = self.fake_catch_up()
        sw.lap("fake")
        z, c = self.latents(cfg.R, upstream=cfg.upstream)
        x = self.generator(z, c)
        sw.lap("upstream")
        out = self.dmd(x, c, self.rng)
        sw.lap("draw")
        self.opt_g.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt_g.step()
        sw.lap("upstream")
        self.learned.update(out.draws.t, out.estimate.sq_norms)
        if out.estimate.between is not None:
            self.components = [*self.components[-199:], (out.estimate.between, out.estimate.within)]
        self.step_count += 1
        if cfg.proposal == "learned" and self.step_count % cfg.proposal_refresh == 0:
            self.sampler.set_importance(self._learned_importance())
        sw.record({**({"fake": 1} if cfg.fake_updates else {}), "upstream": cfg.R, "draw": cfg.R * cfg.K})
        self.compute_s += sw.elapsed()
        self.last = {"fake_loss": fake_loss, "grad_x_sq": float(out.grad.pow(2).sum() / cfg.R),
                     "between_x": out.estimate.between, "within_x": out.estimate.within}
        return self.last

    def accounting(self) -> dict:
        """``summary.json["accounting"]`` (:func:`carv.accounting.accounting_summary`): the mean components of the
        last 200 steps' own estimates (generator-output space; none at ``R = 1`` or ``K = 1``) and the stage
        medians, the fake-score updates charged to the upstream stage per generator sample."""
        cfg, m, comps = self.cfg, self.meter, self.components
        b, w = (statistics.fmean(c[i] for c in comps) for i in (0, 1)) if comps else (None, None)
        c_up = c_draw = None
        if m.times.get("upstream") and m.times.get("draw"):
            c_up = m.median("upstream") + (m.median("fake") / cfg.R if m.times.get("fake") else 0.0)
            c_draw = m.median("draw")
        return accounting_summary(b, w, c_up, c_draw, cfg.R, cfg.K, cfg.proposal)

    def time_fake_step(self, generator: torch.Generator, repeats: int = 3) -> float:
        """Median seconds of one step's fake-score training (``fake_updates`` forward + backward passes,
        without changing the weights): the per-step cost the accountant adds to the upstream stage."""
        times = []
        for _ in range(repeats):
            sw = CostMeter().stopwatch()
            for _ in range(self.cfg.fake_updates):
                z, c = self.latents(self.cfg.fake_batch, generator)
                with torch.no_grad():
                    x = self.generator(z, c)
                self.denoise(self.fake.model, x, c, generator).backward()
            times.append(sw.elapsed())
        self.fake.model.zero_grad(set_to_none=True)
        return sorted(times)[len(times) // 2]

    def parameter_gradient(self, objective: DistributionMatching, R: int, generator: torch.Generator,
                           meter: CostMeter | None = None, upstream: str = "iid") -> Tensor:
        """One estimate of the generator's parameter gradient (flat), at the current weights (no update).
        Times ``"upstream"`` (generator forward + backward, per sample) and ``"draw"`` (both scores, per draw)."""
        params = [p for p in self.generator.parameters()]
        for p in params:
            p.grad = None
        z, c = self.latents(R, generator, upstream)  # latents and labels: negligible next to the generator pass
        timed_estimate(lambda: self.generator(z, c), lambda x: objective(x, c, generator), objective.K, meter)
        return torch.cat([p.grad.reshape(-1) for p in params])

    def parameter_components(self, objective: DistributionMatching, R: int, generator: torch.Generator,
                             meter: CostMeter | None = None, upstream: str = "iid") -> VarianceComponents:
        """A probe step: one ``R x K`` estimate (timed like :meth:`parameter_gradient`, its gradient left in the
        generator's ``.grad``) plus the between- and within-sample variance components of the *generator
        parameter* gradient from two extra vector-Jacobian products (:class:`carv.accounting.ComponentProbe`;
        ``R, K >= 2``). The between estimate is signed (unbiased), for :meth:`carv.accounting.Allocator.observe`,
        which averages many probes. Their extra seconds go to ``meter`` as ``"probe"``."""
        params = [p for p in self.generator.parameters()]
        for p in params:
            p.grad = None
        pr = ComponentProbe(R, objective.K)  # ValueError naming R or K below 2
        z, c = self.latents(R, generator, upstream)
        x, out, _ = timed_estimate(lambda: self.generator(z, c),
                                   lambda x: objective(x, c, generator, keep_draws=True), objective.K, meter,
                                   retain_graph=True)
        sw = (meter if meter is not None else CostMeter()).stopwatch()
        comps = pr.measure(x, params, out.estimate.draws, generator)
        out.estimate.draws = None
        sw.lap("probe")
        sw.record({"probe": 1})
        return comps

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def sample(self, labels: Tensor, seed: int = EVAL_SEED) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((labels.shape[0], *self.image_shape), generator=g)
        return self.generator(z, labels).clamp(-1, 1)

    def evaluate(self, per_class: int | None = None) -> tuple[dict[str, float], Tensor]:
        """FD (digits-classifier features, against the test split) and classifier accuracy of
        ``per_class`` samples of every class from the common evaluation latents; images clamped to [-1, 1]."""
        n = per_class or self.cfg.eval_per_class
        labels = torch.arange(NUM_CLASSES).repeat_interleave(n)
        x = self.sample(labels)
        return {"fd": dm.digits_fd(x), "accuracy": dm.classifier_accuracy(x, labels)}, x

    def save_grid(self, path: Path, title: str) -> None:
        labels = torch.arange(NUM_CLASSES).repeat_interleave(8)
        save_sample_grid(self.sample(labels, EVAL_SEED + 1), path, nrow=NUM_CLASSES, title=title)

    # ------------------------------------------------------------------ checkpoints and resume
    def _weights(self) -> dict[str, Tensor]:
        t = {f"generator.{k}": v for k, v in self.generator.net.state_dict().items()}
        t.update({f"fake.{k}": v for k, v in self.fake.model.state_dict().items()})
        t.update({f"learned.{k}": v for k, v in self.learned.state_dict().items()})
        # the table the sampler uses now (empty: q = p): the statistics have moved since the last refresh, so a
        # table rebuilt from them on load would draw differently from the uninterrupted run
        t["importance"] = self.sampler.importance_state()
        return t

    def _meta(self) -> dict[str, Any]:
        return {"step": self.step_count, "compute_s": self.compute_s, "warmed": self.warmed,
                "config": asdict(self.cfg)}

    def save_checkpoint(self, path: str | Path) -> None:
        """Generator + fake score (+ learned proposal) weights as safetensors: what a fixed-checkpoint
        measurement needs. The step and config are in the metadata."""
        save_tensors(path, self._weights(), {"format": "carv.distill_checkpoint/1", "meta": json.dumps(self._meta())})

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no distillation checkpoint at {str(path)!r}")
        tensors, meta = load_tensors(path, "path")  # verifies the checksum
        if meta.get("format") != "carv.distill_checkpoint/1":
            raise ValueError(f"path: {str(path)!r} is not a carv distillation checkpoint "
                             f"(format={meta.get('format')!r})")
        self._load_weights(tensors)
        info = json.loads(meta["meta"])
        self.step_count, self.compute_s, self.warmed = info["step"], info["compute_s"], info["warmed"]
        return info

    def _load_weights(self, t: dict[str, Tensor]) -> None:
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}

        self.generator.net.load_state_dict(part("generator."))
        self.fake.model.load_state_dict(part("fake."))
        self.learned.load_state_dict(part("learned."))
        if "importance" in t:
            self.sampler.load_importance_state(t["importance"])
        elif self.cfg.proposal == "learned":  # a checkpoint written before the table was saved
            self.sampler.set_importance(self._learned_importance())

    def save_state(self, run: RunState) -> None:
        """Everything needed to resume bit-for-bit (weights, optimiser moments, RNG, proposal, clocks) as a
        checksummed checkpoint of ``run`` (which also keeps a copy of the metrics so far)."""
        tensors = dict(self._weights())
        for name, opt in (("opt_g", self.opt_g), ("opt_f", self.opt_f)):
            for i, st in opt.state_dict()["state"].items():
                for k, v in st.items():
                    tensors[f"{name}.{i}.{k}"] = torch.as_tensor(v).detach().clone()
        tensors["rng"] = self.rng.get_state()
        run.save(self.step_count, tensors, {**self._meta(), "meter": self.meter.state_dict(), "last": self.last})

    def check_state(self, t: dict[str, Tensor], info: dict[str, Any], where: str | Path = "") -> None:
        """Refuse a checkpoint that is not this run's (another configuration or seed, another command's): the
        ``accept`` check :meth:`RunState.load` runs before it touches the folder."""
        old, new = info.get("config"), json.loads(json.dumps(asdict(self.cfg)))
        if not isinstance(old, dict) or "rng" not in t or not any(k.startswith("generator.") for k in t):
            raise ValueError(f"out: {str(where)!r} holds a checkpoint that is not a distill run's; use another --out "
                             f"or --fresh to start over")
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if diff:
            raise ValueError(f"out: {str(where)!r} holds a run with a different config (fields {diff}); "
                             "use another --out, the same settings, or --fresh to start over")

    def load_state(self, loaded: tuple[dict[str, Tensor], dict[str, Any]], where: str | Path = "") -> dict[str, Any]:
        """Restore from ``RunState.load()``'s ``(tensors, state)``; refuses a state of another configuration."""
        t, info = loaded
        self.check_state(t, info, where)
        self._load_weights(t)
        for name, opt in (("opt_g", self.opt_g), ("opt_f", self.opt_f)):
            sd = opt.state_dict()
            state: dict[int, dict[str, Tensor]] = {}
            for k, v in t.items():
                if k.startswith(name + "."):
                    _, i, key = k.split(".", 2)
                    state.setdefault(int(i), {})[key] = v
            opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
        self.rng.set_state(t["rng"])
        self.step_count, self.compute_s, self.warmed = info["step"], info["compute_s"], info["warmed"]
        self.meter.load_state_dict(info["meter"])
        self.last = info.get("last", {})
        return info


def plot_quality(quality: Sequence[dict], path: str | Path, title: str = "", real_fd: float | None = None) -> None:
    """FD and classifier accuracy against seconds of compute: thin lines per seed, thick mean per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    colours = {}
    for m in dict.fromkeys(q["method"] for q in quality):
        colour = colours.setdefault(m, f"C{len(colours)}")
        seeds = sorted({q["seed"] for q in quality if q["method"] == m})
        curves = [sorted((q for q in quality if q["method"] == m and q["seed"] == s), key=lambda q: q["time_s"])
                  for s in seeds]
        n = min(len(c) for c in curves)
        for ax, metric in zip(axes, ("fd", "accuracy"), strict=True):
            for c in curves:
                ax.plot([q["time_s"] for q in c], [q[metric] for q in c], color=colour, alpha=0.3, lw=0.8)
            mean_t = [statistics.fmean(c[i]["time_s"] for c in curves) for i in range(n)]
            mean_v = [statistics.fmean(c[i][metric] for c in curves) for i in range(n)]
            k = curves[0][0].get("K")
            ax.plot(mean_t, mean_v, color=colour, lw=2, marker="o", ms=3,
                    label=f"{m}" + (f" (K={k})" if k is not None else "") + f", {len(curves)} seed(s)")
    if real_fd is not None:
        axes[0].axhline(real_fd, color="grey", ls="--", lw=0.8,
                        label=f"real train images, same count: {real_fd:.1f} (FD is biased at this size)")
    axes[0].set_ylabel("Frechet distance (digits-classifier features, lower is better)")
    axes[1].set_ylabel("classifier accuracy of samples")
    for ax in axes:
        ax.set_xlabel("seconds of training compute (each run charged its own steps)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "quality vs compute", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- one run
def resume_run(run_dir: Path, d: Distiller) -> RunState:
    """The run's checkpoints and metrics in ``run_dir``; resumes ``d`` from the newest good checkpoint."""
    run = RunState(run_dir)
    loaded = run.load(accept=lambda t, info: d.check_state(t, info, run_dir))
    if loaded is not None:
        d.load_state(loaded, run_dir)
    return run


def run_distill(out_dir: str | Path = "runs/distill", cfg: DistillConfig | None = None, progress: bool = True,
                resume: bool = True, teacher: UNetTeacher | None = None, fresh: bool = False) -> dict:
    """Train one run into ``out_dir``, resuming the run saved there (``fresh=True``, or the older spelling
    ``resume=False``, moves that run aside first and starts over).

    The folder is a :class:`carv._runfolder.RunFolder` (locked; a manifest naming ``carv distill`` and the
    configuration). Writes ``config.json``, ``metrics.jsonl`` (one line per evaluation: step, compute seconds,
    FD, accuracy, fake loss, stage costs), ``samples/step_*.png``, ``checkpoints/step_*.safetensors`` (at
    ``checkpoint_steps``), ``final.safetensors``, ``quality.png`` and checksummed resume checkpoints
    (``checkpoint-<step>.safetensors``). Returns a summary.
    """
    cfg = cfg or DistillConfig()
    cfg.validate()
    with torch_threads(cfg.threads), RunFolder(out_dir, "carv distill", asdict(cfg), RESUMABLE_CHANGES,
                                          fresh=fresh or not resume) as folder:
        if folder.previous is not None and progress:
            print(f"--fresh: moved the earlier run in {str(out_dir)!r} to {str(folder.previous)!r}")
        return _run_distill(Path(out_dir), cfg, progress, teacher)


class DistillRun:
    """One ``carv distill`` run as :mod:`carv.runner` drives it: the :class:`Distiller`, its run folder's metrics
    (one row per evaluation) and the files it writes as it goes (sample grids, checkpoints at ``checkpoint_steps``).
    An evaluation every ``eval_every`` steps, each followed by a resumable checkpoint."""

    def __init__(self, d: Distiller, out: Path, metrics: RunState):
        self.d, self.out, self.metrics, self.cfg = d, out, metrics, d.cfg

    @property
    def step_count(self) -> int:
        return self.d.step_count

    @property
    def elapsed(self) -> float:
        return self.d.compute_s

    @property
    def done(self) -> bool:
        cfg, d = self.cfg, self.d
        return d.step_count >= cfg.steps or (cfg.time_budget_s is not None and d.compute_s >= cfg.time_budget_s)

    @property
    def evals(self) -> list[dict]:
        return self.metrics.rows

    def step(self) -> dict[str, Any]:
        self.d.step()
        row = {"kind": "step", "step": self.d.step_count}
        self.write_files()
        return row

    def write_files(self) -> None:
        """The checkpoint (at ``checkpoint_steps``) and the sample grid (every ``grid_every`` steps) of this step."""
        d = self.d
        if d.step_count in self.cfg.checkpoint_steps:
            d.save_checkpoint(self.out / "checkpoints" / f"step_{d.step_count:06d}.safetensors")
        if d.step_count % self.cfg.grid_every == 0:
            d.save_grid(self.out / "samples" / f"step_{d.step_count:06d}.png",
                        f"DMD generator, step {d.step_count}: rows = class 0..9")

    def eval_due(self) -> bool:
        rows = self.metrics.rows
        return self.d.step_count % self.cfg.eval_every == 0 and not (rows and rows[-1]["step"] == self.d.step_count)

    def evaluate(self) -> dict[str, Any]:
        d = self.d
        q, _ = d.evaluate()
        row = {"step": d.step_count, "compute_s": round(d.compute_s, 3), **q, **d.last,
               **{f"c_{k}_s": v for k, v in d.meter.summary().items()}}
        self.metrics.append(row)
        return row

    def mark_evaluated(self) -> None:
        pass  # the metrics' last row says which step was evaluated

    def checkpoint_due(self) -> bool:
        return self.d.step_count % self.cfg.eval_every == 0

    def save(self) -> None:
        self.d.save_state(self.metrics)


def _run_distill(out: Path, cfg: DistillConfig, progress: bool, teacher: UNetTeacher | None) -> dict:
    atomic_write_json(out / "config.json", asdict(cfg))
    d = Distiller(cfg, teacher)
    run = DistillRun(d, out, resume_run(out, d))
    if d.step_count == 0:
        run.write_files()
    bar = progress_bar(None, progress, total=cfg.steps, initial=d.step_count, desc="distill")

    def shown(row: dict) -> None:
        if row.get("kind") == "step":
            bar.update(1)
        else:
            bar.set_postfix(fd=f"{row['fd']:.1f}", acc=f"{row['accuracy']:.3f}")

    try:
        runner.start(run, callback=shown)
        while not run.done:
            runner.advance(run, callback=shown)
    except KeyboardInterrupt:
        run.save()
        raise
    finally:
        bar.close()
    runner.finish(run)
    rows = run.metrics.rows
    d.save_checkpoint(out / "final.safetensors")
    d.save_grid(out / "samples" / "final.png", f"DMD generator after {d.step_count} steps: rows = class 0..9")
    quality = [{"method": "run", "seed": cfg.seed, "step": r["step"], "time_s": r["compute_s"], "fd": r["fd"],
                "accuracy": r["accuracy"]} for r in rows]
    plot_quality(quality, out / "quality.png", title=f"DMD run (R={cfg.R}, K={cfg.K}, {cfg.proposal}, "
                                                        f"{cfg.stratify}): quality vs compute")
    summary = {"steps": d.step_count, "compute_s": d.compute_s, "final": rows[-1], "costs": d.meter.summary(),
               "run_dir": str(out), "accounting": d.accounting()}
    atomic_write_json(out / "summary.json", summary)
    return summary


def teacher_from_path(path: str | Path | None) -> UNetTeacher:
    """The digits teacher (``path``: a weights file of one; None: the built-in one); a bad file names ``--teacher``."""
    if path is None:
        return load_digits_teacher()
    try:
        return load_digits_teacher(path=path)
    except ValueError as e:
        raise ValueError(f"--teacher: {e}") from None


def distill_from_cli(out: str | Path, config: str | Path | None, flags: dict[str, Any],
                     teacher: str | Path | None = None, fresh: bool = False, baseline: bool = False) -> dict:
    """``carv distill``: carv's default estimator (:data:`CARV_ESTIMATOR`; ``baseline=True``: the plain one,
    :class:`DistillConfig`'s defaults), then a JSON file's fields, then the non-None ``flags``. A run folder
    started with the plain defaults (before carv's became the command's) resumes with ``--baseline``."""
    d: dict[str, Any] = {} if baseline else dict(CARV_ESTIMATOR)
    if config is not None:
        p = Path(config)
        if not p.is_file():
            raise ValueError(f"config: no such file {str(p)!r}")
        given = read_json(p, "--config")
        if not isinstance(given, dict):
            raise ValueError(f"config: expected a JSON object of DistillConfig fields, got {type(given).__name__}")
        d.update(given)
    for k, v in flags.items():
        if v is None:
            continue
        if k == "checkpoint_steps" and isinstance(v, str):
            try:
                v = [int(s) for s in v.split(",") if s.strip()]
            except ValueError as e:
                raise ValueError(f"checkpoint_steps: expected comma-separated integers, got {v!r}") from e
        d[k] = v
    return run_distill(out, DistillConfig.from_dict(d), fresh=fresh, teacher=teacher_from_path(teacher))
