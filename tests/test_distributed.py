"""torch.distributed: global strata split across 2 gloo processes cover [0, 1) once, and the
all-reduced SDS gradient (as DDP computes it) is unbiased."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from carv import ScoreDistillation, TimestepSampler, VPSchedule
from carv.teachers import GaussianMixtureTeacher

T, R, K, N_REP = 1000, 2, 5, 300


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sched = VPSchedule.from_betas(1e-4, 0.02, T)
    teacher = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.5], [1.0, 1.0]]), 0.3, None, sched)
    sds = ScoreDistillation(teacher, TimestepSampler(T, stratify="global"), K=K, distributed=True)
    x = torch.tensor([[0.3, -0.2], [1.5, 0.8]])
    g = torch.Generator().manual_seed(1000 + rank)
    grads, ts = [], []
    for _ in range(N_REP):
        out = sds(x, generator=g)
        grad = out.grad.mean(0)
        dist.all_reduce(grad)  # what DDP does with the per-process gradients
        grads.append(grad / world)
        t_all = [torch.zeros_like(out.draws.t) for _ in range(world)]
        dist.all_gather(t_all, out.draws.t)
        ts.append(torch.stack(t_all))
    if rank == 0:
        save_file({"grads": torch.stack(grads), "ts": torch.stack(ts)}, out_file)
    dist.destroy_process_group()


def test_global_strata_split_across_processes():
    world = 2
    with tempfile.TemporaryDirectory() as d:
        init_file, out_file = os.path.join(d, "init"), os.path.join(d, "out.safetensors")
        mp.spawn(_worker, args=(world, init_file, out_file), nprocs=world, join=True)
        res = load_file(out_file)
    ts = res["ts"]  # [N_REP, world, R, K]
    fine = torch.sort((ts.reshape(N_REP, -1) * (R * K * world)) // T, dim=1).values
    assert torch.equal(fine, torch.arange(R * K * world).expand(N_REP, -1))  # every process-batch covers once
    # unbiased: compare the all-reduced gradient with a single-process iid reference, within 4 standard errors
    sched = VPSchedule.from_betas(1e-4, 0.02, T)
    teacher = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.5], [1.0, 1.0]]), 0.3, None, sched)
    ref_sds = ScoreDistillation(teacher, TimestepSampler(T), K=64)
    x = torch.tensor([[0.3, -0.2], [1.5, 0.8]])
    g = torch.Generator().manual_seed(7)
    ref = torch.stack([ref_sds(x, generator=g).grad.mean(0) for _ in range(400)])
    grads = res["grads"]
    diff = grads.mean(0) - ref.mean(0)
    se = (grads.var(0) / N_REP + ref.var(0) / ref.shape[0]).sqrt()
    assert float((diff / se).abs().max()) < 4.0, (diff, se)
    assert math.isfinite(float(grads.sum()))


def test_distributed_needs_global_and_an_initialised_group():
    sched = VPSchedule.from_betas(1e-4, 0.02, T)
    teacher = GaussianMixtureTeacher(torch.tensor([[0.0, 0.0]]), 0.3, None, sched)
    with pytest.raises(ValueError, match="distributed"):
        ScoreDistillation(teacher, TimestepSampler(T, stratify="per_upstream"), distributed=True)
    sds = ScoreDistillation(teacher, TimestepSampler(T, stratify="global"), distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sds(torch.zeros(1, 2), generator=0)
