"""carv command line. Thin by design: every command parses flags and calls one function of an app,
a benchmark or a teacher module; no sampling, weighting or accounting logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from carv._validate import SEED_MAX  # 64-bit seeds with headroom for sub-streams; bigger ones are named by typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="carv: cheaper Monte Carlo estimates with frozen diffusion teachers.")
bench_app = typer.Typer(no_args_is_help=True, help="Side-by-side benchmarks (write tables, plots, JSON).")
train_app = typer.Typer(no_args_is_help=True, help="Retrain the built-in teachers (the commands in docs/teachers.md "
                                                   "reproduce the committed weights).")
app.add_typer(bench_app, name="bench")
app.add_typer(train_app, name="train-teacher")


def _config_flags(cls, options: dict) -> dict:
    """The options of a command that are fields of the config dataclass ``cls`` (a command's options are named
    after the fields they set; None means not given), paths as strings: one place that builds a config's
    overrides from the flags, so no command restates the fields."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if k in names}


def _bad_parameter(e: ValueError) -> None:
    """Bad input -> typer's usage error; a run-folder refusal or work refused for memory stays one plain line
    (see :func:`main`)."""
    from carv._runfolder import CorruptFileError, RunFolderError

    if isinstance(e, (RunFolderError, CorruptFileError, MemoryError)):
        raise e
    raise typer.BadParameter(str(e)) from e


@train_app.command("digits")
def train_digits(
    out: Path = typer.Option(None, help="Output folder (default: the package's assets folder)."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Random seed."),
):
    """Class-conditional DDPM + feature classifier on scikit-learn's digits (16x16)."""
    from carv.apps.assets import train_digits_assets

    train_digits_assets(out_dir=out, seed=seed)


@train_app.command("scenes")
def train_scenes(
    out: Path = typer.Option(None, help="Output folder (default: the package's assets folder)."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Random seed."),
    steps: int = typer.Option(None, min=1, help="Training steps (default: the committed teacher's)."),
    elevation_bins: int = typer.Option(None, min=0, help="Equal elevation bins over the training range as a "
                                                         "third label (default 0: prompt and view labels "
                                                         "only, as the committed teacher)."),
    lr: float = typer.Option(None, min=0.0, help="Peak learning rate (default: the committed teacher's)."),
    warmup: int = typer.Option(None, min=0, help="Linear warm-up steps (default: the committed teacher's)."),
    init: Path = typer.Option(None, help="Continue from this teacher file (a missing elevation label starts at "
                                         "zero: training starts from exactly that teacher)."),
    camera: bool = typer.Option(False, "--camera", help="Condition on the camera's azimuth and elevation "
                                                        "(angle columns after the labels)."),
):
    """Prompt-, view- and (with --camera) camera-conditioned DDPM on renders of the procedural scenes (32x32 RGB).

    The committed teacher is three runs, each continuing the last with --init (carv.teachers.scenes.REPRODUCE):
    a (prompt, view) teacher, then two --camera runs at lower learning rates.
    """
    from carv.teachers.scenes import elevation_edges_for, train_and_save

    overrides = {k: v for k, v in {"steps": steps, "lr": lr, "warmup": warmup}.items() if v is not None}
    edges = elevation_edges_for(elevation_bins)  # typer's min=0 has refused anything it would
    if init is not None and not init.is_file():
        raise typer.BadParameter(f"no teacher file at {str(init)!r}", param_hint="--init")
    try:
        train_and_save(out_dir=out, seed=seed, elevation_edges=edges, init=init, camera=camera, **overrides)
    except ValueError as e:
        if str(e).startswith("init:"):
            raise typer.BadParameter(str(e), param_hint="--init") from None
        raise


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run folder (resumes if it holds an unfinished run)."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run, not a measurement: the same protocol at "
                                                      "few replicates (about a minute on 2 cores)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the results JSON here."),
    threads: int = typer.Option(None, min=1, help="torch threads (default: torch's choice)."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Random seed."),
    fresh: bool = typer.Option(False, "--fresh", help="Move the folder's earlier run aside and start over."),
):
    """Embedded default: SDS of a point set through a costly map toward a Gaussian-mixture teacher.

    Prints variance, cost, RE, ECM (pooled stage costs, pilot charged, bootstrap error bars), the a-priori
    headline (carv's default at the accountant's K) and the best row as an upper bound."""
    from carv.apps.toy import ToyConfig
    from carv.bench.demo import run_demo

    run_demo(out, quick=quick, json_path=json_path, cfg=ToyConfig(seed=seed, threads=threads),
             command=_command_line(), fresh=fresh)


@bench_app.command("overhead")
def bench_overhead(
    json_path: Path = typer.Option(None, "--json", help="Write the results JSON here."),
    quick: bool = typer.Option(False, "--quick", help="Fewer repeats."),
    threads: int = typer.Option(None, min=1, help="torch threads (default: torch's choice; 1 on a shared machine)."),
):
    """Sampler overhead vs torch.randint (10^6 draws) and accountant overhead vs one teacher call."""
    from carv._machine import set_threads
    from carv.bench.overhead import run_overhead

    try:
        set_threads(threads)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--threads") from None
    res = run_overhead(json_path, quick)
    for k, v in res["sampler"]["ratio_vs_randint"].items():
        typer.echo(f"sampler {k:<28} {v:5.2f}x torch.randint ({res['sampler']['n']:,} draws)")
    a = res["accountant"]
    typer.echo(f"accountant per step: {a['accountant_s'] * 1e3:.3f} ms = {100 * a['fraction_of_teacher_call']:.2f}% "
               f"of one teacher call ({a['median_s']['teacher'] * 1e3:.1f} ms, R*K = {a['R'] * a['K']})")


@bench_app.command("report")
def bench_report(
    path: Path = typer.Option(Path("BENCHMARKS.md"), help="The Markdown file whose generated blocks to rewrite."),
    root: Path = typer.Option(Path("."), help="Repository root holding docs/*_bench.json."),
    check: bool = typer.Option(False, "--check", help="Only check: exit 1 if a block differs from the JSON."),
):
    """Regenerate every table of BENCHMARKS.md (the <!-- generated: ... --> blocks) from docs/*.json."""
    from carv.bench.report import write_benchmarks_md

    try:
        stale = write_benchmarks_md(path, root, check=check)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if check and stale:
        typer.echo(f"{path}: {len(stale)} generated block(s) differ from the JSON: {', '.join(stale)}; "
                   f"run `carv bench report`", err=True)
        raise typer.Exit(1)
    typer.echo(f"{path}: {'rewrote ' + ', '.join(stale) if stale else 'every generated block matches the JSON'}")


@bench_app.command("attribution")
def bench_attribution(
    out: Path = typer.Option(Path("runs/bench-attribution"), help="Run folder (resumes an unfinished run)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer examples, budgets and replicates (a few minutes)."),
    json_path: Path = typer.Option(None, "--json", help="Write {'rows': [...]} (method, crn, budget, ...) here."),
    threads: int = typer.Option(None, min=1, help="torch threads (1 is faster on a shared machine)."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Random seed."),
    config: Path = typer.Option(None, "--config", help="JSON object of AttributionBenchConfig fields (a smaller "
                                                       "configuration than the default; the rest keep defaults)."),
    lds: bool = typer.Option(False, "--lds", help="Linear datamodeling score against evaluations per example "
                                                  "(writes docs/attribution_lds.json and its plot)."),
):
    """Digits attribution: feature variance, ranking stability (Spearman, top-10) and ECM at equal correlation
    for iid / grid / stratified / importance / learned draws, independent or shared (CRN), per budget.
    With --lds: the LDS of each method against a retraining ground truth (carv.bench.attribution_lds)."""
    if lds:
        from carv.bench.attribution_lds import JSON_FILE, lds_config_from_flags, run_lds_bench

        try:
            lcfg = lds_config_from_flags(config, quick=quick, seed=seed, threads=threads)
        except ValueError as e:
            _bad_parameter(e)
        run_lds_bench(Path("runs/bench-attribution-lds") if out == Path("runs/bench-attribution") else out,
                      json_path=json_path or (None if quick else JSON_FILE), cfg=lcfg, command=_command_line())
        return
    from carv.bench.attribution import AttributionBenchConfig, run_attribution_bench
    from carv.bench.harness import settings_from_json

    try:
        cfg = (settings_from_json(AttributionBenchConfig, config, seed=seed, threads=threads) if config is not None
               else AttributionBenchConfig(seed=seed, threads=threads))
        cfg.validate()
    except ValueError as e:
        _bad_parameter(e)
    run_attribution_bench(out, quick=quick, json_path=json_path, cfg=cfg, command=_command_line())


@app.command("attribute")
def attribute_cmd(
    query: str = typer.Argument(..., help="An index into the digits test split, or the path of an image."),
    out: Path = typer.Option(Path("runs/attribute"), help="Run folder (grid PNG, scores JSON, feature cache)."),
    label: int = typer.Option(None, help="The query's class (default: the test label, or the classifier's guess)."),
    top_k: int = typer.Option(10, "--top-k", min=1, help="How many training examples to show."),
    K: int = typer.Option(16, "--K", min=1, help="Evaluations (timestep, noise draws) per data point."),
    k_alias: int = typer.Option(None, "--k", min=1, hidden=True, help="The old spelling of --K."),
    method: str = typer.Option("stratified", help="Timestep sampler: iid, grid, stratified, stratified+importance."),
    crn: bool = typer.Option(True, "--crn/--no-crn", help="Share the same draws across all examples."),
    num_train: int = typer.Option(None, min=1, help="Use only the first N training images (default: all 1442)."),
    threads: int = typer.Option(None, min=1, help="torch threads."),
    seed: int = typer.Option(0, help="Random seed (draws)."),
    fresh: bool = typer.Option(False, "--fresh", help="Move the folder's earlier contents aside first."),
):
    """Top-k training examples of a digit by gradient-feature cosine similarity: grid PNG + scores JSON."""
    from carv.apps.attribute import AttributeConfig, attribute

    K = K if k_alias is None else k_alias
    cfg = AttributeConfig(**_config_flags(AttributeConfig, locals()))
    try:
        attribute(query, out, label=label, cfg=cfg, fresh=fresh)
    except ValueError as e:
        _bad_parameter(e)


@app.command("distill")
def distill_cmd(
    out: Path = typer.Option(Path("runs/distill"), help="Run folder (resumes a saved run with the same config)."),
    config: Path = typer.Option(None, help="JSON file of DistillConfig fields; the flags below override it."),
    steps: int = typer.Option(None, min=1, help="Generator steps (default 1000)."),
    time_budget_s: float = typer.Option(None, "--time-budget", help="Also stop after this many seconds of "
                                                                     "compute."),
    baseline: bool = typer.Option(False, "--baseline", help="Start from the plain estimator (K = 1, uniform "
                                                            "timesteps, no strata) instead of carv's; the flags "
                                                            "below still apply."),
    R: int = typer.Option(None, "--R", min=1, help="Generator samples per step (default 8)."),
    K: int = typer.Option(None, "--K", min=1, help="Draws (t, eps) per generator sample (default 16; 1 with "
                                                   "--baseline)."),
    proposal: str = typer.Option(None, help="Timestep proposal: learned (default), weight (q ~ p w) or none."),
    stratify: str = typer.Option(None, help="Stratification: per_upstream (default), global, lattice or none."),
    upstream: str = typer.Option(None, help="Generator samples: iid (default) or strata (balanced labels, "
                                            "randomised-QMC latents)."),
    weighting: str = typer.Option(None, help="w(t): dmd (per-draw normalisation), sds, uniform or snr."),
    guidance_scale: float = typer.Option(None, "--guidance-scale", help="CFG scale on the real score (default 1)."),
    generator_lr: float = typer.Option(None, "--generator-lr", help="Generator learning rate (default 3e-5)."),
    fake_lr: float = typer.Option(None, "--fake-lr", help="Fake-score learning rate (default 1e-4)."),
    fake_updates: int = typer.Option(None, "--fake-updates", min=0, help="Fake-score updates per step (default 2)."),
    fake_warmup: int = typer.Option(None, "--fake-warmup", min=0, help="Fake-score updates before step 1 (100)."),
    eval_every: int = typer.Option(None, "--eval-every", min=1, help="Steps between FD/accuracy evaluations."),
    eval_per_class: int = typer.Option(None, "--eval-per-class", min=1, help="Evaluation samples per class (50)."),
    grid_every: int = typer.Option(None, "--grid-every", min=1, help="Steps between sample-grid PNGs."),
    checkpoint_steps: str = typer.Option(None, "--checkpoint-steps", help="Comma-separated steps to checkpoint."),
    teacher: Path = typer.Option(None, help="Teacher safetensors (default: the committed digits teacher)."),
    threads: int = typer.Option(None, min=1, help="torch threads (default 1: faster on a shared machine)."),
    seed: int = typer.Option(None, help="Random seed (default 0)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming the folder's saved run."),
):
    """One-step distribution-matching distillation of the digits teacher (DMD), gradient through carv's default
    estimator (K = 16 draws per sample, learned timestep proposal, per-sample strata; --baseline: the plain one)."""
    from carv.accounting import accounting_sentence
    from carv.apps.distill import DistillConfig, distill_from_cli

    flags = _config_flags(DistillConfig, {**locals(), "teacher": None})  # --teacher is a weights file, not a field
    try:
        res = distill_from_cli(out, config, flags, teacher, fresh=fresh, baseline=baseline)
    except ValueError as e:
        _bad_parameter(e)
    f = res["final"]
    typer.echo(f"{res['steps']} steps, {res['compute_s']:.0f} s of compute: FD {f['fd']:.1f}, "
               f"accuracy {f['accuracy']:.3f}; run folder {res['run_dir']}")
    typer.echo(accounting_sentence(res["accounting"]))


@bench_app.command("distill")
def bench_distill_cmd(
    out: Path = typer.Option(Path("runs/bench-distill"), help="Run folder (resumes an unfinished run)."),
    quick: bool = typer.Option(False, "--quick", help="Short budgets and few replicates (about 5 minutes)."),
    json_path: Path = typer.Option(None, "--json", help="Write {'rows': [...], 'quality': [...]} here."),
    teacher: Path = typer.Option(None, help="Teacher safetensors (default: the committed digits teacher)."),
    threads: int = typer.Option(1, min=1, help="torch threads (1 is faster on a shared machine)."),
    upstream_only: bool = typer.Option(False, "--upstream-only", help="Only the start checkpoint's variance rows "
                                                                      "(all five configurations, upstream strata "
                                                                      "included), stored under 'upstream_strata'."),
    replicates: int = typer.Option(None, min=2, help="With --upstream-only: replicates per configuration."),
    config: Path = typer.Option(None, "--config", help="JSON object of BenchSettings fields (a smaller "
                                                       "configuration, e.g. {\"train\": false}: the start "
                                                       "checkpoint's variance rows only)."),
):
    """DMD on digits: generator-gradient variance of R8K1 / R8K16 / +strat / +is+strat / +strat+upstream at
    three checkpoints, and FD / accuracy of baseline vs carv training at equal wall-clock over 3 seeds."""
    from carv.bench.distill import BenchSettings, bench_from_cli, bench_upstream_strata

    if upstream_only:
        from carv.apps.distill import DistillConfig, teacher_from_path

        s = BenchSettings(replicates=replicates or 40, reference_estimates=8, reference_R=32)
        cmd = f"carv bench distill --upstream-only --replicates {s.replicates} --threads {threads}"
        bench_upstream_strata(out, json_path, s, DistillConfig(threads=threads), teacher_from_path(teacher),
                              command=cmd)
        return
    try:
        bench_from_cli(out, quick, json_path, teacher, threads, config)
    except ValueError as e:
        _bad_parameter(e)


@app.command("text-to-3d")
def text_to_3d_cmd(
    prompt: str = typer.Argument(None, help="A prompt of the scenes teacher (default: 'a red mushroom'); with "
                                              "--teacher any prompt (ground-truth quality only for the scenes')."),
    out: Path = typer.Option(None, help="Run folder (default runs/text-to-3d/<prompt>); rerunning continues it."),
    steps: int = typer.Option(None, min=1, help="Optimisation steps (default 400)."),
    budget_s: float = typer.Option(None, "--budget", help="Also stop after this many seconds of training time."),
    baseline: bool = typer.Option(False, "--baseline", help="The plain estimator: uniform timesteps, K = 1."),
    compare: bool = typer.Option(False, "--compare", help="Also train the baseline, at equal per-step compute "
                                                          "(default) or wall-clock; side-by-side turntables, "
                                                          "quality against steps and seconds."),
    compare_at: str = typer.Option("step", "--compare-at", help="With --compare: 'step' (carv's allocator spends "
                                                                "the baseline's measured step cost) or 'wall-clock'."),
    R: int = typer.Option(None, "--R", min=1, help="Renders per step (default 2; with the accountant's budget: "
                                                    "the plain step's R that sets the budget)."),
    K: int = typer.Option(None, "--K", min=1, help="Draws per render (default: chosen by the accountant)."),
    step_budget: str = typer.Option(None, "--step-budget", help="The accountant's per-step budget: 'baseline' "
                                                                "(default: the plain estimator's measured step), "
                                                                "seconds, or 'free' (K only, at fixed R)."),
    upstream: str = typer.Option(None, help="Training cameras: lattice (default; spread across steps), strata "
                                            "(spread within a step) or iid."),
    proposal: str = typer.Option(None, help="Timestep proposal: auto (default: uniform, q ~ p w or learned, "
                                            "chosen from the run's own draws), learned, weight or none."),
    stratify: str = typer.Option(None, help="Stratification: per_upstream (default), global, lattice or none."),
    live_costs: bool = typer.Option(False, "--live-costs", help="Re-measure the stage costs at every choice of "
                                    "(R, K) (default: calibrated once and kept on resume)."),
    cost_ratio: float = typer.Option(None, "--cost-ratio", help="Pin the render : draw cost ratio the accountant "
                                     "chooses from (default: measured over the first steps; the run's summary.json "
                                     "has the value it used)."),
    probe_ratio: float = typer.Option(None, "--probe-ratio", help="Pin the variance probe's cost in draws (default: "
                                      "measured). With --cost-ratio: the same choices on any machine."),
    fill_budget: bool = typer.Option(False, "--fill-budget", help="Spend the whole per-step budget (the smallest "
                                     "variance it allows; default: the most efficient step within it)."),
    mix_pairs: bool = typer.Option(None, "--mix-pairs/--no-mix-pairs", help="Where the per-step budget leaves room "
                                   "that K + 1 draws do not fit, run a share of the steps at K + 1 (default: on)."),
    guidance_scale: float = typer.Option(None, "--guidance-scale", help="Classifier-free guidance (default 3)."),
    t_lo: float = typer.Option(None, "--t-lo", help="Lowest timestep, a fraction of T (default 0.02)."),
    t_hi: float = typer.Option(None, "--t-hi", help="Highest timestep at step 0, a fraction of T (default 0.98)."),
    t_hi_end: float = typer.Option(None, "--t-hi-end", help="Anneal the highest timestep linearly to this "
                                                             "fraction over --anneal-steps (default 0.4; "
                                                             "--t-hi-end equal to --t-hi: no annealing)."),
    anneal_steps: int = typer.Option(None, "--anneal-steps", min=1, help="Steps of the annealing (200)."),
    sparsity_weight: float = typer.Option(None, "--sparsity", help="Per-pixel penalty on rendered opacity from "
                                                                   "step 100 (default 0: none)."),
    lr: float = typer.Option(None, "--lr", help="Adam's learning rate (default 0.1)."),
    baseline_lr: float = typer.Option(None, "--baseline-lr", help="With --compare: the baseline's own learning "
                                                                   "rate (default: --lr, the same for both)."),
    grid_resolution: int = typer.Option(None, "--grid-resolution", help="Voxels per side (default 48)."),
    render_size: int = typer.Option(None, "--render-size", help="Render size before resizing to 32 px (64)."),
    n_samples: int = typer.Option(None, "--n-samples", help="Samples per ray (default 48)."),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", min=1, help="Steps between checkpoints (50)."),
    eval_every_s: float = typer.Option(None, "--eval-every-s", help="Seconds of training between quality "
                                       "evaluations (default 20)."),
    eval_every: int = typer.Option(None, "--eval-every", min=1, help="Steps between quality evaluations instead "
                                   "(default with --compare: steps / 20; its steps-to-quality reading needs 9 or "
                                   "more evaluations per run)."),
    fresh: bool = typer.Option(False, "--fresh", help="Move the folder's earlier run aside and start over."),
    restart: bool = typer.Option(False, "--restart", hidden=True, help="Deprecated alias of --fresh."),
    threads: int = typer.Option(None, min=1, help="torch threads (1 is often faster on a shared machine)."),
    seed: int = typer.Option(None, min=0, help="Random seed (default 0)."),
    teacher: Path = typer.Option(None, "--teacher", help="A local diffusers Stable Diffusion folder: latent SDS "
                                 "(render -> VAE encode -> SDS) instead of the scenes teacher."),
    reference: Path = typer.Option(None, "--reference", help="A finished text-to-3d run folder (e.g. a long, "
                                   "low-variance run): evaluations also report PSNR / IoU against its renders."),
):
    """Text-to-3D: score-distil a voxel grid from the procedural-scenes teacher (carv estimator by default).

    Writes config, metrics (JSON lines), turntable, ground-truth comparison and plots; resumable."""
    from carv.apps.text_to_3d import TextTo3DConfig, config_from_cli, run_text_to_3d

    flags = _config_flags(TextTo3DConfig, {**locals(), "prompt": None})  # the prompt: config_from_cli's argument
    try:
        if restart:
            typer.echo("warning: --restart is deprecated; use --fresh (the same everywhere)", err=True)
        cfg = config_from_cli(prompt, flags, baseline=baseline, compare=compare, compare_at=compare_at)
        if compare:
            from carv.bench.compare import compare_text_to_3d

            compare_text_to_3d(cfg.prompt, out, cfg, compare_at=compare_at, fresh=fresh or restart)
        else:
            run_text_to_3d(cfg.prompt, out, cfg, fresh=fresh or restart)
    except ValueError as e:
        _bad_parameter(e)


@bench_app.command("text-to-3d")
def bench_text_to_3d_cmd(
    out: Path = typer.Option(Path("runs/bench-text-to-3d"), help="Run folder (resumes an unfinished run)."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run, not a measurement: the same protocol at R = 2, "
                                                      "K in {1, 4, 8}, few replicates, one quality pair."),
    json_path: Path = typer.Option(None, "--json", help="Write {'rows': [...], 'cost_ratio', 'auto_k', 'quality'}."),
    threads: int = typer.Option(None, min=1, help="torch threads (1 is often faster on a shared machine)."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Random seed."),
    config: Path = typer.Option(None, "--config", help="JSON object of BenchSettings fields (a smaller "
                                                       "configuration than the default; the rest keep defaults)."),
):
    """Text-to-3D SDS: parameter-gradient variance (uniform / importance / stratified / both; peers at K = 1 and
    at carv's K) at three snapshots, ECM (pooled stage costs, pilots and probes charged, bootstrap error bars),
    the a-priori headline and best-of-N, RE, bound fraction, cost-ratio sweep, quality at equal wall-clock."""
    from carv.bench.text_to_3d import bench_text_to_3d

    try:
        bench_text_to_3d(out, quick=quick, json_path=json_path, threads=threads, seed=seed, command=_command_line(),
                         config=config)
    except ValueError as e:
        _bad_parameter(e)


def _command_line() -> str:
    """The exact command this process runs, as a user would type it (for the benchmark JSON's run record)."""
    import shlex

    return shlex.join(["carv", *sys.argv[1:]])


@bench_app.command("allocator")
def bench_allocator_cmd(
    out: Path = typer.Option(None, help="Run folder (replicates resume; default "
                                        "runs/bench-allocator-<pipeline>)."),
    grid: Path = typer.Option(None, help="A text-to-3D checkpoint (checkpoint-*.safetensors) to freeze; "
                                         "default: the initial blob."),
    budgets: str = typer.Option("2,8", help="Per-step budgets as multiples of one render with one draw "
                                            "(2 = the plain estimator's R = 2, K = 1 step)."),
    replicates: int = typer.Option(24, min=2, help="Replicates per fixed (R, K) candidate."),
    pilot_steps: int = typer.Option(60, min=5, help="Steps of the allocator's own run at the frozen grid."),
    json_path: Path = typer.Option(None, "--json", help="Also write the result here."),
    threads: int = typer.Option(1, min=1, help="torch threads."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Random seed."),
    cameras: bool = typer.Option(False, "--cameras", help="Instead: between-render variance with and without "
                                                          "camera strata (lattice across steps, strata at R = 2)."),
    pipeline: str = typer.Option("text-to-3d", "--pipeline", help="text-to-3d (a frozen grid) or distill (the "
                                                                  "one-step generator at its start checkpoint)."),
):
    """The online Allocator's (R, K) against the best fixed (R, K) in hindsight at the same per-step budget
    (Var * C by replicates against a reference), on text-to-3D or distillation; with --cameras, the camera
    strata."""
    from carv.bench.allocator import bench_allocator_distill, bench_allocator_text_to_3d, bench_camera_strata_text_to_3d

    if pipeline not in ("text-to-3d", "distill"):
        raise typer.BadParameter(f"pipeline: expected 'text-to-3d' or 'distill', got {pipeline!r}")
    if pipeline == "distill" and (cameras or grid is not None):
        raise typer.BadParameter("pipeline: --cameras and --grid are text-to-3d options; drop them with "
                                 "--pipeline distill")
    out = out if out is not None else Path(f"runs/bench-allocator-{pipeline}")

    if cameras:
        cmd = f"carv bench allocator --cameras --replicates {replicates} --threads {threads}"
        bench_camera_strata_text_to_3d(out, json_path, replicates=replicates, threads=threads, seed=seed, command=cmd)
        return

    try:
        bs = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise typer.BadParameter(f"budgets: expected comma-separated numbers, got {budgets!r}") from None
    if not bs or any(b < 1 for b in bs):
        raise typer.BadParameter(f"budgets: expected numbers >= 1 (one render with one draw), got {budgets!r}")
    cmd = (f"carv bench allocator --budgets {budgets} --replicates {replicates} --pilot-steps {pilot_steps} "
           f"--threads {threads}" + (f" --grid {grid}" if grid else ""))
    if pipeline == "distill":
        bench_allocator_distill(out, bs, json_path, replicates, pilot_steps, threads, seed=seed,
                                command=cmd + " --pipeline distill")
        return
    bench_allocator_text_to_3d(out, bs, grid, json_path, replicates, pilot_steps, threads, seed=seed, command=cmd)


@bench_app.command("sd")
def bench_sd_cmd(
    pipeline: Path = typer.Option(None, help="A local diffusers Stable Diffusion folder (default: the tiny "
                                  "random-weight pipeline, built offline)."),
    smoke: bool = typer.Option(False, "--smoke", help="A few replicates, K <= 4 for memory: checks the script "
                               "runs (a few minutes on CPU)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the results JSON here."),
    out: Path = typer.Option(Path("runs/bench-sd"), help="Output folder (sd_bench.json, the tiny pipeline)."),
    device: str = typer.Option(None, help="cuda or cpu (default: cuda when available)."),
    half: bool = typer.Option(True, "--half/--no-half", help="float16 weights on CUDA (threestudio's default)."),
    threads: int = typer.Option(None, min=1, help="torch threads."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Random seed."),
    only: str = typer.Option(None, help="Run only one part: 'memory' or 'ecm'."),
):
    """Latent SDS with a Stable Diffusion pipeline: upstream/draw cost split, variance and ECM of uniform vs
    importance + strata at R = 2, and peak memory against K with the default chunking."""
    from carv.bench.sd import run_sd_bench

    try:
        run_sd_bench(None if pipeline is None else str(pipeline), smoke, json_path, out, device, half, threads, seed,
                     command=None, only=only)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(f"warning: {message}\n")


def main() -> None:
    """Entry point. An operating-system error (a run folder that cannot be created or written, a full
    disk, a missing input file) ends with one line naming the path instead of a traceback; the run
    folder, where one was started, keeps its checkpoints, so the same command resumes once it is fixed.
    A run folder that cannot be used (another command's, another configuration, in use by another
    process, damaged beyond its fallback checkpoint) ends with one line too; repairs print one warning line."""
    import warnings

    from carv._runfolder import CorruptFileError, RunFolderError, WriteError

    warnings.showwarning = _one_line_warning
    try:
        app()
    except WriteError as e:  # any writer's failure (full disk, lost permission, safetensors, matplotlib), one line
        sys.stderr.write(f"Error: {e}. Files already written are kept whole; free the space, fix the permission or "
                         f"choose another --out, then rerun the same command to resume.\n")
        raise SystemExit(2) from None
    except (RunFolderError, CorruptFileError) as e:
        sys.stderr.write(f"Error: {e}\n")
        raise SystemExit(2) from None
    except MemoryError as e:  # refused before allocating (a teacher chunk that cannot fit), or the allocator's
        sys.stderr.write(f"Error: out of memory: {str(e) or 'an allocation failed'}. Lower the sizes (--K, "
                         f"--render-size, --n-samples, --grid-resolution, max_batch); finished work is kept.\n")
        raise SystemExit(2) from None
    except RuntimeError as e:
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        sys.stderr.write(f"Error: out of memory ({str(e).splitlines()[0][:160]}). Lower the sizes (--K, "
                         f"--render-size, --n-samples, --grid-resolution, max_batch); finished work is kept.\n")
        raise SystemExit(2) from None
    except OSError as e:
        if e.filename is None:  # raised by carv with its own message (e.g. missing teacher weights)
            sys.stderr.write(f"Error: {e}\n")
        else:
            sys.stderr.write(f"Error: {e.strerror or e}: {str(e.filename)!r}. If this is the run folder, choose "
                             f"another with --out (or free the disk) and rerun; finished work is kept. If it is "
                             f"an input, check the path.\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
