import math

import pytest
import torch

from carv import HierarchicalEstimator, TimestepSampler
from carv.estimator import reduce_draws
from carv.noise import draw_noise

Z = 4.0


def test_reduce_draws_matches_manual_computation():
    g = torch.Generator().manual_seed(0)
    v, w = torch.randn(4, 3, 5, generator=g), torch.rand(4, 3, generator=g)
    est = reduce_draws(v, w, keep_draws=True)
    assert torch.allclose(est.per_upstream, (v * w[..., None]).mean(1))
    assert torch.allclose(est.sq_norms, v.pow(2).sum(-1))
    y = (v * w[..., None]).double()
    within = y.var(1).sum(-1).mean()
    between = max(float(y.mean(1).var(0).sum() - within / 3), 0.0)
    assert est.within == pytest.approx(float(within)) and est.between == pytest.approx(between)
    assert est.variance == pytest.approx(between / 4 + float(within) / 12)


def test_reduce_draws_shape_error_names_values():
    with pytest.raises(ValueError, match="values"):
        reduce_draws(torch.zeros(4, 3), torch.zeros(4, 2))


def test_noise_layouts():
    e = draw_noise(3, 4, (2,), "antithetic", 0)
    assert torch.equal(e[:, 1::2], -e[:, ::2])
    c = draw_noise(3, 4, (2,), "crn", 0)
    assert torch.equal(c[0], c[2])
    i = draw_noise(3, 4, (2,), "iid", 0)
    assert not torch.equal(i[0], i[1])
    with pytest.raises(ValueError, match="K: antithetic"):
        draw_noise(3, 3, (2,), "antithetic", 0)


def test_antithetic_noise_has_unit_variance_marginals():
    e = draw_noise(2000, 4, (3,), "antithetic", 1)
    se = math.sqrt(2 / e.numel() * 2)  # pairs are dependent: effective n is halved
    assert abs(float(e.pow(2).mean()) - 1.0) < Z * se


def test_estimator_draw_crn_shares_timesteps_across_rows_and_k_setter_validates():
    est = HierarchicalEstimator(TimestepSampler(100, stratify="per_upstream"), K=4, noise="crn")
    d = est.draw(5, (2,), 0)
    assert torch.equal(d.t[0], d.t[4]) and torch.equal(d.eps[1], d.eps[3])
    with pytest.raises(ValueError, match="K"):
        est.K = 0
    with pytest.raises(TypeError, match="sampler"):
        HierarchicalEstimator("uniform")
