"""Every numeric flag and config key is bounded and named in its error (issue 11, case 8), before any work."""

import json

import pytest
from typer.testing import CliRunner

from carv.cli import app

runner = CliRunner()
HUGE = str(2**64)
TYPER_SEED = "Invalid value for '--seed'"  # typer's own range check (0..2**63 - 1)


def _err(res) -> str:
    return " ".join(res.output.replace("│", " ").split()) + " " + str(res.exception or "")


@pytest.mark.parametrize("args, needle", [
    (["text-to-3d", "--seed", HUGE], "seed: expected an integer seed in 0..9223372036854775807"),
    (["distill", "--seed", HUGE], "seed: expected an integer seed"),
    (["demo", "--seed", HUGE], TYPER_SEED),
    (["attribute", "3", "--seed", HUGE], "seed: expected an integer seed"),
    (["bench", "text-to-3d", "--quick", "--seed", HUGE], TYPER_SEED),
    (["bench", "attribution", "--quick", "--seed", HUGE], TYPER_SEED),
    (["bench", "allocator", "--seed", HUGE], TYPER_SEED),
    (["bench", "allocator", "--cameras", "--seed", HUGE], TYPER_SEED),
    (["bench", "sd", "--smoke", "--seed", HUGE], TYPER_SEED),
    (["train-teacher", "digits", "--seed", HUGE], TYPER_SEED),
    (["train-teacher", "scenes", "--seed", HUGE], TYPER_SEED),
    (["train-teacher", "scenes", "--elevation-bins", "-1"], "Invalid value for '--elevation-bins'"),
    (["train-teacher", "scenes", "--init", "/no/such/teacher.safetensors"], "no teacher file at"),
    (["text-to-3d", "--guidance-scale", "inf"], "guidance_scale: expected a finite non-negative number"),
    (["text-to-3d", "--budget", "nan"], "budget_s"),
    (["text-to-3d", "--grid-resolution", "100000"], "grid_resolution: expected an integer in 1..256"),
    (["text-to-3d", "--render-size", "32000"], "render_size: expected an integer in 1..512"),
    (["text-to-3d", "--n-samples", "10000000"], "n_samples: expected an integer in 1..1024"),
    (["distill", "--guidance-scale", "inf"], "guidance_scale: expected a finite number"),
    (["distill", "--fake-lr", "inf"], "fake_lr: expected a finite number"),
    (["distill", "--generator-lr", "inf"], "generator_lr: expected a finite number"),
    (["distill", "--time-budget", "inf"], "time_budget_s: expected a finite number"),
])
def test_out_of_range_flags_are_named(tmp_path, args, needle):
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert res.exit_code != 0
    assert needle in _err(res), _err(res)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_config_file_errors_name_the_file_and_key(tmp_path):
    def run(text: str | bytes):
        p = tmp_path / "cfg.json"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return runner.invoke(app, ["distill", "--config", str(p), "--out", str(tmp_path / "run")])

    for text in ("R = 8\n", b'{"R": 8, \xff}', '{"R": 8'):
        res = run(text)
        assert res.exit_code != 0 and "--config" in _err(res) and "cfg.json" in _err(res).replace(" ", ""), _err(res)
    res = run(json.dumps({"R": 8, "lerning_rate": 1}))
    assert "unknown field(s) ['lerning_rate']" in _err(res)
    for key, value, needle in (("R", "8", "R: expected int, got '8'"), ("betas", 5, "betas: expected tuple"),
                               ("checkpoint_steps", 3, "checkpoint_steps: expected list[int]"),
                               ("seed", True, "seed: expected int"), ("floor", "0.1", "floor: expected float"),
                               ("max_batch", 2.5, "max_batch: expected int | None")):
        res = run(json.dumps({key: value}))
        assert res.exit_code != 0 and needle in _err(res), (key, _err(res))


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x08" + bytes(7) + b"{}      "])
def test_bad_teacher_files_are_named(tmp_path, content):
    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(content)
    res = runner.invoke(app, ["distill", "--teacher", str(bad), "--out", str(tmp_path / "run")])
    assert res.exit_code != 0
    assert "--teacher" in _err(res) and "teacher.safetensors" in _err(res).replace(" ", ""), _err(res)
    assert "Traceback" not in res.output


def test_a_bad_init_teacher_is_named_before_any_rendering(tmp_path):
    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    res = runner.invoke(app, ["train-teacher", "scenes", "--init", str(bad), "--out", str(tmp_path / "run")])
    assert res.exit_code != 0
    assert "--init" in _err(res) and "not a safetensors file" in _err(res), _err(res)
    assert not (tmp_path / "run" / "scenes_teacher.safetensors").exists()


def test_a_teacher_file_without_its_config_is_named(tmp_path):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "noconfig.safetensors"
    save_file({"model.w": torch.zeros(1)}, str(bad), metadata={"format": "carv.unet_teacher/1"})
    res = runner.invoke(app, ["distill", "--teacher", str(bad), "--out", str(tmp_path / "run")])
    text = _err(res)
    assert res.exit_code != 0 and "damaged or incomplete" in text and "noconfig" in text.replace(" ", ""), text
