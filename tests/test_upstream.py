"""Upstream strata (carv.upstream): every draw marginally uniform, every step's estimate unbiased, the
spreading they promise; bad input named. Tolerances: 4 standard errors (binomial for histogram bins)."""

import math

import pytest
import torch

from carv.upstream import UpstreamSampler, balanced_labels, kronecker_alpha, sobol_normal, stratified_unit

Z = 4.0
N = 2000  # independent runs (seeds) per check


def _draw_at(mode, seed, step, R, dim):
    g = torch.Generator().manual_seed(seed)
    s = UpstreamSampler(dim, mode, generator=g)
    for _ in range(step):
        s.draw(R, g)
    return s.draw(R, g)


def _check_uniform_bins(x, bins=10):
    counts = torch.histc(x, bins=bins, min=0.0, max=1.0)
    n, p = x.numel(), 1.0 / bins
    sigma = math.sqrt(n * p * (1 - p))
    assert float((counts - n * p).abs().max()) < Z * sigma, counts


@pytest.mark.parametrize("mode", ["iid", "strata", "lattice"])
def test_every_draw_is_marginally_uniform_and_each_step_unbiased(mode):
    R, dim, step = 3, 2, 5
    u = torch.stack([_draw_at(mode, seed, step, R, dim) for seed in range(N)])  # [N, R, dim]
    assert u.shape == (N, R, dim) and bool(((u >= 0) & (u < 1)).all())
    for i in range(R):  # each position of the step, each coordinate, over the runs
        for j in range(dim):
            _check_uniform_bins(u[:, i, j])
    # f(u, v) = u v^2 + cos(2 pi u): E f = 1/6; the step's average is unbiased
    f = (u[..., 0] * u[..., 1] ** 2 + torch.cos(2 * math.pi * u[..., 0])).mean(1)
    assert abs(float(f.mean()) - 1 / 6) < Z * float(f.std()) / math.sqrt(N)


def test_strata_put_one_point_in_each_stratum_per_column():
    u = stratified_unit(8, 3, torch.Generator().manual_seed(0))
    for j in range(3):
        assert sorted((u[:, j] * 8).floor().long().tolist()) == list(range(8))


def test_lattice_at_r1_covers_the_circle_evenly_across_steps_and_beats_iid():
    """At R = 1, 34 consecutive steps (a Fibonacci number) leave no gap wider than 1.2 / 34 on the circle
    (three-gap theorem: the gaps take at most three lengths, whatever the shift); iid cameras leave gaps of
    about ln(34) / 34 = 3.5 / 34. And the run-average of a smooth integrand over those steps has far smaller
    spread than iid's."""
    g = torch.Generator().manual_seed(1)
    s = UpstreamSampler(1, "lattice", generator=g)
    u = torch.cat([s.draw(1) for _ in range(34)]).reshape(-1).sort().values
    gaps = torch.diff(torch.cat([u, u[:1] + 1]))
    assert float(gaps.max()) < 1.2 / 34

    def spread(mode):
        vals = []
        for seed in range(400):
            gg = torch.Generator().manual_seed(seed)
            sm = UpstreamSampler(1, mode, generator=gg)
            x = torch.cat([sm.draw(1, gg) for _ in range(34)])
            vals.append(float(torch.cos(2 * math.pi * x).mean()))
        return torch.tensor(vals).var()

    assert spread("lattice") < spread("iid") / 20


def test_balanced_labels_are_balanced_per_step_and_uniform_per_position():
    C, R = 10, 20
    labs = []
    for seed in range(N):
        g = torch.Generator().manual_seed(seed)
        lab = balanced_labels(UpstreamSampler(1, "strata").draw(R, g)[:, 0], C)
        assert torch.bincount(lab, minlength=C).tolist() == [R // C] * C
        labs.append(lab[0])
    counts = torch.bincount(torch.stack(labs), minlength=C).double()
    sigma = math.sqrt(N * (1 / C) * (1 - 1 / C))
    assert float((counts - N / C).abs().max()) < Z * sigma
    # lattice labels across steps at R = 1: over 100 steps each class appears 10 +- 2 times (iid: sd 3 per class)
    s = UpstreamSampler(1, "lattice", generator=torch.Generator().manual_seed(0))
    lab = torch.cat([balanced_labels(s.draw(1)[:, 0], C) for _ in range(100)])
    assert int((torch.bincount(lab, minlength=C) - 10).abs().max()) <= 2


def test_sobol_normal_latents_are_standard_normal_and_unbiased():
    g = torch.Generator().manual_seed(0)
    z = torch.cat([sobol_normal(16, (2, 3), g) for _ in range(200)])  # [3200, 2, 3]
    n = z.shape[0]
    assert z.shape == (n, 2, 3) and z.dtype == torch.float32
    flat = z.reshape(n, -1).double()
    assert float(flat.mean(0).abs().max()) < Z / math.sqrt(n)  # sd of each mean: 1/sqrt(n)
    assert float((flat.var(0) - 1).abs().max()) < Z * math.sqrt(2 / n)  # sd of a sample variance ~ sqrt(2/n)
    # within one point set the rows are spread: the set's mean is far closer to 0 than iid's 1/sqrt(16)
    means = torch.stack([sobol_normal(16, (6,), torch.Generator().manual_seed(s)).double().mean(0)
                         for s in range(200)])
    assert float(means.pow(2).mean()) < (1 / 16) / 4


def test_state_round_trip_continues_the_lattice():
    g = torch.Generator().manual_seed(3)
    a = UpstreamSampler(2, "lattice", generator=g)
    a.draw(5)
    b = UpstreamSampler(2, "lattice", generator=torch.Generator().manual_seed(99))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.draw(3), b.draw(3))
    assert abs(float(kronecker_alpha(1)[0]) - (math.sqrt(5) - 1) / 2) < 1e-12


@pytest.mark.parametrize("call, name", [
    (lambda: UpstreamSampler(0), "dim"),
    (lambda: UpstreamSampler(1, "sobol"), "mode"),
    (lambda: UpstreamSampler(1, "lattice", generator=None), "generator"),
    (lambda: UpstreamSampler(1, "strata").draw(2), "generator"),
    (lambda: UpstreamSampler(1, "strata").draw(0, torch.Generator()), "R"),
    (lambda: balanced_labels(torch.tensor([0.5, 1.0]), 3), "u"),
    (lambda: balanced_labels(torch.tensor([0.5]), 0), "num_classes"),
    (lambda: sobol_normal(4, (0,), torch.Generator()), "shape"),
    (lambda: UpstreamSampler(1, "strata").load_state_dict(UpstreamSampler(2, "strata").state_dict()), "state"),
])
def test_bad_input_is_named(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def test_distill_config_names_a_bad_upstream_choice():
    from carv.apps.distill import DistillConfig

    with pytest.raises(ValueError, match="upstream"):
        DistillConfig(upstream="lattice").validate()
    DistillConfig(upstream="strata").validate()
