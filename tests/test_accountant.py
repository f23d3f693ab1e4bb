"""carv.Accountant: one object for the per-step loop (stage timing, probes when due, the next (R, K))."""

import math

import pytest
import torch

from carv import Accountant, ScoreDistillation, TimestepSampler, VPSchedule
from carv.accounting import ComponentProbe, optimal_k
from carv.accounting.meter import quantise_ratio
from carv.teachers import GaussianMixtureTeacher

T = 1000
SCHED = VPSchedule.from_betas(1e-4, 0.02, T)
TEACHER = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.5], [1.0, 1.0], [0.0, -1.5]]), 0.25, None, SCHED)


class FakeClock:
    """Seconds advance only when the test says so, so stage costs are exact."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Charged:
    """The objective, charging the fake clock ``per_draw`` seconds per teacher draw."""

    def __init__(self, sds, clock, per_draw=0.002):
        self.sds, self.clock, self.per_draw = sds, clock, per_draw

    @property
    def K(self):
        return self.sds.K

    @K.setter
    def K(self, K):
        self.sds.K = K

    @property
    def sampler(self):
        return self.sds.sampler

    def __call__(self, x, *args, **kwargs):
        self.clock.t += self.per_draw * x.shape[0] * self.sds.K
        self.modes = getattr(self, "modes", []) + [self.sds.sampler.stratify]
        return self.sds(x, *args, **kwargs)


def make(K=4, per_draw=0.002, **kw):
    theta = torch.randn(2, generator=torch.Generator().manual_seed(0)).requires_grad_()
    sds = ScoreDistillation(TEACHER, TimestepSampler(T, stratify="per_upstream"), K=K)
    clock = FakeClock()
    acc = Accountant(Charged(sds, clock, per_draw), params=[theta], clock=clock,
                     generator=torch.Generator().manual_seed(1), **kw)
    return theta, sds, clock, acc


def run_step(acc, theta, clock, g, up_s=0.03):
    with acc.step() as st:
        R = acc.R
        clock.t += up_s / 2 * R  # the "render"
        x = theta[None] * 1.5 + 0.5 * torch.randn(R, 2, generator=g)
        out = st.objective(x, None, g)
        st.backward(out, x)
        clock.t += up_s / 2 * R  # "backward + optimiser"
    return st


def test_stage_costs_probe_and_the_chosen_k():
    theta, sds, clock, acc = make(K=4, budget=None, probe_every=2, choose_every=4, k_range=(2, 32))
    g = torch.Generator().manual_seed(2)
    comps = []
    for _ in range(8):
        st = run_step(acc, theta, clock, g)
        if st.components is not None:
            comps.append(st.components)
    # costs: everything outside the objective is upstream (per render), the objective is the draw stage (per draw)
    assert acc.meter.median("upstream") == pytest.approx(0.03)
    assert acc.meter.median("draw") == pytest.approx(0.002)
    assert acc.probes == 4 and len(comps) == 4 and all(c[1] > 0 for c in comps)
    # the allocator saw every probe; its re-choice after step 8 (4 observations >= warm-up 3) is optimal_k of the
    # medians and the stage medians, and it is what the objective now uses
    a = acc.allocator
    assert a.n_observed == 4 and acc.history[-1]["rechosen"] and not acc.history[3]["rechosen"]
    c_up, c_draw, _ = a.costs(acc.meter)  # the calibrated, quantised ratio (16 here for 0.03 / 0.002)
    want = optimal_k(a.between, a.within, c_up, c_draw, k_max=32, k_min=2)
    assert acc.history[-1]["next_K"] == want == sds.K and acc.history[-1]["next_R"] == 2 == acc.R


def test_probe_components_are_the_component_probe_of_the_step():
    """The Accountant's probe is ComponentProbe on the step's own draws (same cotangents, same VJPs)."""
    theta, sds, clock, acc = make(K=4, budget=None, probe_every=1)
    g = torch.Generator().manual_seed(5)
    noise = 0.5 * torch.randn(2, 2, generator=g)
    with acc.step() as st:
        x = theta[None] * 1.5 + noise
        out = st.objective(x, None, g)
        draws = out.estimate.draws.clone()
        st.backward(out, x)
    pr = ComponentProbe(2, 4)
    u, h = pr.cotangents(draws, torch.Generator().manual_seed(1))
    x2 = theta[None] * 1.5 + noise
    ju = torch.autograd.grad(x2, [theta], u, retain_graph=True)
    jh = torch.autograd.grad(x2, [theta], h)
    assert st.components[:2] == pytest.approx(tuple(pr.components(ju, jh, clip=False)))  # signed, for the allocator
    assert theta.grad is not None  # the step's own backward ran too


def test_budget_mode_lets_the_allocator_set_r_and_k_at_equal_per_step_compute():
    theta, sds, clock, acc = make(K=4, per_draw=0.001, budget="baseline", probe_every=2, choose_every=2,
                                  r_range=(1, 8), k_range=(1, 64), warmup=1)
    g = torch.Generator().manual_seed(3)
    shapes = []
    for _ in range(6):
        shapes.append(acc.shape)
        st = run_step(acc, theta, clock, g, up_s=0.05)
        assert (st.R, st.K) == shapes[-1]  # the step ran at the (R, K) the accountant announced
    a = acc.allocator
    c_up, c_draw = acc.meter.median("upstream"), acc.meter.median("draw")
    assert (c_up, c_draw) == (pytest.approx(0.05), pytest.approx(0.001))
    last = a.history[-1]
    R, K = last["R"], last["K"]
    # the allocator read the accountant's meter, as a calibrated ratio in units of the draw cost
    assert (last["cost_upstream"], last["cost_draw"]) == (quantise_ratio(c_up / c_draw), 1.0)
    # the coming step runs the chosen pair, or its mix's pair (R, K + 1) on the mix's share of the steps
    assert (a.R, a.K) == (acc.history[-1]["next_R"], sds.K) and a.base == (R, K)
    assert (a.R, a.K) == (R, K) or (a.mix is not None and (a.R, a.K) == a.mix[:2] == (R, K + 1))
    assert R == 1 and K > 4  # render-dominated cost at the plain step's budget: one render, many draws
    for i in (2, 4):  # probe steps run at the allocator's probe shape of the pair then chosen, e.g. (1, 8) -> (2, 4)
        R0, K0 = acc.history[i - 1]["next_R"], acc.history[i - 1]["next_K"]
        assert shapes[i] == (max(R0, 2), max(2, round(R0 * K0 / max(R0, 2))))
    assert shapes[5] == (acc.history[4]["next_R"], acc.history[4]["next_K"])  # an ordinary step at the choice


def test_r1_probe_steps_ask_for_two_upstream_samples_and_bad_args():
    theta, sds, clock, acc = make(K=1, R=1, budget=None, probe_every=5, k_range=(1, 64))
    assert acc.R == 2 and acc.steps == 0  # step 0 is a probe step
    with acc.step() as st:
        assert sds.K == 2  # K >= 2 on a probe step
        x = theta[None].expand(acc.R, -1) * 1.0
        st.backward(st.objective(x, None, 0), x)
    assert acc.R == 1  # the next step is not a probe step
    with pytest.raises(ValueError, match="probe_every"):
        Accountant(sds, probe_every=0)
    with pytest.raises(ValueError, match="budget"):
        Accountant(sds, budget="lots")
    with pytest.raises(TypeError, match="objective"):
        Accountant(object())
    state = acc.state_dict()
    acc2 = Accountant(sds)
    acc2.load_state_dict(state)
    assert acc2.steps == 1 and acc2.meter.median("draw") == acc.meter.median("draw")


def test_component_probe_reads_the_within_stratum_variance_under_per_row_strata():
    """Values ``m_r + A (u_rk - 1/2) e + noise`` with ``u`` per-row stratified (carv's ``per_upstream``, columns in
    stratum order), Jacobian the identity. The row mean's variance given ``m_r`` is ``w_eff / K`` with
    ``w_eff = A^2 / (12 K^2) + s^2``, far below the iid ``A^2 / 12 + s^2``; over 400 probes the mean within
    estimate is ``w_eff`` and the between one ``sigma_b^2`` within 4 standard errors (a random split of the draws
    reads the iid value, about 20 SE away here)."""
    from carv.timesteps import stratified_uniform

    R, K, D, A, s2, sb = 4, 8, 6, 6.0, 0.2, 0.5
    g = torch.Generator().manual_seed(0)
    e = torch.zeros(D, dtype=torch.float64)
    e[0] = 1.0
    pr = ComponentProbe(R, K)
    bs, ws = [], []
    for _ in range(400):
        m = math.sqrt(sb / D) * torch.randn(R, 1, D, generator=g, dtype=torch.float64)
        u = stratified_uniform(R, K, "per_upstream", generator=g, dtype=torch.float64)
        y = m + A * (u - 0.5)[..., None] * e + math.sqrt(s2 / D) * torch.randn(R, K, D, generator=g,
                                                                               dtype=torch.float64)
        c = pr.components(*pr.cotangents(y, g), clip=False)
        bs.append(c.between)
        ws.append(c.within)
    w_eff, w_iid = A**2 / (12 * K**2) + s2, A**2 / 12 + s2
    wt, bt = torch.tensor(ws), torch.tensor(bs)
    w_se, b_se = float(wt.std() / 20), float(bt.std() / 20)
    assert abs(float(wt.mean()) - w_eff) < 4 * w_se, (float(wt.mean()), w_eff, w_se)
    assert abs(float(bt.mean()) - sb) < 4 * b_se, (float(bt.mean()), sb, b_se)
    assert (w_iid - w_eff) > 20 * w_se


def test_probe_steps_draw_iid_timesteps_and_ordinary_steps_keep_the_strata():
    theta, sds, clock, acc = make(K=4, budget=None, probe_every=3, choose_every=3, k_range=(2, 32))
    g = torch.Generator().manual_seed(4)
    probes = []
    for _ in range(7):
        probes.append(acc.probe_due)
        run_step(acc, theta, clock, g)
    assert acc.objective.modes == ["none" if p else "per_upstream" for p in probes] and any(probes)
    acc_sum = acc.summary(proposal="uniform")
    assert acc_sum["K"] == sds.K and acc_sum["bound_ecm"] is not None and acc_sum["proposal"] == "uniform"


@pytest.mark.parametrize("stratify, K, reads", [("per_upstream", 2, True), ("global", 2, True), ("none", 2, False),
                                                ("lattice", 2, False), ("per_upstream", 4, False)])
def test_probes_read_the_within_half_variance_only_where_strata_decide(stratify, K, reads):
    """The third contrast (ComponentProbe.measure_halves) is what per-row strata of t pay: the probes read it where
    the sampler gives each row one draw in each of K strata and the pair in use draws at most two per sample (where
    the strata decide whether to leave one draw), and nowhere else (Allocator.probe_reads_halves)."""
    theta, sds, clock, acc = make(K=K, budget=None, probe_every=2, choose_every=100, k_range=(2, 32))
    sds.sampler = TimestepSampler(T, stratify=stratify)
    assert acc.allocator.reads_halves == (K <= 2)
    assert acc.allocator.probe_reads_halves(sds.sampler) == reads  # the one rule the Accountant and the apps ask
    assert not acc.allocator.probe_reads_halves(object())  # a sampler without row strata
    g = torch.Generator().manual_seed(2)
    read = []
    for _ in range(8):
        st = run_step(acc, theta, clock, g)
        if st.components is not None:
            assert len(st.components) == (3 if reads else 2)  # 3: measure_halves (None where no pair shared a half)
            read += [c for c in st.components[2:] if c is not None]
    assert acc.probes == 4
    assert [h for h, _ in acc.allocator.halves] == read and (len(read) >= 1) == reads
    assert 0.0 <= acc.allocator.strata <= 1.0 and (reads or acc.allocator.strata == 0.0)
    off = make(K=2, budget=None, probe_every=2, choose_every=100, k_range=(2, 32))
    off[3].allocator.strata_probe = False  # Allocator(strata_probe=False): the two-contrast probe
    assert not off[3].allocator.reads_halves
    for _ in range(4):
        run_step(off[3], off[0], off[2], g)
    assert off[3].allocator.halves == []
