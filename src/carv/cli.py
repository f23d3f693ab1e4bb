"""carv command line. Thin by design: every command parses flags and calls one function of an app,
a benchmark or a teacher module; no sampling, weighting or accounting logic lives here."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="carv: cheaper Monte Carlo estimates with frozen diffusion teachers.")
bench_app = typer.Typer(no_args_is_help=True, help="Side-by-side benchmarks (write tables, plots, JSON).")
train_app = typer.Typer(no_args_is_help=True, help="Retrain the built-in teachers (reproduces committed weights).")
app.add_typer(bench_app, name="bench")
app.add_typer(train_app, name="train-teacher")


@train_app.command("digits")
def train_digits(
    out: Path = typer.Option(None, help="Output folder (default: the package's assets folder)."),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Class-conditional DDPM + feature classifier on scikit-learn's digits (16x16)."""
    from carv.apps.assets import train_digits_assets

    train_digits_assets(out_dir=out, seed=seed)


@train_app.command("scenes")
def train_scenes(
    out: Path = typer.Option(None, help="Output folder (default: the package's assets folder)."),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Prompt- and view-conditioned DDPM on renders of the procedural scenes (32x32 RGB)."""
    from carv.teachers.scenes import train_and_save

    train_and_save(out_dir=out, seed=seed)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run folder (resumes if it holds an unfinished run)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer replicates (about a minute on 2 cores)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the results JSON here."),
    threads: int = typer.Option(None, min=1, help="torch threads (default: torch's choice)."),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Embedded default: SDS of a point set through a costly map toward a Gaussian-mixture teacher.

    Prints variance, cost, RE, ECM and the accountant's K for uniform / importance / stratified / both."""
    from carv.apps.toy import ToyConfig, run_demo

    run_demo(out, quick=quick, json_path=json_path, cfg=ToyConfig(seed=seed, threads=threads))


@bench_app.command("overhead")
def bench_overhead(
    json_path: Path = typer.Option(None, "--json", help="Write the results JSON here."),
    quick: bool = typer.Option(False, "--quick", help="Fewer repeats."),
):
    """Sampler overhead vs torch.randint (10^6 draws) and accountant overhead vs one teacher call."""
    from carv.bench.overhead import run_overhead

    res = run_overhead(json_path, quick)
    for k, v in res["sampler"]["ratio_vs_randint"].items():
        typer.echo(f"sampler {k:<28} {v:5.2f}x torch.randint ({res['sampler']['n']:,} draws)")
    a = res["accountant"]
    typer.echo(f"accountant per step: {a['accountant_s'] * 1e3:.3f} ms = {100 * a['fraction_of_teacher_call']:.2f}% "
               f"of one teacher call ({a['median_s']['teacher'] * 1e3:.1f} ms, R*K = {a['R'] * a['K']})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
