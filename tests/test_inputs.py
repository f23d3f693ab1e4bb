"""The sampler follows the inputs' device per call without changing its own tables."""

import pytest
import torch

from carv import ScoreDistillation, TimestepSampler
from carv.schedules import VPSchedule
from carv.teachers.gaussian_mixture import GaussianMixtureTeacher

SCHED = VPSchedule.from_betas(1e-4, 0.02, 1000)
GMM = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.5], [1.0, 1.0]]), 0.3, None, SCHED)


def test_meta_device_call_is_refused_and_leaves_the_sampler_usable():
    """Issue 11, case 7: a meta-device call used to move the sampler's tables to meta for good."""
    sampler = TimestepSampler(1000, importance=torch.linspace(1, 2, 1000), floor=0.1, stratify="per_upstream")
    sds = ScoreDistillation(GMM, sampler, K=4)
    with pytest.raises(ValueError, match="meta"):
        sds(torch.zeros(2, 2, device="meta"), generator=0)
    with pytest.raises(ValueError, match="meta"):
        sampler.sample(2, 4, 0, device="meta")
    assert sampler.device == torch.device("cpu") and sampler._w.device.type == "cpu"
    a = sds(torch.zeros(2, 2), generator=0)
    b = ScoreDistillation(GMM, TimestepSampler(1000, importance=torch.linspace(1, 2, 1000), floor=0.1,
                                               stratify="per_upstream"), K=4)(torch.zeros(2, 2), generator=0)
    assert torch.equal(a.grad, b.grad) and torch.equal(a.draws.t, b.draws.t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_sampler_follows_each_calls_device_without_moving():
    sampler = TimestepSampler(1000, importance=torch.linspace(1, 2, 1000), floor=0.1, stratify="per_upstream")
    g_cpu, g_gpu = torch.Generator().manual_seed(0), torch.Generator("cuda").manual_seed(0)
    on_gpu = sampler.sample(4, 8, g_gpu, device="cuda")
    on_cpu = sampler.sample(4, 8, g_cpu)
    assert on_gpu.t.device.type == "cuda" and on_cpu.t.device.type == "cpu" and sampler.device.type == "cpu"
    assert torch.equal(on_gpu.weight.cpu(), sampler.weights.float()[on_gpu.t.cpu()])
    sds = ScoreDistillation(GMM.cuda(), sampler, K=4)
    assert sds(torch.zeros(2, 2, device="cuda"), generator=0).grad.device.type == "cuda"
    GMM.cpu()
    assert sds(torch.zeros(2, 2), generator=0).grad.device.type == "cpu"


class Counting(GaussianMixtureTeacher):
    calls = 0

    def predict_eps(self, x_t, t, cond=None):
        Counting.calls += 1
        return super().predict_eps(x_t, t, cond)


COUNTING = Counting(torch.tensor([[-1.0, 0.5], [1.0, 1.0]]), 0.3, None, SCHED)


@pytest.mark.parametrize("x", [torch.zeros(2, 2, dtype=torch.complex64), torch.zeros(2, 2, dtype=torch.int64),
                               torch.zeros(2, 2, dtype=torch.bool)])
def test_complex_int_and_bool_x_are_refused_naming_x_and_the_dtypes(x):
    """Issue 11, case 8: complex x used to lose its imaginary part silently; int/bool gave torch's error."""
    Counting.calls = 0
    with pytest.raises(TypeError, match=r"x: expected a real floating-point tensor \(float16, bfloat16, float32 or "
                                        r"float64\), got dtype torch\."):
        ScoreDistillation(COUNTING, TimestepSampler(1000), K=2)(x, generator=0)
    assert Counting.calls == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_x_is_the_inputs_fault_found_before_the_teacher(bad):
    Counting.calls = 0
    x = torch.zeros(3, 2)
    x[1, 0] = bad
    with pytest.raises(ValueError, match=r"x: the input holds NaN or inf in upstream sample\(s\) \[1\] of 3 "
                                         r"\(found before any teacher call\)") as e:
        ScoreDistillation(COUNTING, TimestepSampler(1000), K=2)(x, generator=0)
    assert Counting.calls == 0 and "teacher output" not in str(e.value)


def test_a_cond_of_the_wrong_batch_is_named_with_its_shape_and_the_expected_batch():
    from carv.objectives.dmd import DistributionMatching
    from carv.teachers.scenes import load_scenes_teacher

    teacher = load_scenes_teacher()
    sds = ScoreDistillation(teacher, TimestepSampler(teacher.schedule.num_timesteps), K=2, guidance_scale=3.0)
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"cond: expected one row per upstream sample, i\.e\. shape \[2, \.\.\.\] "
                                         r"\(x has R = 2\), got shape \(3, 2\)"):
        sds(x, torch.zeros(3, 2, dtype=torch.long), generator=0)
    with pytest.raises(ValueError, match=r"uncond: expected one row per upstream sample.*got shape \(1, 2\)"):
        sds(x, torch.zeros(2, 2, dtype=torch.long), generator=0, uncond=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cond\['emb'\]: expected one row per upstream sample.*got shape \(4, 8\)"):
        sds(x, {"emb": torch.zeros(4, 8)}, generator=0)
    dmd = DistributionMatching(teacher, teacher, TimestepSampler(teacher.schedule.num_timesteps), K=2)
    with pytest.raises(ValueError, match=r"cond: expected one row per upstream sample.*got shape \(5, 2\)"):
        dmd(x, torch.zeros(5, 2, dtype=torch.long), generator=0)
    with pytest.raises(ValueError, match="x: the input holds NaN"):
        dmd(torch.full((2, 3, 32, 32), float("nan")), torch.zeros(2, 2, dtype=torch.long), generator=0)
