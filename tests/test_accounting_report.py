"""What a run reports about its compute (carv.accounting.report), the allocator's calibrated costs (same seed,
same result) and the variance probe's iid draws (unbiased components under stratification)."""

import math

import pytest
import torch

from carv.accounting import (
    ACCOUNTING_KEYS,
    Allocator,
    ComponentProbe,
    CostMeter,
    accounting_sentence,
    accounting_summary,
    calibration_sentence,
    efficiency_bound,
    work_normalised_variance,
)
from carv.accounting.meter import calibrate_costs, quantise_ratio


def test_accounting_summary_bound_is_recomputed_from_its_own_fields():
    acc = accounting_summary(0.16, 0.84, 0.033, 0.010, R=1, K=4, proposal="learned")
    assert set(acc) == set(ACCOUNTING_KEYS)
    rho = acc["cost_upstream_s"] / acc["cost_draw_s"]
    s = acc["between"] / (acc["between"] + acc["within"])
    assert acc["cost_ratio"] == pytest.approx(rho)
    # DESIGN.md section 2: the bound against R = 2, K = 1
    assert acc["bound_ecm"] == pytest.approx((1 + rho) / (math.sqrt(s * rho) + math.sqrt(1 - s)) ** 2, rel=1e-12)
    assert acc["bound_ecm"] == pytest.approx(1.6, abs=0.1)  # the main job's physics: rho ~ 3.3, s ~ 0.16
    b, w, cu, cd = acc["between"], acc["within"], acc["cost_upstream_s"], acc["cost_draw_s"]
    assert acc["bound_ecm"] == pytest.approx(work_normalised_variance(b, w, cu, cd, 1) / efficiency_bound(b, w, cu, cd))
    assert acc["predicted_ecm"] == pytest.approx(work_normalised_variance(b, w, cu, cd, 1)
                                                 / work_normalised_variance(b, w, cu, cd, 4))
    assert acc["bound_fraction"] == pytest.approx(acc["predicted_ecm"] / acc["bound_ecm"])
    # no integer K beats the continuous bound, and K* gets the most of it
    fracs = {K: accounting_summary(b, w, cu, cd, 1, K)["bound_fraction"] for K in range(1, 30)}
    assert max(fracs.values()) <= 1.0 + 1e-12 and max(fracs, key=fracs.get) == acc["k_star"]
    assert fracs[1] == pytest.approx(1.0 / acc["bound_ecm"])  # the plain estimator's own share
    # overhead divides the prediction; missing components leave the derived keys None
    assert accounting_summary(b, w, cu, cd, 1, 4, overhead=0.25)["predicted_ecm"] == pytest.approx(
        acc["predicted_ecm"] / 1.25)
    none = accounting_summary(None, None, cu, cd, 2, 1)
    assert none["bound_ecm"] is None and none["cost_ratio"] == pytest.approx(rho)
    assert "unknown" in accounting_sentence(none)
    with pytest.raises(ValueError, match="K"):
        accounting_summary(b, w, cu, cd, 1, 0)
    with pytest.raises(ValueError, match="cost_draw_s"):
        accounting_summary(b, w, cu, float("nan"), 1, 2)


def test_accounting_summary_of_a_mix_is_the_mean_variance_times_the_mean_cost():
    """A mix (a share of steps at (R, K + 1)) is predicted as the run pays it: the steps' mean variance times their
    mean cost; the sentence names it; a bad mix is refused by name."""
    b, w, cu, cd = 1.0, 20.0, 1.0, 1.0
    acc = accounting_summary(b, w, cu, cd, 1, 2, mix=(1, 3, 0.75))
    assert acc["mix"] == {"R": 1, "K": 3, "share": 0.75}
    var = 0.25 * (b + w / 2) + 0.75 * (b + w / 3)
    cost = 0.25 * 3 + 0.75 * 4
    assert acc["predicted_ecm"] == pytest.approx(work_normalised_variance(b, w, cu, cd, 1) / (var * cost))
    # between the two pure pairs' predictions, and above (1, 2)'s here
    lo, hi = (accounting_summary(b, w, cu, cd, 1, k)["predicted_ecm"] for k in (2, 3))
    assert lo < acc["predicted_ecm"] < hi
    assert accounting_summary(b, w, cu, cd, 1, 2)["mix"] is None
    assert "(R = 1, K = 2; K = 3 on 75% of the steps, proposal" in accounting_sentence(acc)
    for bad in [(1, 3), (1, 0, 0.5), (1, 3, 1.5), (1, 3, "a")]:
        with pytest.raises(ValueError, match="mix"):
            accounting_summary(b, w, cu, cd, 1, 2, mix=bad)


def test_regime_row_of_a_mix_charges_the_mean_step():
    """A plan with a mix is scored as the run pays it: mean variance times mean cost of its steps."""
    from carv.bench.regime import mix_row, regime_row

    base = {"R": 2, "K": 1, "variance": 10.0, "variance_se": 0.5}
    lo = {"R": 1, "K": 2, "variance": 9.0, "variance_se": 0.3}
    hi = {"R": 1, "K": 3, "variance": 6.0, "variance_se": 0.4}
    row = regime_row(1.0, 1.0, base, mix_row(lo, hi, 0.25), (0.5, 15.0))
    var, cost = 0.75 * 9.0 + 0.25 * 6.0, 0.75 * 3 + 0.25 * 4
    assert row["headline_ecm"] == pytest.approx(10.0 * 4 / (var * cost))
    assert row["K"] == 2 and row["headline_se"] == pytest.approx(
        row["headline_ecm"] * math.hypot(0.05, math.hypot(0.75 * 0.3, 0.25 * 0.4) / var))
    assert mix_row(lo, None, 0.0) is lo
    with pytest.raises(ValueError, match="hi"):
        mix_row(lo, {**hi, "K": 4}, 0.25)
    with pytest.raises(ValueError, match="share"):
        mix_row(lo, hi, 1.5)


def test_accounting_sentence_says_the_bound_in_words():
    acc = accounting_summary(0.16, 0.84, 0.033, 0.010, R=1, K=4, proposal="learned")
    line = accounting_sentence(acc)
    assert line.startswith(f"this pipeline allows at most {acc['bound_ecm']:.2f}x over the plain estimator")
    assert f"gets {acc['predicted_ecm']:.2f}x ({acc['bound_fraction']:.2f} of the bound)" in line


def test_quantised_cost_ratios_absorb_timing_noise_and_scale():
    assert quantise_ratio(8.0) == 8.0 and quantise_ratio(0.0) == 0.0
    assert quantise_ratio(3.3) == pytest.approx(2 ** 1.5) and quantise_ratio(3.3, 4) == pytest.approx(2 ** 1.75)
    assert quantise_ratio(4.7) == 4.0 and quantise_ratio(4.8) == pytest.approx(2 ** 2.5)  # the cut: 2^2.25 = 4.76
    g = torch.Generator().manual_seed(0)
    # a ratio in the middle of its grid cell: +-3% noise and any common scale give the same calibration
    base = calibrate_costs(2 ** 1.5 * 0.004, 0.004)
    for scale in (1.0, 5.0, 0.2):
        for _ in range(50):
            j = 1 + 0.03 * (2 * torch.rand(2, generator=g, dtype=torch.float64) - 1)
            cal = calibrate_costs(2 ** 1.5 * 0.004 * scale * float(j[0]), 0.004 * scale * float(j[1]))
            assert cal["cost_ratio"] == base["cost_ratio"]
    with pytest.raises(ValueError, match="x"):
        quantise_ratio(-1.0)


def _allocator_run(scale, seed=0, steps=120, live=False, jitter=0.0, ratio=8.0, **pins):
    """A synthetic run (known components, costs ``ratio`` x 4 ms / 4 ms times ``scale``); returns every step's
    (R, K) and the allocator."""
    g = torch.Generator().manual_seed(seed)
    a = Allocator("baseline", r_init=2, k_init=1, every=10, probe_every=10, live_costs=live, **pins)
    meter, shapes = CostMeter(), []
    for _ in range(steps):
        probe = a.probe_due()
        R, K = a.probe_shape() if probe else (a.R, a.K)
        j = 1 + jitter * (2 * torch.rand(2, generator=g, dtype=torch.float64) - 1)
        meter.add("upstream", 0.004 * ratio * scale * float(j[0]) * R, count=R)
        meter.add("draw", 0.004 * scale * float(j[1]) * R * K, count=R * K)
        if probe:
            y = 0.4 * torch.randn(R, 1, 8, generator=g, dtype=torch.float64) + torch.randn(R, K, 8, generator=g,
                                                                                             dtype=torch.float64)
            pr = ComponentProbe(R, K)
            a.observe(*pr.components(*pr.cotangents(y, g), clip=False))
        a.step(meter)
        shapes.append((R, K))
    return shapes, a


def test_allocator_choices_depend_only_on_calibrated_cost_ratios():
    """Every stage slowed 5x (a loaded machine) and +-5% timing noise: the same seed makes the same choices, and a
    restored allocator keeps the calibration it recorded."""
    ref, a = _allocator_run(1.0)
    assert a.calibration is not None and a.calibration["cost_ratio"] == 8.0
    assert len({k for _, k in ref}) > 1  # the run did re-choose
    assert _allocator_run(5.0)[0] == ref
    assert _allocator_run(5.0, jitter=0.05)[0] == ref
    b = Allocator("baseline")
    b.load_state_dict(a.state_dict())
    assert b.calibration == a.calibration
    m = CostMeter()
    m.add("upstream", 1.0)
    m.add("draw", 1.0)  # other live costs: the restored calibration is what the choice reads
    assert b.costs(m) == (8.0, 1.0, a.calibration["probe_ratio"])
    assert _allocator_run(1.0, live=True)[1].calibration is None


def test_pinned_cost_ratios_make_the_same_choices_whatever_the_measured_costs():
    """Two machines whose measured render : draw ratios (4.6 and 5.0) fall either side of a cut of the grid
    (2^2.25 = 4.76) calibrate to neighbouring grid points and choose differently; with the ratios pinned they make
    the same choices, and the calibration says which ratios were pinned."""
    a_shapes, a = _allocator_run(1.0, ratio=4.6)
    b_shapes, b = _allocator_run(1.0, ratio=5.0)
    assert (a.calibration["cost_ratio"], b.calibration["cost_ratio"]) == (4.0, pytest.approx(2 ** 2.5))
    assert a_shapes != b_shapes
    pins = {"cost_ratio": 5.0, "probe_ratio": 3.0}
    pa_shapes, pa = _allocator_run(1.0, ratio=4.6, **pins)
    pb_shapes, pb = _allocator_run(3.0, ratio=5.0, jitter=0.05, **pins)
    assert pa_shapes == pb_shapes
    for cal in (pa.calibration, pb.calibration):
        assert (cal["cost_ratio"], cal["probe_ratio"], cal["pinned"]) == (5.0, 3.0, ["cost_ratio", "probe_ratio"])
    assert calibration_sentence(pa.calibration).endswith("(pinned)")
    line = calibration_sentence(a.calibration)
    assert "measured 4.6" in line and "--cost-ratio 4 --probe-ratio" in line
    assert calibration_sentence(None) is None


@pytest.mark.parametrize("kw, match", [
    ({"cost_ratio": 0.0}, "cost_ratio: expected a positive number"),
    ({"cost_ratio": float("nan")}, "cost_ratio: expected a positive number"),
    ({"probe_ratio": -1.0}, "probe_ratio: expected a non-negative number"),
    ({"cost_ratio": True}, "cost_ratio: expected a positive number"),
    ({"cost_ratio": 4.0, "live_costs": True}, "cost_ratio: a pinned cost ratio and live_costs=True exclude"),
])
def test_pinned_cost_ratios_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        Allocator("baseline", **kw)


def test_probe_steps_draw_iid_and_read_the_known_components_under_strata():
    """Values ``m_r + A (u_rk - 1/2) + noise`` (D = 1 so the mean's drift over u is fully visible), the run stratified
    per upstream sample. The probe step draws iid u (``sampler.iid()``): over 600 probes the mean estimates equal
    the known ``sigma_b^2`` and iid ``sigma_w^2 = A^2 / 12 + s^2`` within 4 standard errors."""
    from carv.timesteps import TimestepSampler, stratified_uniform

    sampler = TimestepSampler(1000, stratify="per_upstream")
    R, K, A, s2, sb = 2, 4, 3.0, 0.2, 0.5
    g = torch.Generator().manual_seed(5)
    pr = ComponentProbe(R, K)
    bs, ws = [], []
    for _ in range(600):
        with sampler.iid():
            u = stratified_uniform(R, K, sampler.stratify, generator=g)
        m = math.sqrt(sb) * torch.randn(R, 1, 1, generator=g, dtype=torch.float64)
        y = m + A * (u - 0.5)[..., None] + math.sqrt(s2) * torch.randn(R, K, 1, generator=g, dtype=torch.float64)
        c = pr.components(*pr.cotangents(y, g), clip=False)
        bs.append(c.between)
        ws.append(c.within)
    assert sampler.stratify == "per_upstream"  # restored after the block
    wt, bt = torch.tensor(ws), torch.tensor(bs)
    w_iid = A ** 2 / 12 + s2
    assert abs(float(wt.mean()) - w_iid) < 4 * float(wt.std()) / math.sqrt(600)
    assert abs(float(bt.mean()) - sb) < 4 * float(bt.std()) / math.sqrt(600)


def test_beaten_by_headline_needs_a_margin_of_two_standard_errors():
    from carv.bench.text_to_3d import beaten_by

    assert beaten_by({"ecm": 1.6, "ecm_se": 0.1}, {"ecm": 1.0, "ecm_se": 0.1})
    assert not beaten_by({"ecm": 1.25, "ecm_se": 0.26}, {"ecm": 1.0, "ecm_se": 0.05})  # within the noise
    assert not beaten_by({"ecm": 1.0, "ecm_se": 0.0}, {"ecm": 1.2, "ecm_se": 0.0})


def test_regime_row_is_the_ecm_at_simulated_costs_and_never_beats_its_bound(tmp_path):
    import json

    from carv.bench.regime import REGIME_KEYS, regime_row, write_regime_sweep

    b, w, cd = 0.2, 1.0, 0.004
    base = {"R": 2, "K": 1, "variance": (b + w) / 2, "variance_se": 0.01}
    rows = []
    for ratio in (1.0, 3.3, 10.0, 30.0):
        fracs = []
        for K in range(1, 40):
            head = {"R": 1, "K": K, "variance": b + w / K, "variance_se": 0.01}
            r = regime_row(ratio, cd, base, head, (b, w))
            assert r["headline_ecm"] == pytest.approx((b + w) * (ratio + 1) / ((b + w / K) * (ratio + K)))
            fracs.append(r["bound_fraction"])
        assert max(fracs) <= 1 + 1e-12 and max(fracs) > 0.9  # the best integer K is close to the bound
        rows.append(r)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"headline": {"value": 1.2}, "other": 1}))
    data = write_regime_sweep(path, rows, {"command": "x"}, 3.3)
    assert data["other"] == 1 and set(REGIME_KEYS) <= set(data["regime_sweep"][0])
    assert data["headline"]["bound_fraction"] == pytest.approx(1.2 / rows[1]["bound_ecm"])
    assert data["headline_app_default"]["cost_ratio"] == 3.3 and "K_by_seed" not in data["headline_app_default"]
    rows[1]["per_seed"] = [{"R": 1, "K": 4}, {"R": 1, "K": 3}]
    data = write_regime_sweep(path, rows, {"command": "x"}, 3.3)
    assert (data["headline_app_default"]["K_by_seed"], data["headline_app_default"]["R_by_seed"]) == ([4, 3], [1, 1])
    # a sweep of another configuration than the app's headline (distillation's Accountant): the rows only
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"headline": {"value": 3.1}}))
    data = write_regime_sweep(other, rows, {"command": "x"}, 3.3, app_default=False)
    assert "headline_app_default" not in data and "bound_fraction" not in data["headline"]
    assert len(data["regime_sweep"]) == 4


def test_the_plain_estimator_stays_a_candidate_where_probing_costs_more_than_reuse_gains():
    a = Allocator("baseline", r_init=1, k_init=4, probe_every=10)
    for _ in range(3):
        a.observe(1.0, 4.0)
    # render as cheap as a draw and a probe worth 20 draws: charging it leaves too little for reuse to pay
    assert a.choose(1.0, 1.0, 20.0)[:2] == (2, 1)
    # a costly render and a cheap probe: one render with several draws wins, as before
    R, K, _ = a.choose(8.0, 1.0, 1.0)
    assert R == 1 and K > 2


def test_on_the_plain_pair_the_allocator_probes_at_its_longest_interval():
    a = Allocator("baseline", r_init=1, k_init=4, probe_every=10, every=10, warmup=1)
    m = CostMeter()
    m.add("upstream", 1.0)
    m.add("draw", 1.0)
    m.add("probe", 20.0)
    for _ in range(10):
        a.observe(1.0, 4.0)
        a.step(m)
    assert (a.R, a.K) == (2, 1) and a.interval == a.probe_every_max == 80


def test_variance_curve_fit_recovers_known_curves_and_its_bound_is_the_two_component_bound_without_strata():
    from carv.accounting import efficiency_bound
    from carv.bench.regime import curve_bound, fit_variance_curve

    # exact rows of a stratified curve are recovered, and so is a two-component one (w_t = 0)
    for curve in ((0.3, 1.0, 4.0), (0.2, 1.5, 0.0), (0.5, 0.0, 8.0)):
        rows = [{"R": R, "K": K, "variance": (curve[0] + curve[1] / K + curve[2] / K ** 3) / R}
                for R, K in ((1, 1), (1, 2), (2, 4), (1, 8), (1, 16))]
        assert fit_variance_curve(rows) == pytest.approx(curve, abs=1e-9)
    # without the K^-3 term and K* >= 1 the bound is the closed form; with it, never below the best integer K
    for b, w, cu, cd in ((0.2, 1.0, 3.3, 1.0), (0.05, 2.0, 30.0, 1.0), (1.0, 1.0, 1.0, 1.0)):
        assert curve_bound((b, w, 0.0), cu, cd) == pytest.approx(efficiency_bound(b, w, cu, cd), rel=1e-6)
    b, we, wt, cu, cd = 0.3, 0.1, 20.0, 2.0, 1.0
    best_int = min((b + we / k + wt / k ** 3) * (cu + k * cd) for k in range(1, 200))
    assert curve_bound((b, we, wt), cu, cd) <= best_int
    assert curve_bound((b, we, wt), cu, cd) > 0.9 * best_int
    # where K* < 1 one draw per render is the floor: the bound is the K = 1 value, not the closed form's
    assert curve_bound((10.0, 0.1, 0.0), 1.0, 1.0) == pytest.approx(10.1 * 2.0)
    with pytest.raises(ValueError, match="3 distinct K"):
        fit_variance_curve([{"R": 1, "K": 1, "variance": 1.0}, {"R": 1, "K": 2, "variance": 0.6}])


def test_half_contrast_reads_the_within_half_variance_and_the_strata_share():
    """iid probe draws of a value with a linear drift in the proposal's CDF position u plus noise: the same-half pairs
    read sigma_s^2(2) = D (s^2 + c^2 / 48) where the iid within is D (s^2 + c^2 / 12), so the share strata remove is
    the drift's c^2 / 12 over the within part (mean of 300 probes within 4 standard errors)."""
    g = torch.Generator().manual_seed(7)
    R, K, D, c, s = 16, 2, 8, 3.0, 0.5
    halves_est, within_est = [], []
    for _ in range(300):
        theta = torch.zeros(R, D, dtype=torch.float64, requires_grad=True)
        x = theta * 1.0  # the upstream: identity Jacobian
        u = torch.rand(R, K, generator=g, dtype=torch.float64)
        values = c * u[..., None] + s * torch.randn(R, K, D, generator=g, dtype=torch.float64)
        comps = ComponentProbe(R, K).measure_halves(x, [theta], values, u >= 0.5, g)
        halves_est.append(comps.within_half)
        within_est.append(comps.within)
    true_half, true_within = D * (s * s + c * c / 48), D * (s * s + c * c / 12)
    for est, truth in ((halves_est, true_half), (within_est, true_within)):
        m = sum(est) / len(est)
        se = (sum((e - m) ** 2 for e in est) / (len(est) - 1) / len(est)) ** 0.5
        assert abs(m - truth) < 4 * se, (m, truth, se)
    a = Allocator(budget="baseline", baseline=(8, 1))
    a.observe(0.0, true_within)
    a.observe_half(true_half, true_within)
    assert a.strata == 0.0  # one probe of it is not enough
    a.observe_half(true_half, true_within)
    assert a.strata == pytest.approx(1 - true_half / true_within)


def test_allocator_prices_strata_and_leaves_k_1_where_two_strata_pay():
    """A distillation-like state (sigma_w^2 / sigma_b^2 = 1.3, plain pair R = 8, K = 1, render : draw 1): the iid
    model keeps R = 8, K = 1; with probes that read half the within part removable by two strata (the within-half
    variance), the allocator moves to two or more draws per sample, the better pair by the strata model."""
    from carv.accounting.algebra import work_normalised_variance as wnv

    def plan(half):
        a = Allocator(budget="baseline", baseline=(8, 1), r_init=8, k_init=1, r_range=(1, 32), k_range=(1, 32))
        a.observe(3.15e5, 4.05e5)
        for _ in range(2 if half is not None else 0):
            a.observe_half(half, 4.05e5)
        return a, a.plan(1.0, 1.0, 0.0, interval=40, keep=False)

    _, iid = plan(None)
    assert iid[:2] == (8, 1)
    _, same = plan(4.05e5)  # halves no better than iid: the iid model's choice
    assert same[:2] == (8, 1)
    a, strat = plan(4.05e5 * 0.5)
    assert a.strata == pytest.approx(0.5) and strat[1] >= 2
    f = a.strata
    assert wnv(3.15e5, 4.05e5, 1.0, 1.0, strat[1], f) < wnv(3.15e5, 4.05e5, 1.0, 1.0, 1, f)


def test_two_level_strata_model_optimal_k_and_bound():
    """within_at: sigma_w^2 at K = 1, sigma_w^2 (1 - f) at every K >= 2; optimal_k is the brute-force argmin of
    Var * C over K in [k_min, k_max]; the bound lies below every integer K's Var * C, equals the minimum over real
    K of the iid curve on [1, 2] and the stratified one beyond, and tends to the iid bound as f goes to 0."""
    from carv.accounting.algebra import efficiency_bound, optimal_k, within_at
    from carv.accounting.algebra import work_normalised_variance as wnv

    assert within_at(4.0, 1, 0.25) == 4.0 and within_at(4.0, 2, 0.25) == within_at(4.0, 9, 0.25) == 3.0
    for bad in (1.5, -0.1, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="strata"):
            within_at(4.0, 2, bad)
        with pytest.raises(ValueError, match="strata"):
            efficiency_bound(1.0, 1.0, 1.0, 1.0, bad)
        with pytest.raises(ValueError, match="strata"):
            optimal_k(1.0, 1.0, 1.0, 1.0, k_max=8, strata=bad)
    for b, w, cu, cd in ((3.15e5, 4.05e5, 1.0, 1.0), (1.0, 10.0, 5.0, 1.0), (2.0, 0.1, 1.0, 3.0),
                         (0.5, 50.0, 30.0, 1.0), (0.0, 1.0, 1.0, 1.0)):
        for f in (0.0, 0.1, 0.5, 0.9, 1.0):
            for k_min, k_max in ((1, 64), (2, 64), (1, 1), (3, 5)):
                if b == 0 and f < 1:
                    continue  # unbounded K: optimal_k returns k_max, checked in test_accounting
                want = min(range(k_min, k_max + 1), key=lambda k: (wnv(b, w, cu, cd, k, f), k))
                got = optimal_k(b, w, cu, cd, k_max=k_max, k_min=k_min, strata=f)
                assert wnv(b, w, cu, cd, got, f) == pytest.approx(wnv(b, w, cu, cd, want, f), rel=1e-12)
            bound = efficiency_bound(b, w, cu, cd, f)
            assert all(bound <= wnv(b, w, cu, cd, k, f) * (1 + 1e-12) for k in range(1, 200))
            # and tight: the iid curve's minimum over real K in [1, 2], the stratified one's over K >= 2
            fine = min(min((b + w / k) * (cu + k * cd) for k in (1 + i / 1000 for i in range(1001))),
                       min((b + w * (1 - f) / k) * (cu + k * cd) for k in (2 * 1.001 ** i for i in range(20000))))
            if f > 0:  # (at f = 0 the iid closed form, over every real K > 0)
                assert bound == pytest.approx(fine, rel=1e-4)
        if b > 0 and w * cu >= b * cd:  # the iid optimum at K >= 1: continuous as the share goes to 0
            assert efficiency_bound(b, w, cu, cd, 1e-9) == pytest.approx(efficiency_bound(b, w, cu, cd), rel=1e-6)
    # two strata that remove half the within part lift the bound of a distillation-like state at ratio 1, to
    # what K = 2 reaches there
    assert efficiency_bound(3.15e5, 4.05e5, 1.0, 1.0, 0.5) < efficiency_bound(3.15e5, 4.05e5, 1.0, 1.0)
    assert efficiency_bound(3.15e5, 4.05e5, 1.0, 1.0, 0.5) == pytest.approx(wnv(3.15e5, 4.05e5, 1.0, 1.0, 2, 0.5))


def test_strata_share_pairs_each_probe_and_keeps_a_long_window():
    """The share is 1 - (winsorised mean of within-half) / (winsorised mean of the same probes' within), over the
    last strata_window probes (4 x window by default); a probe with an extreme row in both readings moves both;
    the readings survive the state dict and a malformed state is refused by name."""
    a = Allocator(budget="baseline", baseline=(8, 1), window=3)
    assert a.strata_window == 12
    for i in range(20):
        a.observe(1.0, 10.0 + i)
        a.observe_half(5.0 + i / 2, 10.0 + i)
    assert len(a.halves) == 12 and a.halves[0] == (5.0 + 8 / 2, 18.0)
    h = sum(5.0 + i / 2 for i in range(8, 20)) / 12
    w = sum(10.0 + i for i in range(8, 20)) / 12
    assert a.strata == pytest.approx(1 - h / w)
    b = Allocator(budget="baseline", baseline=(8, 1), window=3)
    a.priced_strata = 0.25  # as a re-choice that left K = 1 on the share sets it
    b.load_state_dict(a.state_dict())
    assert b.halves == a.halves and b.strata == a.strata and b.priced_strata == 0.25
    for halves in ([1.0, 2.0], [[-5.0, 1.0]], [[float("nan"), 1.0]], [["x", 1.0]], [[1.0, float("inf")]]):
        bad = a.state_dict()
        bad["halves"] = halves
        with pytest.raises(ValueError, match="halves"):
            b.load_state_dict(bad)
    for priced in (-0.1, 2.0, "0.5", True):
        bad = a.state_dict()
        bad["priced_strata"] = priced
        with pytest.raises(ValueError, match="priced_strata"):
            b.load_state_dict(bad)
    old = a.state_dict()
    del old["halves"]  # a state saved before the strata probe: the iid model until probes read it
    b.load_state_dict(old)
    assert b.halves == [] and b.strata == 0.0
    with pytest.raises(ValueError, match="strata_window"):
        Allocator(strata_window=1)
    c = Allocator(budget="baseline", baseline=(8, 1))
    c.observe_half(12.0, 10.0)
    c.observe_half(12.0, 10.0)
    assert c.strata == 0.0  # halves read above the within part: no strata credit, never a negative one


def test_accounting_summary_prices_strata_consistently():
    """With a strata share the summary's bound is bound_ecm recomputed from its own keys (strata included), the
    prediction is the hand-computed ECM of the pair at sigma_w^2 (1 - strata) per draw, K = 1 pays the iid
    within part, and a share outside [0, 1] is refused by name."""
    from carv.accounting import bound_ecm

    b, w, cu, cd, f = 3.0, 4.0, 2.0, 1.0, 0.5
    acc = accounting_summary(b, w, cu, cd, 2, 3, "uniform", strata=f)
    assert acc["strata"] == f
    assert acc["bound_ecm"] == pytest.approx(bound_ecm(acc["between"], acc["within"], acc["cost_upstream_s"],
                                                       acc["cost_draw_s"], acc["strata"]))
    plain = (b + w) * (cu + cd)
    assert acc["predicted_ecm"] == pytest.approx(plain / ((b + w * (1 - f) / 3) * (cu + 3 * cd)))
    one = accounting_summary(b, w, cu, cd, 2, 1, "uniform", strata=f)
    assert one["predicted_ecm"] == pytest.approx(1.0)  # one draw: no strata, the plain estimator's Var * C
    assert acc["bound_ecm"] > accounting_summary(b, w, cu, cd, 2, 3, "uniform")["bound_ecm"]
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="strata"):
            accounting_summary(b, w, cu, cd, 2, 3, "uniform", strata=bad)


def test_strata_only_decide_whether_to_leave_one_draw():
    """Where the iid model already chooses K >= 2 the strata share does not move the choice (the iid model picks
    K); where it keeps K = 1 and two strata pay, the plan leaves K = 1 and says it priced strata; the budget=None
    path (optimal_k) follows the same rule."""
    def alloc(budget, b, w, f):
        a = Allocator(budget=budget, baseline=(8, 1), r_init=8, k_init=1, r_range=(1, 32), k_range=(1, 32))
        a.observe(b, w)
        for _ in range(2):
            a.observe_half(w * (1 - f), w)
        return a

    for budget in ("baseline", None):
        iid = alloc(budget, 1.0, 20.0, 0.0).plan(10.0, 1.0, 0.0, interval=40, keep=False)
        plan, priced = alloc(budget, 1.0, 20.0, 0.6)._plan_and_share(10.0, 1.0, 0.0, 40, False)
        assert iid[1] >= 3 and plan[:2] == iid[:2] and priced == 0.0
        assert alloc(budget, 3.15e5, 4.05e5, 0.0).plan(1.0, 1.0, 0.0, interval=40, keep=False)[1] == 1
        a = alloc(budget, 3.15e5, 4.05e5, 0.5)
        plan, priced = a._plan_and_share(1.0, 1.0, 0.0, 40, False)
        assert plan[1] >= 2 and priced == 0.5 and a.plan(1.0, 1.0, 0.0, interval=40, keep=False) == plan
        assert a.priced_strata == 0.0  # planning alone moves nothing: the pair in use is priced at a re-choice
