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
