"""The configuration of one text-to-3D run (:class:`TextTo3DConfig`) and its construction from the command line's
flags (:func:`config_from_cli`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from carv._validate import (
    SEARCH_MAX,
    check_field_types,
    check_guidance,
    check_int,
    check_lr,
    check_positive_int,
    check_seed,
    check_steps,
    check_threads,
)
from carv.accounting.allocator import BETWEEN_ESTIMATES, SELECTIONS, check_cost_pin
from carv.apps.text_to_3d.latent import check_sd_folder
from carv.apps.text_to_3d.problem import PROPOSALS, reference_checkpoint
from carv.render import find_scene, get_scene
from carv.timesteps import STRATIFY_MODES, annealed_range
from carv.upstream import UPSTREAM_MODES

__all__ = ["DEFAULT_PROMPT", "LEGACY_SETTINGS", "METHODS", "RESUMABLE_CHANGES",
           "STEP_BUDGETS", "COMPARE_AT", "TextTo3DConfig",
           "check_render_memory", "config_from_cli", "check_prompt", "run_prompt"]

DEFAULT_PROMPT = "a red mushroom"
METHODS = ("carv", "baseline")
# config fields a resumed run may change (they do not change what a step computes)
COMPARE_EVALUATIONS = 20  # evaluations per run that --compare makes by default (twice what its reading needs)
RESUMABLE_CHANGES = ("steps", "budget_s", "checkpoint_every", "eval_every_s", "eval_every", "threads")
# settings added after run folders were first written: a folder whose manifest lacks one resumes with the value
# that reproduces how it started (its allocator re-measured stage costs live and filled the per-step budget)
LEGACY_SETTINGS = {"live_costs": True, "fill_budget": True, "between_estimate": "clipped",
                   "selection": "least-variance", "mix_pairs": False}
STEP_BUDGETS = ("baseline", "free")  # or a number of seconds per step
COMPARE_AT = ("step", "wall-clock")


@dataclass
class TextTo3DConfig:
    """One text-to-3D run. ``method`` picks the estimator preset; ``None`` fields take the preset's value.

    ``carv``: learned proposal (weight-table prior), per-upstream stratification, ``K`` from the
    accountant. ``baseline``: uniform timesteps, no stratification, ``K = 1``.
    """

    prompt: str = DEFAULT_PROMPT
    method: str = "carv"
    steps: int = 400  # 300 with the earlier (prompt, view) teacher; 400 gives the stem its full opacity (BENCHMARKS.md)
    budget_s: float | None = None  # also stop once this many seconds of training (step) time are spent
    # the estimator
    R: int = 2  # renders per step (with the accountant's budget: the plain step's R, which sets the budget)
    K: int | None = None  # None: carv -> the accountant chooses; baseline -> 1
    # the accountant's per-step budget: "baseline" (the plain estimator's measured step: R renders, K = 1),
    # a number of seconds, or "free" (K only, at fixed R: the old AutoK)
    step_budget: str | float = "baseline"
    r_max: int = 8
    upstream: str | None = None  # cameras: None -> carv "lattice" (shifted lattice across steps), baseline "iid"
    # None: carv -> "auto" (uniform, p w or learned, chosen from the run's own draws), baseline -> "none"
    proposal: str | None = None
    stratify: str | None = None  # None: carv -> "per_upstream", baseline -> "none"
    floor: float = 0.1
    proposal_every: int = 10
    k_init: int = 4
    k_max: int = 16
    accountant_every: int = 20  # steps between re-choices of K
    probe_every: int = 10  # steps between parameter-space variance probes (2 extra backward passes each)
    # the allocator reads cost ratios calibrated once at the start and kept on resume; True: live medians
    live_costs: bool = False
    # the allocator spends the whole per-step budget (the smallest variance it allows, whatever its efficiency);
    # default: efficiency first within the budget (carv.accounting.Allocator, efficiency_tolerance)
    fill_budget: bool = False
    # where the budget leaves room that K + 1 does not fit, run a share of the steps at K + 1 (carv.accounting.
    # Allocator.mix_for); False: integer pairs only
    mix_pairs: bool = True
    # how the allocator reads the between part from its signed probes: "posterior" (its mean given that it is >= 0,
    # carv.accounting.nonnegative_mean) or "clipped" (their mean clipped at 0, which reads 0 whenever they average
    # below it and then spends everything on draws)
    between_estimate: str = "posterior"
    # within the budget: "efficient" (the pair of least Var * C) or "least-variance" (of the pairs within 3% of it,
    # the least variance: at a fixed R the largest K within the tolerance); carv.accounting.Allocator, selection
    selection: str = "efficient"
    # the render : draw and probe : draw cost ratios the allocator chooses from (None: measured over the first steps
    # and quantised); pinning both makes the same choices on any machine (a run's summary.json has its calibration)
    cost_ratio: float | None = None
    probe_ratio: float | None = None
    guidance_scale: float = 3.0  # the teacher's own sampling guidance; 7.5-15 oversaturate and add floaters
    guidance_end: float | None = None  # guidance moves linearly from guidance_scale to this at anneal_steps
    # the objective's timestep range, as fractions of T (threestudio's min/max_step_percent): (t_lo, t_hi) at
    # step 0, moving linearly to (t_lo_end, t_hi_end) at step anneal_steps (None: no annealing)
    # (default: U{20..980} at step 0 narrowing to U{20..400} at step 200, then fixed: the high-noise steps shape the
    # silhouette early, the low-noise ones the details; measured in BENCHMARKS.md, "Text-to-3D quality")
    t_lo: float = 0.02
    t_hi: float = 0.98
    t_lo_end: float | None = 0.02
    t_hi_end: float | None = 0.4
    anneal_steps: int = 200
    # elevation range (degrees) of the training cameras; the held-out views keep the teacher's 0-40 (default: the
    # same 0-40, which the camera-conditioned teacher knows; 15-25 was better for the earlier (prompt, view) teacher)
    elev_lo: float = 0.0
    elev_hi: float = 40.0
    # the scene representation and the renderer
    grid_resolution: int = 48
    # coarse-to-fine: train a coarse_resolution^3 grid for the first coarse_steps steps, then upsample it
    # (trilinearly, Adam's moments too) to grid_resolution^3; None: grid_resolution from the start
    coarse_resolution: int | None = None
    coarse_steps: int = 100
    render_size: int = 64
    n_samples: int = 48
    init_blob: float = 5.0  # peak raw density of the initial blob (0: start from an empty grid)
    init_radius: float = 0.85  # radius of the initial blob (the grid spans [-1, 1]^3)
    init_center_z: float = 0.0  # height of the blob's centre (the scenes stand on the floor z = -0.75)
    init_height: float | None = None  # the blob's vertical semi-axis (None: init_radius, a ball)
    init_color: float = 0.5  # every voxel's colour at step 0 (grey level in (0, 1); 0.5 is the background's grey)
    lr: float = 0.1
    lr_end: float | None = None  # Adam's learning rate decays geometrically from lr to lr_end at anneal_steps
    color_lr_scale: float = 1.0  # the colour's learning rate is this times the density's (lr_at(step) * scale)
    # Adam's beta2 (beta1 is 0.9): how long a voxel remembers its past gradient sizes, about 1 / (1 - beta2) steps
    # (default 0.99, not torch's 0.999, which averages over ~1000 steps, longer than the run; measured in BENCHMARKS.md)
    adam_beta2: float = 0.99
    # with --compare: the baseline's own learning rate (None: lr, one rule for both); lets each estimator run at
    # the rate tuned for it on a common grid (a lower-variance gradient can afford a longer step)
    baseline_lr: float | None = None
    tv_weight: float = 0.0
    # opacity regularisers on the training renders, per pixel in the units of the SDS gradient (see
    # Trainer.regulariser): sparsity charges opacity (no background-coloured haze), opaque its binary entropy
    # (default 0: with the camera-conditioned teacher the penalty erodes the mushroom's thin stem, mask IoU 0.897
    # at 0.03 against 0.930 without; it removed background-grey haze for the earlier (prompt, view) teacher, where
    # 0.03 from step 100 was the default; measured in BENCHMARKS.md)
    sparsity_weight: float = 0.0
    # the sparsity schedule: 0 before step sparsity_start, then sparsity_weight, moving linearly to sparsity_end at
    # anneal_steps when that is given (sparsity_start 100: none while the shape forms)
    sparsity_end: float | None = None
    sparsity_start: int = 100
    opaque_weight: float = 0.0
    # the run folder
    eval_every_s: float = 20.0  # training seconds between quality evaluations (16 held-out views)
    eval_every: int | None = None  # steps between evaluations instead (None: by eval_every_s)
    n_eval_views: int = 16
    checkpoint_every: int = 50
    seed: int = 0
    threads: int | None = None
    # a local diffusers Stable Diffusion folder: latent SDS (render -> VAE encode -> SDS), see .latent
    teacher: str | None = None
    # a finished text-to-3d run folder whose newest checkpoint is the objective's reference solution (e.g. a
    # long, low-variance run): every evaluation also reports psnr_ref / iou_ref against its held-out renders
    reference: str | None = None

    # ---------------------------------------------------------------- presets
    @property
    def resolved_proposal(self) -> str:
        return self.proposal if self.proposal is not None else ("auto" if self.method == "carv" else "none")

    @property
    def resolved_stratify(self) -> str:
        return self.stratify if self.stratify is not None else ("per_upstream" if self.method == "carv" else "none")

    @property
    def resolved_upstream(self) -> str:
        return self.upstream if self.upstream is not None else ("lattice" if self.method == "carv" else "iid")

    @property
    def auto_k(self) -> bool:
        return self.K is None and self.method == "carv"

    @property
    def initial_k(self) -> int:
        if self.K is not None:
            return self.K
        return self.k_init if self.method == "carv" else 1

    def t_range(self, step: int, num_timesteps: int = 1000) -> tuple[int, int]:
        """The objective's timestep support ``(t_min, t_max)`` at optimisation step ``step``."""
        end = None if self.t_lo_end is None or self.t_hi_end is None else (self.t_lo_end, self.t_hi_end)
        try:
            return annealed_range(step, num_timesteps, (self.t_lo, self.t_hi), end, self.anneal_steps)
        except ValueError as e:
            raise ValueError(f"t_lo, t_hi, t_lo_end, t_hi_end: {e} (t_lo={self.t_lo!r}, t_hi={self.t_hi!r}, "
                             f"t_lo_end={self.t_lo_end!r}, t_hi_end={self.t_hi_end!r})") from None

    def guidance_at(self, step: int) -> float:
        """The classifier-free guidance scale at optimisation step ``step``: linear from ``guidance_scale`` at step 0
        to ``guidance_end`` at ``anneal_steps`` and constant after (``guidance_scale`` when ``guidance_end`` is
        None)."""
        if self.guidance_end is None:
            return float(self.guidance_scale)
        a = min(step / self.anneal_steps, 1.0)
        return (1 - a) * float(self.guidance_scale) + a * float(self.guidance_end)

    def lr_at(self, step: int) -> float:
        """Adam's learning rate at optimisation step ``step``: ``lr (lr_end / lr) ** min(step / anneal_steps, 1)``
        (a geometric decay that stays at ``lr_end`` after ``anneal_steps``), or ``lr`` when ``lr_end`` is None."""
        if self.lr_end is None:
            return float(self.lr)
        return float(self.lr) * (float(self.lr_end) / float(self.lr)) ** min(step / self.anneal_steps, 1.0)

    def sparsity_at(self, step: int) -> float:
        """The sparsity weight at optimisation step ``step``: 0 before ``sparsity_start``; then ``sparsity_weight``
        (``sparsity_end`` None), or linear from ``sparsity_weight`` at ``sparsity_start`` to ``sparsity_end`` at
        ``anneal_steps`` and constant after."""
        if step < self.sparsity_start:
            return 0.0
        if self.sparsity_end is None:
            return float(self.sparsity_weight)
        span = max(self.anneal_steps - self.sparsity_start, 1)
        a = min((step - self.sparsity_start) / span, 1.0)
        return (1 - a) * float(self.sparsity_weight) + a * float(self.sparsity_end)

    def identity(self) -> dict:
        """The configuration with the presets resolved, so that a default spelled out equals the default
        (``--proposal learned`` is the carv run's own proposal); what run folders and checkpoints compare."""
        d = asdict(self)
        d.update(proposal=self.resolved_proposal, stratify=self.resolved_stratify, upstream=self.resolved_upstream,
                 K=self.K if self.K is not None else ("auto" if self.method == "carv" else 1))
        return d

    def validate(self) -> None:
        """Every field checked (a ``ValueError`` naming the first bad one); also that the renders fit in memory."""
        check_field_types(self)  # a mistyped config value is named before anything else looks at it
        check_prompt(self.prompt, self.teacher)  # ValueError listing the allowed prompts
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        self._validate_sizes()
        self._validate_estimator()
        self._validate_numbers()
        self._validate_ranges_and_paths()
        check_render_memory(self)

    def _validate_sizes(self) -> None:
        check_int(self.sparsity_start, "sparsity_start", 0, None if self.sparsity_end is None else self.anneal_steps)
        for name in ("steps", "R", "r_max", "proposal_every", "k_init", "k_max", "accountant_every", "probe_every",
                     "grid_resolution", "anneal_steps", "coarse_steps",
                     "render_size", "n_samples", "n_eval_views", "checkpoint_every"):
            check_positive_int(getattr(self, name), name)
        check_steps(self.steps)
        check_seed(self.seed)
        # sizes beyond these would only end in an allocator error (a 512^3 grid with Adam is 4 GB)
        for name, hi in (("grid_resolution", 256), ("render_size", 512), ("n_samples", 1024),
                         ("n_eval_views", 256), ("R", 4096), ("K", 10**7), ("k_max", SEARCH_MAX)):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, 1, hi)
        if self.K is not None:
            check_positive_int(self.K, "K")
        if self.threads is not None:
            check_threads(self.threads)
        if self.grid_resolution < 4:
            raise ValueError(f"grid_resolution: expected an integer >= 4, got {self.grid_resolution}")
        if self.coarse_resolution is not None:
            check_int(self.coarse_resolution, "coarse_resolution", 4, self.grid_resolution)
        if self.render_size < 32 or self.render_size % 32:
            raise ValueError(f"render_size: expected a multiple of the teacher's 32 px (32, 64, 96, ...), "
                             f"got {self.render_size}")

    def _validate_estimator(self) -> None:
        for name in ("cost_ratio", "probe_ratio"):
            v = getattr(self, name)
            check_cost_pin(name, v)
            if v is not None and self.live_costs:
                raise ValueError(f"{name}: pins the calibrated costs, which --live-costs re-measures at every "
                                 f"choice; pass one of them")
            if v is not None and not self.auto_k:
                raise ValueError(f"{name}: only the accountant's choice of (R, K) reads it, and this run fixes K")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {SELECTIONS}, got {self.selection!r}")
        if self.between_estimate not in BETWEEN_ESTIMATES:
            raise ValueError(f"between_estimate: expected one of {BETWEEN_ESTIMATES}, got {self.between_estimate!r}")
        if self.resolved_proposal not in PROPOSALS:
            raise ValueError(f"proposal: expected one of {PROPOSALS}, got {self.proposal!r}")
        allowed = tuple(m for m in STRATIFY_MODES if m != "grid")
        if self.resolved_stratify not in allowed:
            raise ValueError(f"stratify: expected one of {allowed} ('grid' is biased), got {self.stratify!r}")
        if not (isinstance(self.floor, (int, float)) and 0 < self.floor <= 1):
            raise ValueError(f"floor: expected a number in (0, 1], got {self.floor!r}")
        if not self.k_init <= self.k_max or self.k_init < 2:
            raise ValueError(f"k_init, k_max: need 2 <= k_init <= k_max, got k_init={self.k_init}, k_max={self.k_max}")
        if self.auto_k and self.R > self.r_max:
            raise ValueError(f"R, r_max: need R <= r_max with the accountant, got R={self.R}, r_max={self.r_max}")
        sb = self.step_budget
        if not (sb in STEP_BUDGETS or (isinstance(sb, (int, float)) and not isinstance(sb, bool)
                                       and math.isfinite(sb) and sb > 0)):
            raise ValueError(f"step_budget: expected one of {STEP_BUDGETS} or a positive number of seconds, "
                             f"got {sb!r}")
        if self.resolved_upstream not in UPSTREAM_MODES:
            raise ValueError(f"upstream: expected one of {UPSTREAM_MODES}, got {self.upstream!r}")
        if self.auto_k and self.probe_every < 2:
            raise ValueError(f"probe_every: the accountant needs ordinary steps between probes (>= 2), "
                             f"got {self.probe_every}")

    def _validate_numbers(self) -> None:
        for name in ("guidance_scale", "tv_weight", "init_blob", "sparsity_weight", "opaque_weight") + (
                ("guidance_end",) if self.guidance_end is not None else ()) + (
                ("sparsity_end",) if self.sparsity_end is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite non-negative number, got {v!r}")
        for name in ("guidance_scale", *(("guidance_end",) if self.guidance_end is not None else ())):
            check_guidance(getattr(self, name), name)
        if self.eval_every is not None and (isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int)
                                            or self.eval_every < 1):
            raise ValueError(f"eval_every: expected a positive number of steps or None, got {self.eval_every!r}")
        for name in ("lr", "eval_every_s", "init_radius", "color_lr_scale") + tuple(
                n for n in ("lr_end", "init_height", "baseline_lr") if getattr(self, n) is not None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        for name in ("lr", *(n for n in ("lr_end", "baseline_lr") if getattr(self, n) is not None)):
            check_lr(getattr(self, name), name)
        b = self.adam_beta2
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
            raise ValueError(f"adam_beta2: expected a number strictly between 0 and 1, got {b!r}")
        z = self.init_center_z
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not -1 <= z <= 1:
            raise ValueError(f"init_center_z: expected a height inside the grid's box [-1, 1], got {z!r}")
        if isinstance(self.init_color, bool) or not isinstance(self.init_color, (int, float)) or not (
                0 < self.init_color < 1):
            raise ValueError(f"init_color: expected a grey level strictly between 0 and 1, got {self.init_color!r}")

    def _validate_ranges_and_paths(self) -> None:
        for name in ("elev_lo", "elev_hi"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -90 < v < 90:
                raise ValueError(f"{name}: expected an elevation in degrees strictly between -90 and 90, got {v!r}")
        if self.elev_lo > self.elev_hi:
            raise ValueError(f"elev_lo, elev_hi: need elev_lo <= elev_hi, got {self.elev_lo}, {self.elev_hi}")
        self.t_range(0)  # ValueError naming the bad fraction
        if (self.t_lo_end is None) != (self.t_hi_end is None):
            raise ValueError(f"t_lo_end, t_hi_end: give both ends of the annealed range or neither, got "
                             f"t_lo_end={self.t_lo_end!r}, t_hi_end={self.t_hi_end!r}")
        if self.t_lo_end is not None:
            self.t_range(self.anneal_steps)
        if self.teacher is not None:
            check_sd_folder(self.teacher)
        if self.reference is not None:
            reference_checkpoint(self.reference)  # ValueError naming `reference`
        if self.budget_s is not None and (isinstance(self.budget_s, bool) or not isinstance(self.budget_s, (int, float))
                                          or not math.isfinite(self.budget_s) or not self.budget_s > 0):
            raise ValueError(f"budget_s: expected a positive number of seconds or None, got {self.budget_s!r}")


# peak bytes per ray sample of the volume renderer (float32, CPU): measured about 75 with gradients (a training
# render and its backward) and 50 without (evaluation, turntable) at 128-256 px, 96-256 samples per ray
RENDER_BYTES_PER_SAMPLE = {"train": 80, "eval": 56}


def check_render_memory(cfg: TextTo3DConfig) -> None:
    """Refuse, before anything is written, a configuration whose largest render (a training step's ``R`` views
    with gradients, up to ``r_max`` when the accountant sets ``R``; the held-out views; the turntable) cannot fit
    the free memory, naming the flags that set its size."""
    from carv._machine import check_fits

    S2N = cfg.render_size ** 2 * cfg.n_samples
    R = max(cfg.R, cfg.r_max) if cfg.auto_k else cfg.R
    need = {"a training step": R * S2N * RENDER_BYTES_PER_SAMPLE["train"],
            "the evaluation": max(cfg.n_eval_views, 16) * S2N * RENDER_BYTES_PER_SAMPLE["eval"]}
    what = max(need, key=need.get)
    views = f"{R} views" if what == "a training step" else f"{max(cfg.n_eval_views, 16)} views"
    check_fits(need[what], "cpu", "render_size, n_samples (--render-size, --n-samples, --R)",
               f"{what} renders {views} x {cfg.render_size}^2 rays x {cfg.n_samples} samples per ray, which")


def check_prompt(prompt: str, teacher: str | None) -> None:
    """With the scenes teacher (``teacher`` None) a procedural scene's prompt; with a Stable Diffusion teacher any
    non-empty prompt (ground-truth quality is measured only when a procedural scene exists for it)."""
    if teacher is None:
        get_scene(prompt)  # ValueError listing the allowed prompts
    elif not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt: expected a non-empty prompt, got {prompt!r}")


def run_prompt(prompt: str) -> str:
    """The prompt a run uses: the procedural scene's spelling when one exists, else ``prompt`` itself."""
    scene = find_scene(prompt)
    return scene.prompt if scene is not None else prompt


def config_from_cli(prompt: str | None, flags: dict, baseline: bool = False, compare: bool = False,
                    compare_at: str = "step") -> TextTo3DConfig:
    """The ``carv text-to-3d`` command's configuration: flags (None = default) -> a validated config."""
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    check_prompt(prompt, flags.get("teacher"))  # a bad prompt fails first, with the list of allowed prompts
    if compare and find_scene(prompt) is None:
        raise ValueError(f"compare: --compare measures quality against the procedural scene's ground truth, and "
                         f"{prompt!r} has none; drop --compare, or use one of the scenes' prompts")
    names = {f.name for f in dataclasses.fields(TextTo3DConfig)}
    unknown = sorted(set(flags) - names)
    if unknown:
        raise ValueError(f"flags: unknown option(s) {unknown}")
    given = {k: v for k, v in flags.items() if v is not None}
    if isinstance(given.get("step_budget"), str) and given["step_budget"] not in STEP_BUDGETS:
        try:
            given["step_budget"] = float(given["step_budget"])
        except ValueError:
            raise ValueError(f"step_budget: expected one of {STEP_BUDGETS} or a positive number of seconds, "
                             f"got {given['step_budget']!r}") from None
    if compare_at not in COMPARE_AT:
        raise ValueError(f"compare_at: expected one of {COMPARE_AT}, got {compare_at!r}")
    if baseline and compare:
        raise ValueError("baseline, compare: --compare already trains the baseline next to carv; pass one of them")
    if "baseline_lr" in given and not compare:
        raise ValueError("baseline_lr: --baseline-lr is the baseline's rate in --compare; without --compare use --lr")
    if baseline:
        clash = sorted(k for k in ("K", "proposal", "stratify") if k in given and not (k == "K" and given[k] == 1))
        if clash:
            raise ValueError(f"baseline: --baseline fixes uniform timesteps and K = 1; it conflicts with "
                             f"{', '.join('--' + c for c in clash)}")
        given["method"] = "baseline"
    if compare and "eval_every" not in given and "eval_every_s" not in given:
        # the comparison reads steps to quality off each run's curve, which needs evaluations spread over the run
        # (carv.bench.quality.min_evaluations); by steps, so that a fast machine makes as many as a slow one
        given["eval_every"] = max(given.get("steps", TextTo3DConfig.steps) // COMPARE_EVALUATIONS, 1)
    if "t_lo_end" not in given:  # the command line anneals the top only: the bottom stays at --t-lo
        given["t_lo_end"] = given.get("t_lo", TextTo3DConfig.t_lo)
    cfg = TextTo3DConfig(**{**given, "prompt": prompt})
    cfg.validate()
    return cfg
