"""Memory stays bounded however large K is (issue 11, case 6): the R*K noise is drawn a block of columns at a
time, the teacher sees chunks of the default ``max_batch="auto"``, and work that cannot fit is refused before
allocating, naming the argument. Sizes are counted with hooks (the noise each draw makes, the rows each
network call sees), so these tests fail on code that allocates all R*K draws at once."""

import math

import pytest
import torch
from typer.testing import CliRunner

import carv._machine as machine
import carv.estimator as estimator_mod
from carv import ScoreDistillation, TimestepSampler, VPSchedule
from carv.estimator import DRAW_MEMORY_BUDGET, reduce_draws
from carv.objectives.sds import MemoryBudgetError
from carv.teachers import GaussianMixtureTeacher, Teacher

SCHED = VPSchedule.from_betas(1e-4, 0.02, 1000)
GMM = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.5], [1.0, 1.0], [0.0, -1.5]]), 0.25,
                             torch.tensor([0.5, 0.3, 0.2]), SCHED)
X = torch.tensor([[0.3, -0.2], [1.5, 0.8], [-0.7, -1.1]])


class Stop(Exception):
    pass


class Recording(Teacher):
    """Wraps a teacher: records the network batch of every call and stops the estimate after ``limit`` calls."""

    def __init__(self, inner: Teacher, limit: int | None = None):
        super().__init__()
        self.inner, self.schedule, self.limit, self.rows = inner, inner.schedule, limit, []

    def predict_eps(self, x_t, t, cond=None):
        self.rows.append(x_t.shape[0])
        if self.limit is not None and len(self.rows) >= self.limit:
            raise Stop
        return self.inner.predict_eps(x_t, t, cond)

    def null_cond(self, cond):
        return self.inner.null_cond(cond)


class Zero(Teacher):
    """A free teacher of any shape (predicts zero noise), for counting sizes without the cost of a network."""

    schedule = SCHED

    def predict_eps(self, x_t, t, cond=None):
        return torch.zeros_like(x_t)


@pytest.fixture
def noise_sizes(monkeypatch):
    """Bytes of every noise tensor the estimator draws."""
    sizes, orig = [], estimator_mod.draw_noise

    def recording(*a, **k):
        eps = orig(*a, **k)
        sizes.append(eps.numel() * eps.element_size())
        return eps

    monkeypatch.setattr(estimator_mod, "draw_noise", recording)
    return sizes


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


@pytest.mark.parametrize("K", [4096, 10**6])
def test_scenes_teacher_at_huge_K_draws_and_calls_in_bounded_chunks(K, noise_sizes, one_thread):
    """K = 4096 and K = 1e6 on the scenes teacher (guided, R = 2): the full noise would be 100 MB and 24.5 GB;
    the estimate draws it a block at a time and each network call stays within the default max_batch. The first
    teacher calls are made (the estimate is stopped there: every later block is the same size)."""
    from carv.render.cameras import random_cameras
    from carv.teachers.scenes import load_scenes_teacher, teacher_cond

    base = load_scenes_teacher()
    teacher = Recording(base, limit=3)
    sds = ScoreDistillation(teacher, TimestepSampler(teacher.schedule.num_timesteps, stratify="per_upstream"), K=K,
                            guidance_scale=3.0)
    assert sds.max_batch == "auto"  # the default (text-to-3d's SceneProblem.sds passes none)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond = teacher_cond(base, "a red mushroom", random_cameras(2, torch.Generator().manual_seed(1)))
    full = 2 * K * x[0].numel() * 4
    before = _rss()
    with pytest.raises(Stop):
        sds(x, cond, generator=0)
    grew = _rss() - before
    assert len(teacher.rows) == 3 and max(teacher.rows) <= sds.teacher_batch(x, guided=True)
    assert noise_sizes and max(noise_sizes) <= DRAW_MEMORY_BUDGET < full
    # the block's noise, noised input and repeated upstream, well below the full noise alone at K = 4096
    assert grew < 8 * DRAW_MEMORY_BUDGET, f"RSS grew {grew / 2**20:.0f} MiB"


def test_streamed_estimate_equals_the_reduction_of_the_same_draws(monkeypatch, noise_sizes):
    """Streaming (a tiny budget: 7 columns per block) gives the same timesteps as one block, noise drawn block by
    block from the same generator, and exactly the estimate (mean, components, squared norms) that
    reduce_draws gives on those draws held at once. Unbiased: each block's noise is N(0, I) and every draw keeps
    its weight."""
    R, K = 3, 50
    per_column = R * 2 * 4
    monkeypatch.setattr(estimator_mod, "DRAW_MEMORY_BUDGET", 7 * per_column)
    sampler = TimestepSampler(1000, importance=torch.linspace(1, 3, 1000), floor=0.1, stratify="per_upstream")
    sds = ScoreDistillation(GMM, sampler, K=K, weighting="sds")
    assert sds.estimator.block_columns(R, (2,)) == 7
    out = sds(X, generator=5)
    assert out.draws.eps is None and len(noise_sizes) == math.ceil(K / 7)

    d = sds.estimator.draw(R, (2,), torch.Generator().manual_seed(5), noise=False)
    assert torch.equal(d.t, out.draws.t) and torch.equal(d.weight, out.draws.weight)
    eps = torch.cat([d.next_noise(min(7, K - k0)) for k0 in range(0, K, 7)], dim=1)
    t = d.t.reshape(-1)
    x_t = SCHED.add_noise(X.repeat_interleave(K, 0), t, eps.reshape(-1, 2))
    f = (sds.w.float()[t][:, None] * (GMM.predict_eps(x_t, t) - eps.reshape(-1, 2))).reshape(R, K, 2)
    ref = reduce_draws(f, d.weight, d.t)
    assert torch.allclose(out.grad, ref.per_upstream, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.estimate.sq_norms, ref.sq_norms, rtol=1e-5)
    assert out.estimate.within == pytest.approx(ref.within, rel=1e-5)
    assert out.estimate.between == pytest.approx(ref.between, rel=1e-4, abs=1e-9)

    # the teacher's chunking changes no draw
    other = ScoreDistillation(GMM, sampler, K=K, max_batch=2)(X, generator=5)
    assert torch.equal(other.draws.t, out.draws.t)
    assert torch.allclose(other.grad, out.grad, rtol=1e-5, atol=1e-6)


def test_one_block_is_the_draw_it_always_was():
    """Below the budget nothing streams: draw(noise=False) + one next_noise(K) is draw()'s eps bit for bit, and
    antithetic blocks keep their (eps, -eps) pairs."""
    from carv.estimator import HierarchicalEstimator

    for noise in ("iid", "antithetic", "crn"):
        est = HierarchicalEstimator(TimestepSampler(1000, stratify="per_upstream"), K=6, noise=noise)
        a = est.draw(3, (4,), 11)
        b = est.draw(3, (4,), 11, noise=False)
        assert torch.equal(a.t, b.t) and torch.equal(a.eps, b.next_noise(6)), noise
    est = HierarchicalEstimator(TimestepSampler(1000), K=8, noise="antithetic")
    assert est.block_columns(2, (4,), budget=3 * 2 * 4 * 4) == 2  # 3 columns fit; rounded down to a pair
    d = est.draw(2, (4,), 0, noise=False)
    blk = d.next_noise(2)
    assert torch.equal(blk[:, 1], -blk[:, 0])


def test_a_chunk_that_cannot_fit_is_refused_before_the_teacher_is_called(monkeypatch):
    monkeypatch.setattr(machine, "free_memory", lambda device: 100 << 20)
    teacher = Recording(Zero())
    x = torch.zeros(2, 3, 32, 32)
    sds = ScoreDistillation(teacher, TimestepSampler(1000), K=4096, max_batch=None)
    with pytest.raises(MemoryBudgetError, match=r"max_batch: a teacher call of \d+ network rows .* GiB is free"):
        sds(x, generator=0)
    assert teacher.rows == []
    ScoreDistillation(teacher, TimestepSampler(1000), K=256)(x, generator=0)  # the default chunks fit
    assert teacher.rows and max(teacher.rows) <= 21  # 65536 input elements / 3072 per row
    with pytest.raises(MemoryError, match="keep_draws: holding all R"):
        ScoreDistillation(teacher, TimestepSampler(1000), K=4096)(x, generator=0, keep_draws=True)


def test_renders_that_cannot_fit_are_refused_naming_the_flags(tmp_path, monkeypatch):
    from carv.cli import app

    monkeypatch.setattr(machine, "free_memory", lambda device: 1 << 30)
    res = CliRunner().invoke(app, ["text-to-3d", "--render-size", "512", "--n-samples", "1024",
                                   "--out", str(tmp_path / "run")])
    assert isinstance(res.exception, MemoryError)  # main() prints it as one "Error: out of memory: ..." line
    text = str(res.exception)
    assert "render_size, n_samples (--render-size, --n-samples, --R)" in text, text
    assert "GiB is free" in text and not (tmp_path / "run").exists()


def test_main_prints_a_refused_render_as_one_line(tmp_path):
    import subprocess
    import sys

    # about 1.3 TB (64 views x 512^2 rays x 1024 samples): refused on any machine
    args = ["text-to-3d", "--baseline", "--render-size", "512", "--n-samples", "1024", "--R", "64"]
    res = subprocess.run([sys.executable, "-m", "carv", *args, "--out", str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: out of memory: render_size"), lines
