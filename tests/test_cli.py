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
    assert "Error: Not a directory" in out.stderr and "a-file" in out.stderr and "--out" in out.stderr
    assert "Traceback" not in out.stderr


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
