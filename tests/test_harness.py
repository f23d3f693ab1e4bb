"""The benchmark protocol (carv.bench.harness): pooled stage-cost model, reference-variance subtraction,
replicate counts for a stated relative error, bootstrap error bars, headline vs best-of-N."""

import math

import pytest
import torch

from carv.bench.harness import (
    Config,
    RelativeError,
    best_of_n,
    headline,
    measure,
    pooled_figures,
    reference_mean,
    replicates_for_rel_error,
)

C_UP, C_DRAW, OTHER = 0.010, 0.002, 0.001  # synthetic seconds per upstream sample / per draw / per estimate


class FakeClock:
    """A clock the synthetic workload advances: known stage costs, no dependence on the machine."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def synthetic_workload(clock: FakeClock, slow_method: str | None = None, slow_factor: float = 5.0,
                       slow_share: float = 0.6, cost_noise: float = 0.1):
    def estimate(c, g, meter):
        jitter = torch.exp(cost_noise * torch.randn(3, generator=g)).tolist()
        slow = slow_factor if c.method == slow_method and float(torch.rand(1, generator=g)) < slow_share else 1.0
        with meter.stage("upstream", c.R):
            clock.t += c.R * C_UP * jitter[0] * slow
        with meter.stage("draw", c.R * c.K):
            clock.t += c.R * c.K * C_DRAW * jitter[1] * slow
        clock.t += OTHER * jitter[2] * slow
        return (torch.randn(c.R, 4, generator=g) + 2 * torch.randn(c.R, c.K, 4, generator=g).mean(1)).mean(0)

    return estimate


def test_pooled_cost_model_recovers_known_stage_costs_despite_a_slow_configuration():
    """Stage medians pooled over every configuration give each configuration's cost R (c_up + K c_draw) +
    other, even when one configuration's own wall-clock is inflated 5x on 60% of its replicates (the
    load spikes of a shared machine): its per-configuration median is then useless, the pooled model is not.
    Configurations doing the same work (uniform and "other" at K = 8) are pooled; the slow configuration's
    spiked replicates are 30% of that pool, which moves a median of log-normal(0.1) costs by at most
    0.1 * z(0.5 / 0.7) = 5.7%: tolerance 8% there, 4% elsewhere (the median of 240 draws has a standard
    error of 0.8%). The marginal costs per unit (c_up, c_draw) are the slopes over the amounts of work."""
    clock = FakeClock()
    cfgs = [Config("uniform", 2, 1), Config("uniform", 2, 8), Config("importance", 2, 1), Config("other", 2, 8)]
    rows = measure(cfgs, synthetic_workload(clock, slow_method="other"), torch.zeros(4), 120, progress=False,
                   clock=clock, keep_replicates=True)
    summary = pooled_figures(rows, baseline=("uniform", 2, 1), bootstrap=50)
    assert summary["c_upstream_s"] == pytest.approx(C_UP, rel=0.04)  # one amount of work (R = 2): seconds / 2
    assert summary["c_draw_s"] == pytest.approx(C_DRAW, rel=0.08)
    assert summary["other_s"] == pytest.approx(OTHER, rel=0.1)
    for r in rows:
        truth = r["R"] * (C_UP + r["K"] * C_DRAW) + OTHER
        assert r["cost_s"] == pytest.approx(truth, rel=0.08 if r["K"] == 8 else 0.04), r
        assert "replicates" not in r  # consumed
        if r["method"] == "other":
            assert r["cost_wall_s"] > 2.5 * truth  # the per-configuration check shows the spikes
            assert r["cost_check"] > 2.5


def test_charges_are_added_to_the_cost_and_listed():
    clock = FakeClock()
    cfgs = [Config("uniform", 2, 1), Config("learned", 2, 4)]
    rows = measure(cfgs, synthetic_workload(clock, cost_noise=0.0), torch.zeros(4), 10, progress=False, clock=clock,
                   keep_replicates=True)
    pooled_figures(rows, charges={"learned": {"pilot": 0.005, "proposal_updates": 0.001}}, bootstrap=0)
    r = next(r for r in rows if r["method"] == "learned")
    assert r["charged"] == {"pilot": 0.005, "proposal_updates": 0.001}
    assert r["cost_s"] == pytest.approx(2 * (C_UP + 4 * C_DRAW) + OTHER + 0.006, rel=1e-9)
    assert r["cost_s"] - r["cost_stages_s"] == pytest.approx(0.006, rel=1e-9)
    with pytest.raises(ValueError, match="charges"):
        pooled_figures([dict(rr, replicates={"err2": [1.0, 1.0], "time_s": [1.0, 1.0], "stages": [{}, {}]})
                        for rr in rows], charges={"learned": {"pilot": -1.0}})


def test_reference_variance_is_subtracted_known_answer():
    """g ~ N(0, I_d), d = 2000, reference = mean of 2 estimates: E||g - ref||^2 = d (1 + 1/2) = 3000, and
    the reference's own variance (estimated from its 2 estimates) is d / 2 = 1000, so the variance after
    subtraction is Var(g) = 2000. Its error: the reference's realisation (sd sqrt(2 d) / 2 = 32) and the
    estimate of its variance (sd 32, independent for Gaussians) and the replicates' mean (sd 6.3 for 200
    replicates): about 45 in all; tolerance 4 sigma = 180, while the unsubtracted 3000 is 22 sigma away."""
    d = 2000

    def estimate(c, g, meter):
        return torch.randn(d, generator=g, dtype=torch.float64)

    ref, ref_var = reference_mean(estimate, Config("ref", 1, 1), 2, seed=5, progress=False)
    assert ref_var == pytest.approx(d / 2, abs=4 * 32)
    rows = measure([Config("m", 1, 1)], estimate, ref, 200, progress=False, reference_variance=ref_var)
    r = rows[0]
    assert r["variance"] == pytest.approx(d, abs=180)
    assert r["err2_mean"] == pytest.approx(1.5 * d, abs=180)
    assert r["err2_mean"] - r["variance"] == pytest.approx(ref_var)
    assert r["var_replicates"] == pytest.approx(d, abs=4 * math.sqrt(2 * d / 199) * d ** 0.5)
    with pytest.raises(ValueError, match="reference_variance"):
        measure([Config("m", 1, 1)], estimate, ref, 2, progress=False, reference_variance=-1.0)


def test_replicate_counts_follow_the_stated_relative_error(tmp_path):
    """RelativeError(rule="fixed") fixes each configuration's count from its first n_min squared errors:
    ceil((CV / target)^2), the baseline at target / sqrt(baseline_factor); a resumed run keeps the counts."""
    def estimate(c, g, meter):
        return torch.randn(c.K, generator=g, dtype=torch.float64)  # err2 ~ chi2_K: CV = sqrt(2 / K)

    cfgs = [Config("base", 1, 2), Config("m", 1, 8)]
    spec = RelativeError(target=0.15, n_min=12, n_max=300, baseline="base|R=1|K=2", baseline_factor=4.0,
                         rule="fixed")

    def est_any(c, g, meter):
        return torch.cat([estimate(c, g, meter), torch.zeros(8 - c.K, dtype=torch.float64)])

    rows = measure(cfgs, est_any, torch.zeros(8), spec, progress=False, keep_replicates=True,
                   state_dir=tmp_path / "s")
    by = {r["method"]: r for r in rows}
    for m, target in (("base", 0.075), ("m", 0.15)):
        first = by[m]["replicates"]["err2"][:12]
        assert by[m]["n"] == replicates_for_rel_error(first, target, 12, 300)
        assert by[m]["rel_error"] == pytest.approx(target)
    # chi2_2 has CV 1 and the baseline a 2x tighter target: about 16x the replicates of chi2_8 (CV 0.5)
    assert by["base"]["n"] > 4 * by["m"]["n"]
    again = measure(cfgs, est_any, torch.zeros(8), spec, progress=False, state_dir=tmp_path / "s")
    assert [r["n"] for r in again] == [r["n"] for r in rows]
    with pytest.raises(ValueError, match="rule"):
        RelativeError(rule="adaptive")
    with pytest.raises(ValueError, match="target"):
        RelativeError(target=1.5)
    with pytest.raises(ValueError, match="err2"):
        replicates_for_rel_error([1.0], 0.1)


def test_bootstrap_error_bars_include_cost_noise():
    """With the same variance draws, noisier stage costs give a wider ECM error bar (the bootstrap recomputes
    the pooled stage medians per resample); without cost noise the bar reflects the variance alone."""
    ses = {}
    for noise in (0.0, 0.8):
        clock = FakeClock()
        cfgs = [Config("uniform", 2, 1), Config("uniform", 2, 8)]
        rows = measure(cfgs, synthetic_workload(clock, cost_noise=noise), torch.zeros(4), 30, progress=False,
                       clock=clock, keep_replicates=True)
        pooled_figures(rows, bootstrap=300, seed=1)
        r = rows[1]
        assert r["ecm_ci"][0] <= r["ecm"] <= r["ecm_ci"][1]
        ses[noise] = r["ecm_se"] / r["ecm"]
    assert ses[0.8] > ses[0.0]


def test_headline_and_best_of_n_are_different_objects():
    rows = [{"method": "a", "R": 2, "K": k, "ecm": e, "ecm_se": 0.1, "charged": {"pilot": 0.1}}
            for k, e in ((1, 1.0), (4, 2.0), (8, 2.4))]
    h = headline(rows, {"method": "a", "R": 2, "K": 4}, chosen_by="accountant's K from the pilot")
    assert h["config"] == {"method": "a", "R": 2, "K": 4} and h["value"] == 2.0 and h["se"] == 0.1
    assert h["chosen_by"] == "accountant's K from the pilot" and "pilot" in h["charged"]
    b = best_of_n(rows)
    assert b["n"] == 3 and b["value"] == 2.4 and b["config"]["K"] == 8 and "upper bound" in b["note"]
    with pytest.raises(ValueError, match="config"):
        headline(rows, {"method": "a", "R": 2, "K": 16}, chosen_by="x")


def _lognormal_err2(sigma):
    """A 1-value estimate whose squared error against 0 is lognormal(0, sigma): heavy-tailed like the
    squared error of a K = 1 estimate (CV sqrt(exp(sigma^2) - 1) = 1.31 at sigma = 1)."""
    def estimate(c, g, meter):
        return (0.5 * sigma * torch.randn(1, generator=g, dtype=torch.float64)).exp()
    return estimate


def test_sequential_rule_reaches_the_stated_relative_error_on_heavy_tails(tmp_path):
    """250 independent heavy-tailed rows (lognormal squared errors, CV 1.31), target 10%: the rows' variance
    (mean squared error) must be within 10% of the true mean in the RMS over rows. The fixed rule (count from
    the first 8 values, whose CV is biased low) misses it: RMS relative error about 0.15 (simulated); the
    sequential rule about 0.10. The RMS over 250 rows has a standard error of about 4.5% of itself, so the
    bounds 0.118 and 0.125 are more than 3 standard errors from either expected value."""
    sigma, target = 1.0, 0.1
    mu = math.exp(sigma**2 / 2)
    cfgs = [Config(f"row{i}", 1, 1) for i in range(250)]
    rms = {}
    for rule in ("fixed", "sequential"):
        spec = RelativeError(target=target, n_min=8, n_max=3000, rule=rule)
        rows = measure(cfgs, _lognormal_err2(sigma), torch.zeros(1), spec, seed=3, progress=False)
        rel = torch.tensor([r["variance"] / mu - 1 for r in rows])
        rms[rule] = float(rel.pow(2).mean().sqrt())
    # a run stopped part-way (time budget) and resumed makes the same decisions as one uninterrupted run
    spec = RelativeError(target=target, n_min=8, n_max=3000)
    few = cfgs[:6]
    whole = measure(few, _lognormal_err2(sigma), torch.zeros(1), spec, seed=3, progress=False)
    measure(few, _lognormal_err2(sigma), torch.zeros(1), spec, seed=3, progress=False, state_dir=tmp_path / "s",
            time_budget_s=0.0)
    resumed = measure(few, _lognormal_err2(sigma), torch.zeros(1), spec, seed=3, progress=False,
                      state_dir=tmp_path / "s")
    assert [r["n"] for r in resumed] == [r["n"] for r in whole]
    assert [r["variance"] for r in resumed] == pytest.approx([r["variance"] for r in whole], rel=1e-12)
    assert rms["sequential"] < 1.18 * target, rms
    assert rms["fixed"] > 1.25 * target, rms


def test_settings_from_json_names_unknown_and_mistyped_fields(tmp_path):
    from dataclasses import dataclass

    from carv.bench.harness import settings_from_json

    @dataclass
    class S:
        n: int = 3
        ks: tuple[int, ...] = (1, 2)
        seed: int = 0

    p = tmp_path / "s.json"
    p.write_text('{"n": 5, "ks": [4, 8]}')
    assert settings_from_json(S, p, seed=7) == S(n=5, ks=(4, 8), seed=7)
    p.write_text('{"m": 5}')
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['m'\]"):
        settings_from_json(S, p)
    p.write_text('{"n": "5"}')
    with pytest.raises(ValueError, match="n: expected int"):
        settings_from_json(S, p)
    with pytest.raises(ValueError, match="no such file"):
        settings_from_json(S, tmp_path / "missing.json")
