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


def _captured(monkeypatch, module, name, result=None):
    """Replace ``module.name`` (the function a command calls) by one recording its arguments: the command line's
    own work (flags -> config) is what is checked, without running the pipeline."""
    import importlib

    calls = []
    monkeypatch.setattr(importlib.import_module(module), name, lambda *a, **kw: calls.append((a, kw)) or result)
    return calls


def test_every_command_takes_capital_k_and_attribute_keeps_k_as_a_hidden_alias(monkeypatch):
    calls = _captured(monkeypatch, "carv.apps.attribute", "attribute")
    for spelling in ("--K", "--k"):
        res = runner.invoke(app, ["attribute", "5", spelling, "3", "--num-train", "7", "--seed", "2"])
        assert res.exit_code == 0, res.output
    (cfg_a, cfg_b) = (kw["cfg"] for _, kw in calls)
    assert cfg_a == cfg_b and (cfg_a.K, cfg_a.num_train, cfg_a.seed, cfg_a.method) == (3, 7, 2, "stratified")
    text = runner.invoke(app, ["attribute", "--help"], env={"COLUMNS": "200"}).output
    assert "--K" in text and "--k " not in text
    for cmd in ("distill", "text-to-3d"):
        assert "--K" in runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"}).output


def test_text_to_3d_flags_set_the_config_fields_they_name(monkeypatch, tmp_path):
    calls = _captured(monkeypatch, "carv.apps.text_to_3d", "run_text_to_3d")
    res = runner.invoke(app, ["text-to-3d", "a snowman", "--out", str(tmp_path), "--budget", "5", "--R", "3",
                              "--K", "4", "--sparsity", "0.1", "--seed", "7"])
    assert res.exit_code == 0, res.output
    (prompt, out, cfg), _ = calls[0]
    assert prompt == "a snowman" and out == tmp_path
    assert (cfg.budget_s, cfg.R, cfg.K, cfg.sparsity_weight, cfg.seed) == (5.0, 3, 4, 0.1, 7)
    assert cfg.steps == 400 and cfg.method == "carv"  # not given: the config's defaults


def test_distill_uses_carvs_default_estimator_and_baseline_the_plain_one(monkeypatch, tmp_path):
    from carv.accounting import accounting_summary
    from carv.apps.distill import CARV_ESTIMATOR, DistillConfig

    summary = {"steps": 3, "compute_s": 1.0, "final": {"fd": 1.0, "accuracy": 0.5}, "run_dir": str(tmp_path),
               "accounting": accounting_summary(None, None, None, None, 8, 1)}
    calls = _captured(monkeypatch, "carv.apps.distill", "run_distill", summary)
    monkeypatch.setattr("carv.apps.distill.teacher_from_path", lambda path: None)
    for extra in ([], ["--baseline"], ["--K", "4"], ["--baseline", "--K", "4"]):
        res = runner.invoke(app, ["distill", "--out", str(tmp_path), "--steps", "3", *extra])
        assert res.exit_code == 0, res.output
    carv, plain, k4, plain_k4 = (a[1] for a, _ in calls)
    assert {k: getattr(carv, k) for k in CARV_ESTIMATOR} == CARV_ESTIMATOR == {"K": 16, "proposal": "learned",
                                                                              "stratify": "per_upstream"}
    assert plain == DistillConfig(steps=3) and (plain.K, plain.proposal, plain.stratify) == (1, "none", "none")
    assert (k4.K, k4.proposal, k4.steps) == (4, "learned", 3)
    assert plain_k4 == DistillConfig(steps=3, K=4)  # the flags apply over either starting point
