"""Accounting formulas against brute force; variance components unbiased; cost meter; auto-K."""

import math

import pytest
import torch

from carv.accounting import (
    AutoK,
    CostMeter,
    ecm,
    efficiency_bound,
    fraction_of_bound,
    optimal_k,
    predicted_variance,
    relative_efficiency,
    variance_components,
    work_normalised_variance,
)

Z = 4.0


def test_variance_components_unbiased_on_known_hierarchy():
    """y_rk = b_r + w_rk with tr Cov(b) = D*sb2 and tr Cov(w) = D*sw2; average estimates over 2000 batches."""
    g = torch.Generator().manual_seed(0)
    R, K, D, sb2, sw2, n = 6, 5, 3, 0.7, 2.5, 2000
    ests = torch.empty(n, 2, dtype=torch.float64)
    for i in range(n):
        y = math.sqrt(sb2) * torch.randn(R, 1, D, generator=g) + math.sqrt(sw2) * torch.randn(R, K, D, generator=g)
        c = variance_components(y)
        ests[i] = torch.tensor([c.between, c.within])
    mean, se = ests.mean(0), ests.std(0) / math.sqrt(n)
    assert abs(mean[1] - D * sw2) < Z * se[1]
    # 'between' is clipped at 0, which biases it up slightly; the clip is rare here (sb2 large vs sw2/K)
    assert abs(mean[0] - D * sb2) < Z * se[0]


def test_variance_components_predict_replicate_variance():
    g = torch.Generator().manual_seed(1)
    R, K = 4, 8
    b = torch.randn(5000, R, 1, generator=g) * 0.5
    y = b + torch.randn(5000, R, K, generator=g) * 2.0
    var_of_mean = float(y.mean((1, 2)).var())
    predicted = predicted_variance(0.25, 4.0, R, K)
    assert var_of_mean == pytest.approx(predicted, rel=Z * math.sqrt(2 / 5000))


@pytest.mark.parametrize("sb, sw, cu, cd", [(1.0, 1.0, 1.0, 1.0), (0.1, 5.0, 3.0, 0.2), (2.0, 0.3, 0.1, 1.0),
                                            (0.01, 9.0, 50.0, 0.01), (1.0, 0.0, 1.0, 1.0)])
def test_optimal_k_is_brute_force_argmin(sb, sw, cu, cd):
    k_max = 512
    ks = range(1, k_max + 1)
    brute = min(ks, key=lambda k: (work_normalised_variance(sb, sw, cu, cd, k), k))
    assert optimal_k(sb, sw, cu, cd, k_max=k_max) == brute


def test_optimal_k_respects_bounds_and_unbounded_case():
    assert optimal_k(1e-6, 10.0, 10.0, 0.01, k_max=16) == 16
    assert optimal_k(10.0, 1e-6, 0.01, 10.0, k_min=2, k_max=16) == 2
    assert optimal_k(0.0, 1.0, 1.0, 1.0, k_max=32) == 32
    with pytest.raises(ValueError, match="k_max"):
        optimal_k(0.0, 1.0, 1.0, 1.0)


def test_efficiency_bound_is_continuous_minimum():
    sb, sw, cu, cd = 0.3, 4.0, 2.0, 0.5
    grid = torch.logspace(-3, 4, 200001, dtype=torch.float64)
    brute = float(((sb + sw / grid) * (cu + grid * cd)).min())
    assert efficiency_bound(sb, sw, cu, cd) == pytest.approx(brute, rel=1e-8)
    # and no integer K beats it
    assert all(work_normalised_variance(sb, sw, cu, cd, k) >= efficiency_bound(sb, sw, cu, cd) for k in range(1, 100))


def test_ecm_re_fraction():
    assert ecm(4.0, 2.0, 1.0, 2.0) == pytest.approx(4.0)
    assert relative_efficiency(3.0, 1.5) == pytest.approx(2.0)
    assert fraction_of_bound(1.0, 2.0, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="var_method"):
        ecm(1.0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="cost_base"):
        ecm(1.0, -1.0, 1.0, 1.0)


def test_variance_components_bad_shapes():
    with pytest.raises(ValueError, match="R >= 2 and K >= 2"):
        variance_components(torch.randn(1, 4))
    with pytest.raises(ValueError, match="y"):
        variance_components(torch.randn(5))


def test_cost_meter_medians_and_counts():
    m = CostMeter()
    for s in (1.0, 3.0, 2.0, 100.0, 2.5):
        m.add("draw", s * 8, count=8)
    assert m.median("draw") == pytest.approx(2.5)
    with m.stage("upstream"):
        sum(range(1000))
    assert m.median("upstream") > 0
    assert m.counts["draw"] == 40
    with pytest.raises(KeyError, match="render"):
        m.median("render")
    m2 = CostMeter()
    m2.load_state_dict(m.state_dict())
    assert m2.summary() == m.summary()


def test_auto_k_picks_optimum_from_observations():
    m = CostMeter()
    for _ in range(5):
        m.add("upstream", 0.8)
        m.add("draw", 0.01)
    ak = AutoK(k_init=2, k_min=1, k_max=64, every=5, live_costs=True)
    for _ in range(20):
        ak.observe(0.5, 2.0)
        k = ak.step(m)
    assert k == optimal_k(0.5, 2.0, 0.8, 0.01, k_max=64)
    ak2 = AutoK()
    ak2.load_state_dict(ak.state_dict())
    assert ak2.k == ak.k


@pytest.mark.parametrize("kwargs, name", [(dict(k_init=0), "k_init"), (dict(k_init=100), "k_init"),
                                          (dict(decay=1.0), "decay"), (dict(every=0), "every")])
def test_auto_k_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AutoK(**kwargs)


def test_timed_estimate_charges_forward_plus_backward_to_upstream_and_the_objective_to_draws():
    from types import SimpleNamespace

    from carv.accounting import CostMeter, timed_estimate

    ticks = iter(range(100))  # a fake clock: each read advances one second
    theta = torch.ones(3, requires_grad=True)
    meter = CostMeter()
    x, out, secs = timed_estimate(lambda: theta.expand(2, 3) * 2.0,
                                  lambda x: SimpleNamespace(loss=(x * 3.0).sum()), K=4, meter=meter,
                                  clock=lambda: float(next(ticks)))
    assert x.shape == (2, 3) and torch.equal(theta.grad, torch.full((3,), 12.0))  # the backward ran once
    assert secs == {"upstream": 2.0, "draw": 1.0}  # reads 0,1 (upstream), 1,2 (objective), 2,3 (backward)
    assert meter.median("upstream") == 1.0 and meter.median("draw") == 1.0 / 8  # per sample, per draw
