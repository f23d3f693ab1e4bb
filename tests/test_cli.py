"""The command line: help, bad flags give clear errors, the demo runs."""

import subprocess
import sys

from typer.testing import CliRunner

from carv.cli import app

runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("demo", "bench", "train-teacher"):
        assert cmd in res.output


def test_bad_flag_is_named():
    res = runner.invoke(app, ["demo", "--threads", "0"])
    assert res.exit_code != 0
    assert "threads" in res.output


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "carv", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout


def test_overhead_bench_measures_every_mode_against_randint():
    from carv.bench.overhead import accountant_overhead, sampler_overhead
    from carv.timesteps import STRATIFY_MODES

    s = sampler_overhead(n=16 * 64, repeats=3)
    assert set(s["ratio_vs_randint"]) == {f"importance+{m}" for m in STRATIFY_MODES}
    assert all(r > 0 for r in s["ratio_vs_randint"].values())
    a = accountant_overhead(repeats=2)
    assert 0 < a["fraction_of_teacher_call"] and a["accountant_s"] == a["median_s"]["accountant"]


def test_unwritable_run_folder_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = subprocess.run([sys.executable, "-m", "carv", "demo", "--quick", "--out", str(blocker / "run")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "Error: could not write" in out.stderr and "a-file/run': Not a directory" in out.stderr
    assert "--out" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_a_real_write_failure_mid_run_is_one_line_and_the_rerun_resumes(tmp_path):
    """Issue 25: safetensors raises SafetensorError (not OSError) when the disk is full; a real failure (a 100 KiB
    file-size limit, so the first checkpoint cannot be written) ends in one line, and the same command resumes."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, 100 * 1024))

    args = [sys.executable, "-m", "carv", "text-to-3d", "a snowman", "--steps", "3", "--K", "2", "--checkpoint-every",
            "2", "--grid-resolution", "16", "--render-size", "32", "--n-samples", "16", "--threads", "1",
            "--out", str(tmp_path / "run")]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    err = [ln for ln in res.stderr.splitlines() if "it/s" not in ln and "s/it" not in ln and ln.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert err[-1].startswith("Error: could not write") and "checkpoint-0000002.safetensors': File too large" in err[-1]
    assert not list((tmp_path / "run").glob(".*.tmp"))  # the half-written checkpoint did not stay behind
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint-*"))] == ["checkpoint-0000002.safetensors",
                                                                                "checkpoint-0000003.safetensors"]
