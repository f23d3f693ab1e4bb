"""Bounds derived from the machine (threads) and from the data (steps, learning rates, K ranges, timesteps): each
refused at once with one line naming the argument, the value and what is allowed (issue 25)."""

import os
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from carv._machine import set_threads
from carv._validate import STEPS_MAX, check_lr, threads_max
from carv.accounting import Allocator, allocate, optimal_k, work_normalised_variance
from carv.cli import app
from carv.timesteps import LearnedProposal


def _err(res) -> str:
    return " ".join(res.output.replace("│", " ").split()) + " " + str(res.exception or "")


def test_threads_are_bounded_by_the_machine():
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=rf"threads: expected an integer in 1..{threads_max()} .*this machine has "
                                         rf"{os.cpu_count()}\), got 100000"):
        set_threads(100000)
    assert torch.get_num_threads() == before  # refused before torch is asked
    set_threads(None)
    set_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)
    from carv.apps.attribute import AttributeConfig
    from carv.apps.distill import DistillConfig
    from carv.apps.text_to_3d import TextTo3DConfig

    for cfg in (AttributeConfig(threads=10**5), DistillConfig(threads=10**5), TextTo3DConfig(threads=10**5)):
        with pytest.raises(ValueError, match="threads: expected an integer in 1.."):
            cfg.validate()


@pytest.mark.parametrize("args", [["text-to-3d", "--threads", "100000"], ["distill", "--threads", "100000"],
                                  ["attribute", "17", "--threads", "100000"], ["bench", "overhead", "--threads",
                                                                                "100000"],
                                  ["text-to-3d", "--steps", str(10**19)], ["distill", "--steps", str(10**19)],
                                  ["text-to-3d", "--lr", "1e308"], ["distill", "--generator-lr", "1e308"],
                                  ["text-to-3d", "--guidance-scale", "1e308"],
                                  ["distill", "--guidance-scale", "1e308"]])
def test_the_cli_refuses_out_of_bounds_flags_naming_them(tmp_path, args):
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")] if args[0] != "bench" else args)
    name = {"--threads": "threads", "--steps": "steps", "--lr": "lr", "--generator-lr": "generator_lr",
            "--guidance-scale": "guidance_scale"}[args[-2]]
    assert res.exit_code == 2 and f"{name}: expected" in _err(res), _err(res)
    assert not (tmp_path / "o").exists()  # refused before the run folder is made


def test_steps_and_learning_rates_are_bounded():
    from carv.apps.text_to_3d import TextTo3DConfig

    TextTo3DConfig(steps=STEPS_MAX).validate()
    with pytest.raises(ValueError, match=r"steps: expected an integer in 1..9007199254740992"):
        TextTo3DConfig(steps=STEPS_MAX + 1).validate()
    for bad in (1e308, float("inf"), float("nan"), 0.0, -1.0, True):
        with pytest.raises(ValueError, match=r"lr: expected a learning rate in \(0, 100\]"):
            check_lr(bad)
    check_lr(np.float32(0.1))
    with pytest.raises(ValueError, match="baseline_lr: expected a learning rate"):
        TextTo3DConfig(baseline_lr=1e9).validate()


def test_a_huge_k_range_is_refused_at_once_and_numpy_scalars_are_numbers():
    t0 = time.perf_counter()
    for call in (lambda: allocate(1, 1, 1, 1, budget=10, k_range=(1, 10**9)),
                 lambda: allocate(1, 1, 1, 0, target_variance=0.1, k_range=(1, 10**9)),
                 lambda: Allocator(1.0, k_range=(1, 10**9))):
        with pytest.raises(ValueError, match=r"k_range: \(1, 1000000000\) holds 1000000000 values.*at most 1000000"):
            call()
    assert time.perf_counter() - t0 < 1.0
    assert allocate(1, 1, 1, 1, budget=10, k_range=(1, 10**6)) == allocate(1, 1, 1, 1, budget=10, k_range=(1, 64))
    # numpy scalars: the same answer as Python floats
    args = (np.float32(1.0), np.float64(4.0), np.float32(1.0), 1.0)
    assert optimal_k(*args) == optimal_k(1.0, 4.0, 1.0, 1.0) == 2
    assert work_normalised_variance(*args, 2) == pytest.approx(work_normalised_variance(1.0, 4.0, 1.0, 1.0, 2))
    with pytest.raises(ValueError, match=r"var_between: expected a finite non-negative number, got .*nan"):
        optimal_k(np.float32("nan"), 1.0, 1.0, 1.0)


def test_learned_proposal_update_refuses_timesteps_out_of_range():
    lp = LearnedProposal(1000, num_bins=50)
    for t, what in ((torch.tensor([-1]), "got -1"), (torch.tensor([1000]), "got 1000"),
                    (torch.tensor([3.5]), "whole-number")):
        with pytest.raises(ValueError, match=rf"t: expected .*{what}"):
            lp.update(t, torch.ones(1))
    assert float(lp.mass.sum()) == 0  # nothing was credited (t = -1 used to land in the last bin)
    lp.update(torch.tensor([0, 999]), torch.ones(2))
    assert float(lp.mass[0]) == 1 and float(lp.mass[-1]) == 1
