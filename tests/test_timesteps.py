"""Timestep sampler: unbiasedness (every stratify mode, with and without importance), exact weights,
stratum coverage, variance ordering, bad input. Statistical checks use fixed seeds and a tolerance of
Z standard errors, where the standard error comes from independent replicates of the whole estimator."""

import math

import pytest
import torch

from carv import LearnedProposal, SecondMomentResampler, TimestepSampler, VPSchedule, weight_table
from carv.timesteps import GuideTable, inverse_cdf, stratified_uniform

Z = 4.0  # sigmas; with ~40 checks the chance of a false alarm is < 0.3%
T = 1000
SCHED = VPSchedule.from_betas(1e-4, 0.02, T)
MODES = ["none", "per_upstream", "global", "lattice"]  # the unbiased modes ("grid" is a quadrature rule)


def importance_cases():
    g = torch.Generator().manual_seed(7)
    return {
        "none": dict(),
        "sds-weight": dict(importance=weight_table("sds", SCHED), floor=0.1),
        "random-table": dict(importance=torch.rand(T, generator=g) ** 3 + 0.01, floor=0.0),
        "callable+support": dict(importance=lambda t: (t.double() + 1).sqrt(), t_min=20, t_max=979, floor=0.05),
        "base": dict(base=torch.linspace(0.2, 1.0, T), importance=weight_table("sds", SCHED), floor=0.2),
    }


def replicate_means(sampler, f, R, K, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        d = sampler.sample(R, K, g)
        out[i] = (d.weight.double() * f[d.t]).mean()
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(importance_cases()))
def test_unbiased_for_random_table(mode, case):
    kw = importance_cases()[case]
    sampler = TimestepSampler(T, stratify=mode, **kw)
    f = torch.randn(T, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 2.0
    exact = float(sampler.expectation(f))
    seed = 100 * MODES.index(mode) + list(importance_cases()).index(case)
    means = replicate_means(sampler, f, R=4, K=8, n=400, seed=seed)
    se = float(means.std()) / math.sqrt(len(means))
    assert abs(float(means.mean()) - exact) < Z * se + 1e-12, (float(means.mean()), exact, se)


@pytest.mark.parametrize("mode", MODES)
def test_each_draw_follows_q(mode):
    """Frequencies of 10^6 draws against q (5 sigma per timestep, binomial standard error; the
    stratified modes are less variable than that, never more)."""
    imp = torch.rand(T, generator=torch.Generator().manual_seed(7)) ** 3 + 1e-3
    sampler = TimestepSampler(T, importance=imp, stratify=mode)
    d = sampler.sample(1000, 1000, 1)
    counts = torch.bincount(d.t.flatten(), minlength=T).double()
    n, q = 1e6, sampler.q
    z = (counts - n * q) / torch.sqrt(n * q * (1 - q))
    assert float(z.abs().max()) < 5.0


def test_weights_are_exactly_p_over_q():
    sampler = TimestepSampler(T, importance=weight_table("sds", SCHED), floor=0.1, t_min=5, t_max=990,
                              dtype=torch.float64)
    d = sampler.sample(16, 64, 0)
    p, q = sampler.p, sampler.q
    assert torch.equal(d.weight, (p / q)[d.t])
    assert sampler.max_weight <= 1 / 0.1 + 1e-12
    assert float((sampler.q * sampler.weights).sum()) == pytest.approx(1.0, abs=1e-12)  # E_q[v] = 1


def test_draws_stay_in_support_and_dtype():
    sampler = TimestepSampler(T, t_min=20, t_max=980, stratify="global")
    d = sampler.sample(32, 32, 3)
    assert d.t.dtype == torch.int64 and d.t.shape == (32, 32) and d.weight.dtype == torch.float32
    assert int(d.t.min()) >= 20 and int(d.t.max()) <= 980


def test_per_upstream_covers_every_stratum_in_every_row():
    K = 10
    sampler = TimestepSampler(T, stratify="per_upstream")  # q uniform: stratum k is t in [100k, 100k+99]
    d = sampler.sample(50, K, 0)
    strata = torch.sort(d.t // (T // K), dim=1).values
    assert torch.equal(strata, torch.arange(K).expand(50, K))


def test_global_covers_fine_strata_once_and_coarse_strata_per_row():
    R, K = 5, 4
    sampler = TimestepSampler(T, stratify="global")
    for seed in range(20):
        d = sampler.sample(R, K, seed)
        fine = torch.sort((d.t // (T // (R * K))).flatten()).values
        assert torch.equal(fine, torch.arange(R * K))
        coarse = torch.sort(d.t // (T // K), dim=1).values
        assert torch.equal(coarse, torch.arange(K).expand(R, K))


def test_global_split_across_ranks_covers_strata_once_and_is_unbiased():
    R, K, W = 2, 5, 4  # R*K*W divides T, so fine strata are whole blocks of timesteps
    sampler = TimestepSampler(T, stratify="global")
    d = [sampler.sample(R, K, 100 + r, rank=r, world_size=W) for r in range(W)]
    fine = torch.sort(torch.cat([x.t.flatten() for x in d]) // (T // (R * K * W))).values
    assert torch.equal(fine, torch.arange(R * K * W))
    f = torch.randn(T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    means = torch.tensor([
        torch.cat([(lambda s: s.weight.double() * f[s.t])(sampler.sample(R, K, g, rank=r, world_size=W)).flatten()
                   for r in range(W)]).mean().item() for _ in range(400)])
    se = float(means.std()) / math.sqrt(len(means))
    assert abs(float(means.mean()) - float(sampler.expectation(f))) < Z * se


@pytest.mark.parametrize("mode", ["per_upstream", "global", "lattice"])
def test_stratified_variance_below_iid_on_monotone_f(mode):
    f = torch.linspace(0, 1, T, dtype=torch.float64) ** 2
    iid = replicate_means(TimestepSampler(T), f, 4, 8, 300, 11).var()
    strat = replicate_means(TimestepSampler(T, stratify=mode), f, 4, 8, 300, 12).var()
    # for a monotone f stratification cuts the variance by orders of magnitude; demand at least 10x
    assert strat * 10 < iid


def test_importance_sampling_reduces_variance_for_proportional_f():
    f = weight_table("sds", SCHED)  # q ~ p * f is the zero-variance proposal for a positive f
    iid = replicate_means(TimestepSampler(T), f, 1, 8, 300, 1).var()
    imp = replicate_means(TimestepSampler(T, importance=f), f, 1, 8, 300, 2).var()
    assert imp < 1e-12 * iid  # zero up to float rounding


def test_guide_table_matches_searchsorted_on_hard_tables():
    g = torch.Generator().manual_seed(0)
    tables = [torch.rand(T, generator=g, dtype=torch.float64) ** 8,  # many tiny entries -> crowded bins
              torch.cat([torch.zeros(10), torch.ones(T - 20), torch.zeros(10)]).double(),
              torch.zeros(T, dtype=torch.float64).index_fill_(0, torch.tensor([3, 500, 999]), 1.0)]
    for q in tables:
        cdf = torch.cumsum(q, 0) / q.sum()
        u = torch.cat([torch.rand(50_000, generator=g, dtype=torch.float64), cdf[:-1], torch.zeros(1)])
        u = u[u < 1]
        assert torch.equal(GuideTable(cdf)(u), inverse_cdf(u, cdf))
        assert (q[GuideTable(cdf)(u)] > 0).all()


def test_learned_proposal_learns_sqrt_second_moment_and_round_trips():
    lp = LearnedProposal(T, num_bins=20, decay=0.5, smoothing=0)
    true_m2 = torch.linspace(0.01, 4.0, T, dtype=torch.float64) ** 2
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        t = torch.randint(0, T, (512,), generator=g)
        lp.update(t, true_m2[t])
    imp = lp.importance()
    bins = (torch.arange(T) * 20) // T
    expected = torch.stack([true_m2[bins == b].mean() for b in range(20)]).sqrt()[bins]
    assert torch.allclose(imp, expected, rtol=0.05)
    lp2 = LearnedProposal(T, num_bins=20, decay=0.5, smoothing=0)
    lp2.load_state_dict(lp.state_dict())
    assert torch.equal(lp2.importance(), lp.importance())
    TimestepSampler(T, importance=imp, floor=0.05)  # usable as a proposal


def test_second_moment_resampler_warms_up_then_weights():
    sm = SecondMomentResampler(10, history=3)
    assert sm.importance() is None
    for _ in range(3):
        sm.update(torch.arange(10), torch.arange(10).double() + 1)
    assert torch.allclose(sm.importance(), torch.arange(10).double() + 1)


def test_stratified_uniform_is_in_unit_interval_and_shaped():
    for mode in MODES:
        u = stratified_uniform(7, 5, mode, 0)
        assert u.shape == (7, 5) and (u >= 0).all() and (u < 1).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_timesteps=0), "num_timesteps"),
        (dict(num_timesteps=T, t_min=10, t_max=5), "t_min, t_max"),
        (dict(num_timesteps=T, t_max=T), "t_min, t_max"),
        (dict(num_timesteps=T, floor=1.5), "floor"),
        (dict(num_timesteps=T, stratify="sobol"), "stratify"),
        (dict(num_timesteps=T, base=torch.ones(10)), "base"),
        (dict(num_timesteps=T, base=torch.zeros(T)), "base"),
        (dict(num_timesteps=T, importance=-torch.ones(T)), "importance"),
        (dict(num_timesteps=T, importance=torch.ones(T + 1)), "importance"),
        (dict(num_timesteps=T, importance=torch.zeros(T)), "importance"),
        (dict(num_timesteps=T, importance=torch.cat([torch.zeros(3), torch.ones(T - 3)])), r"timesteps \[0, 1, 2\]"),
    ],
)
def test_bad_sampler_arguments_raise_named_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimestepSampler(**kwargs)


def test_bad_sample_arguments_raise_named_errors():
    s = TimestepSampler(T)
    with pytest.raises(ValueError, match="R"):
        s.sample(0, 4)
    with pytest.raises(ValueError, match="K"):
        s.sample(2, -1)
    with pytest.raises(ValueError, match="world_size"):
        s.sample(2, 2, 0, rank=0, world_size=2)  # only 'global' splits across processes
    with pytest.raises(ValueError, match="rank"):
        TimestepSampler(T, stratify="global").sample(2, 2, 0, rank=3, world_size=2)
    with pytest.raises(TypeError, match="generator"):
        s.sample(2, 2, generator="seed")


def test_zero_importance_is_allowed_with_a_floor():
    imp = torch.cat([torch.zeros(3), torch.ones(T - 3)])
    s = TimestepSampler(T, importance=imp, floor=0.01)
    assert float(s.q[:3].min()) > 0


def test_grid_is_deterministic_midpoints():
    s = TimestepSampler(T, stratify="grid")
    a, b = s.sample(3, 4, 0), s.sample(3, 4, 1)
    assert torch.equal(a.t, b.t)
    # midpoints 125, 375, 625, 875 lie exactly on CDF breakpoints: either neighbour is a valid answer
    assert (a.t[0] - torch.tensor([125, 375, 625, 875])).abs().max() <= 1


@pytest.mark.parametrize("probs", [[0.0, 0.3, 0.0, 0.7], [1e-3] * 1000, [0.5] + [1e-9] * 10 + [0.5 - 1e-8]])
def test_guide_table_maps_x_equal_to_m_to_the_last_timestep(probs):
    """x = u * M can round up to exactly M (stratified jitter of 1 - 2^-53): the last positive-mass timestep."""
    from carv.timesteps import GuideTable

    p = torch.tensor(probs, dtype=torch.float64)
    g = GuideTable(torch.cumsum(p, 0) / p.sum())
    last = int((p > 0).nonzero().max())
    assert g.from_scaled(torch.tensor([float(g.M)], dtype=torch.float64)).tolist() == [last]


# --------------------------------------------------------------------------- timestep ranges (annealing)
def test_set_t_range_equals_a_fresh_sampler_on_that_range_and_stays_unbiased():
    """After set_t_range the tables are exactly those of a sampler built on the new range (base, importance,
    floor kept), draws stay inside it, and the weighted mean is unbiased for E_p on it (Z sigmas)."""
    imp = torch.rand(T, generator=torch.Generator().manual_seed(3)) ** 2 + 0.01
    base = torch.linspace(0.5, 1.5, T)
    s = TimestepSampler(T, base=base, importance=imp, floor=0.1, stratify="per_upstream")
    s.set_t_range(20, 499)
    fresh = TimestepSampler(T, 20, 499, base=base, importance=imp, floor=0.1, stratify="per_upstream")
    assert (s.t_min, s.t_max) == (20, 499)
    torch.testing.assert_close(s.p, fresh.p, rtol=0, atol=0)
    torch.testing.assert_close(s.q, fresh.q, rtol=0, atol=0)
    torch.testing.assert_close(s.weights, fresh.weights, rtol=0, atol=0)
    assert float(s.p[:20].sum()) == 0.0 and float(s.p[500:].sum()) == 0.0
    d = s.sample(64, 16, 5)
    assert int(d.t.min()) >= 20 and int(d.t.max()) <= 499
    f = torch.randn(T, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 2.0
    means = replicate_means(s, f, R=4, K=8, n=400, seed=11)
    se = float(means.std()) / math.sqrt(len(means))
    assert abs(float(means.mean()) - float(s.expectation(f))) < Z * se
    # and back to the full range: the original tables again
    s.set_t_range(0, T - 1)
    torch.testing.assert_close(s.q, TimestepSampler(T, base=base, importance=imp, floor=0.1).q, rtol=0, atol=0)


def test_set_t_range_rejects_bad_ranges_and_keeps_the_old_one():
    s = TimestepSampler(T, 0, 499, importance=torch.cat([torch.ones(500), torch.zeros(500)]), floor=0.0)
    with pytest.raises(ValueError, match="t_min, t_max"):
        s.set_t_range(600, 500)
    with pytest.raises(ValueError, match="t_min, t_max"):
        s.set_t_range(0, T)
    q = s.q.clone()
    with pytest.raises(ValueError, match="importance"):  # no importance mass on 500..999 and no floor
        s.set_t_range(500, T - 1)
    assert (s.t_min, s.t_max) == (0, 499)
    torch.testing.assert_close(s.q, q, rtol=0, atol=0)


def test_percent_and_annealed_ranges():
    from carv.timesteps import annealed_range, percent_range

    assert percent_range(1000, 0.02, 0.98) == (20, 980)
    assert percent_range(1000, 0.0, 1.0) == (0, 999)
    assert annealed_range(0, 1000, (0.02, 0.98), (0.02, 0.5), 300) == (20, 980)
    assert annealed_range(150, 1000, (0.02, 0.98), (0.02, 0.5), 300) == (20, 740)  # halfway: 0.74
    assert annealed_range(300, 1000, (0.02, 0.98), (0.02, 0.5), 300) == (20, 500)
    assert annealed_range(10_000, 1000, (0.02, 0.98), (0.02, 0.5), 300) == (20, 500)  # held after the end
    assert annealed_range(77, 1000, (0.1, 0.9)) == (100, 900)  # no end: constant
    with pytest.raises(ValueError, match="lo, hi"):
        percent_range(1000, 0.6, 0.5)
    with pytest.raises(ValueError, match=r"end\[1\]"):
        annealed_range(1, 1000, (0.0, 1.0), (0.0, 1.5), 10)
    with pytest.raises(ValueError, match="anneal_steps"):
        annealed_range(1, 1000, (0.0, 1.0), (0.0, 0.5), 0)


def test_learned_proposal_gives_no_mass_outside_the_support_and_never_leaks_unseen_bins():
    """The main job's support 20..500: bin 0 (t 0..19) and the bins above 500 are never drawn. They must neither
    carry mass nor be smoothed into the support's edge (the old table over-weighted t = 20..39 about 2.7x)."""
    lp = LearnedProposal(1000, num_bins=50, smoothing=1, prior=torch.ones(1000))
    m2 = (torch.arange(1000, dtype=torch.float64) / 20.0) ** 2  # rises 625x over the support, as the job's does
    t = torch.arange(20, 501)
    lp.update(t, m2[t])
    imp = lp.importance((20, 500))
    assert (imp[:20] == 0).all() and (imp[501:] == 0).all()
    # bin 1 (t 20..39) is the mean of its own and its one seen neighbour (bin 2): no unseen bin enters it
    b1, b2 = m2[20:40].mean(), m2[40:60].mean()
    assert torch.allclose(imp[20:40], ((b1 + b2) / 2).sqrt().expand(20))
    # an unseen bin inside the support interpolates its seen neighbours; outside it stays 0
    lp2 = LearnedProposal(1000, num_bins=50, smoothing=1)
    lp2.update(torch.tensor([100, 300]), torch.tensor([1.0, 9.0]))
    got = lp2.importance((20, 500))
    assert got[20] == 1.0 and got[500] == 3.0 and got[600] == 0.0 and 1.0 < got[200] < 3.0
    assert lp2.importance((600, 700)) is None  # nothing seen in that support, no prior
    assert torch.equal(lp.importance((700, 800)), torch.where((torch.arange(1000) >= 700) & (torch.arange(1000) <= 800),
                                                              1.0, 0.0).double())  # the prior, on the support only
    TimestepSampler(1000, 20, 500, importance=imp)  # positive on the whole support: usable with floor 0


def _selector_run(m_of_t, weight, steps, seed, start="weight", floor=0.1, draws=64):
    """Run a ProposalSelector on s = m(t) * chi2_1 noise (E[s | t] = m(t)), refreshing every step."""
    from carv.timesteps import ProposalSelector
    T = 200
    sampler = TimestepSampler(T, 10, 189, floor=floor)
    sel = ProposalSelector(T, weight=weight, learned=LearnedProposal(T, num_bins=20, prior=weight), start=start)
    sel.refresh(sampler)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        d = sampler.sample(draws, 1, generator=g)
        s = m_of_t[d.t.flatten()] * torch.randn(draws, generator=g, dtype=torch.float64) ** 2
        sel.update(d.t, s, sampler)
        sel.refresh(sampler)
    return sel, sampler


def test_proposal_selector_second_moment_is_unbiased_for_every_candidate():
    """M(q') from draws of q against the exact sum_t p^2 m / q'. 200 independent windows of 1024 draws; the
    mean is compared with a 4-sigma tolerance from the spread of the 200 estimates."""
    from carv.timesteps import ProposalSelector, proposal_table
    T = 200
    m = torch.linspace(0.1, 5.0, T, dtype=torch.float64) ** 2
    w = torch.linspace(2.0, 0.5, T, dtype=torch.float64)
    sampler = TimestepSampler(T, 10, 189, importance=w, floor=0.1)  # draws from the "weight" proposal
    g = torch.Generator().manual_seed(3)
    est = {c: [] for c in ("uniform", "weight")}
    for _ in range(200):
        sel = ProposalSelector(T, weight=w, start="weight")
        d = sampler.sample(1024, 1, generator=g)
        sel.update(d.t, m[d.t.flatten()] * torch.randn(1024, generator=g, dtype=torch.float64) ** 2, sampler)
        for c, (v, _) in sel.second_moments(sampler).items():
            est[c].append(v)
    p = sampler.p
    for c, imp in (("uniform", None), ("weight", w)):
        exact = float((p * p * m / proposal_table(p, imp, 0.1).clamp_min(1e-300))[p > 0].sum())
        x = torch.tensor(est[c])
        assert abs(float(x.mean()) - exact) < 4 * float(x.std()) / math.sqrt(len(x)), (c, float(x.mean()), exact)


def test_proposal_selector_switches_importance_off_where_it_does_not_pay_and_on_where_it_does():
    T = 200
    w_bad = torch.linspace(5.0, 0.2, T, dtype=torch.float64)  # a weight table against the residual's trend
    flat = torch.ones(T, dtype=torch.float64)
    steep = torch.linspace(0.05, 5.0, T, dtype=torch.float64) ** 4
    sel, sampler = _selector_run(flat, w_bad, 60, 0)
    assert sel.current == "uniform" and torch.allclose(sampler.q, sampler.p)
    assert [(h["from"], h["to"]) for h in sel.history] == [("weight", "uniform")]
    sel, sampler = _selector_run(steep, w_bad, 60, 1)
    assert sel.current == "learned" and sampler.max_weight > 2.0
    # state round trip: the same choice and the same comparison after a restore
    from carv.timesteps import ProposalSelector
    again = ProposalSelector(T, weight=w_bad, learned=sel.learned, start="weight")
    again.load_state_dict(sel.state_dict())
    assert again.current == "learned" and again.second_moments(sampler) == sel.second_moments(sampler)


def test_guide_table_bins_equal_a_binary_search_of_their_edges():
    """The guide table counts the CDF breakpoints at or below each bin edge k / M with a histogram; a binary
    search of every edge gives the same ranks, on tables with zero-mass timesteps, tiny entries and one point."""
    g = torch.Generator().manual_seed(4)
    for size in (1, 2, 7, 300, 1000):
        for power in (1, 3, 9):
            q = torch.rand(size, generator=g, dtype=torch.float64) ** power
            q[torch.rand(size, generator=g) < 0.3] = 0.0
            q[int(torch.randint(size, (1,), generator=g))] = 0.5
            cdf = torch.cumsum(q, 0) / q.sum()
            table = GuideTable(cdf)
            pos = (torch.diff(cdf, prepend=cdf.new_zeros(1)) > 0).nonzero().flatten()
            edges = torch.arange(table.M + 1, dtype=torch.float64) / table.M
            rank = torch.searchsorted(cdf[pos], edges, right=True).clamp(max=pos.numel() - 1)
            lo, gap = rank[:-1], rank[1:] - rank[:-1]
            b = torch.where(gap >= 1, cdf[pos][lo] * table.M, edges[1:] * table.M)
            C = lo.double() + 1.0 - b + (float(pos[0]) if table.contiguous else 0.0)
            C = torch.where(gap > 1, torch.full_like(C, float("nan")), C)
            assert torch.allclose(table.C[:-1], C, rtol=0, atol=0, equal_nan=True), (size, power)  # bit for bit
            u = torch.cat([torch.rand(4000, generator=g, dtype=torch.float64), edges[:-1]])
            assert torch.equal(table(u), inverse_cdf(u, cdf)), (size, power)


def _masked_ema(lp, t, v):
    """LearnedProposal's per-bin EMA written out on masked tensors (the reference for its fast path)."""
    b = lp.bin_of[t]
    s = torch.zeros(lp.num_bins, dtype=torch.float64).index_add_(0, b, v)
    n = torch.zeros(lp.num_bins, dtype=torch.float64).index_add_(0, b, torch.ones_like(v))
    seen = n > 0
    m2, mass = lp.m2.clone(), lp.mass.clone()
    m2[seen] = (lp.decay * mass[seen] * m2[seen] + s[seen]) / (lp.decay * mass[seen] + n[seen])
    mass[seen] = lp.decay * mass[seen] + n[seen]
    return m2, mass


def test_learned_proposal_update_is_bit_identical_to_the_masked_ema_for_small_and_large_batches():
    g = torch.Generator().manual_seed(5)
    lp = LearnedProposal(T, num_bins=50, decay=0.9)
    for n in (1, 2, 3, 16, 64, 65, 512, 2, 1):
        for _ in range(4):
            t = torch.randint(0, 60, (n,), generator=g) * 16  # few bins: repeats within one batch
            v = torch.rand(n, generator=g, dtype=torch.float64) * 10.0 ** float(torch.randn(1, generator=g))
            m2, mass = _masked_ema(lp, t, v)
            lp.update(t, v)
            assert torch.equal(lp.m2, m2) and torch.equal(lp.mass, mass), n


def test_proposal_selector_window_is_the_last_draws_whatever_the_step_sizes():
    """Draws are joined into the window lazily; the window, the saved state and a restored selector are those of
    a selector that keeps exactly the last ``window`` draws at every step."""
    from carv.timesteps import ProposalSelector
    sampler = TimestepSampler(T, importance=torch.linspace(0.5, 2.0, T), floor=0.1)
    g = torch.Generator().manual_seed(6)
    sel = ProposalSelector(T, learned=LearnedProposal(T), window=100, min_draws=10)
    seen = {"t": [], "s": [], "q": []}
    for step, n in enumerate((1, 3, 40, 7, 99, 1, 250, 2, 5, 60)):
        d = sampler.sample(1, n, generator=g)
        s = torch.rand(1, n, generator=g, dtype=torch.float64)
        sel.update(d.t, s, sampler)
        for k, v in (("t", d.t.double()), ("s", s), ("q", sampler.q[d.t])):
            seen[k].append(v.flatten())
        state = sel.state_dict()
        for k in seen:
            assert torch.equal(state[k], torch.cat(seen[k])[-100:]), (step, k)
        if step % 3 == 2:
            again = ProposalSelector(T, learned=sel.learned, window=100, min_draws=10)
            again.load_state_dict(state)
            assert again.second_moments(sampler) == sel.second_moments(sampler)
            assert again.refresh(sampler) == sel.refresh(sampler)


def _schedule_run(sel, sampler, m_of_t, steps, seed, draws=64, first=1):
    """``sel.step`` on s = m(t) * chi2_1 noise; the steps (counted from ``first``) at which it refreshed."""
    g = torch.Generator().manual_seed(seed)
    refreshed = []
    for i in range(first, first + steps):
        d = sampler.sample(draws, 1, generator=g)
        s = m_of_t[d.t.flatten()] * torch.randn(draws, generator=g, dtype=torch.float64) ** 2
        if sel.step(d.t, s, sampler):
            refreshed.append(i)
    return refreshed


def test_proposal_selector_refreshes_sparser_while_the_choice_holds_and_again_after_a_switch():
    """every=3, settle=2, every_max=12: two kept refreshes double the interval (3, 6, 12, then 12); a switch
    brings it back to 3. The refreshes are those of update-every-step plus refresh at those steps."""
    from carv.timesteps import ProposalSelector
    T = 200
    flat = torch.ones(T, dtype=torch.float64)
    w_bad = torch.linspace(5.0, 0.2, T, dtype=torch.float64)
    sampler = TimestepSampler(T, 10, 189, floor=0.1)
    only_uniform = ProposalSelector(T, every=3, every_max=12, settle=2)
    assert _schedule_run(only_uniform, sampler, flat, 60, 0) == [3, 6, 12, 18, 30, 42, 54]
    # from the weight table against the residual's trend, comparing from 640 draws (step 10) on: the refreshes at
    # 3, 6 and 9 compare nothing and leave the interval at 3; a switch to uniform at 12 (3 again), kept at 15 and
    # 18 (interval 6), 24 and 30 (12)
    sampler = TimestepSampler(T, 10, 189, importance=w_bad, floor=0.1)
    sel = ProposalSelector(T, weight=w_bad, start="weight", every=3, every_max=12, settle=2, min_draws=640)
    got = _schedule_run(sel, sampler, flat, 40, 1)
    assert [(h["from"], h["to"], h["draws"]) for h in sel.history] == [("weight", "uniform", 768)]
    assert got == [3, 6, 9, 12, 15, 18, 24, 30] and torch.allclose(sampler.q, sampler.p)
    # the same draws through update() and refresh() at those steps: the same window and choice
    ref_sampler = TimestepSampler(T, 10, 189, importance=w_bad, floor=0.1)
    ref = ProposalSelector(T, weight=w_bad, start="weight", min_draws=640)
    g = torch.Generator().manual_seed(1)
    for i in range(1, 41):
        d = ref_sampler.sample(64, 1, generator=g)
        ref.update(d.t, flat[d.t.flatten()] * torch.randn(64, generator=g, dtype=torch.float64) ** 2, ref_sampler)
        if i in got:
            ref.refresh(ref_sampler)
    state, ref_state = sel.state_dict(), ref.state_dict()
    assert all(torch.equal(state[k], ref_state[k]) for k in ("t", "s", "q", "current"))
    assert torch.equal(ref_sampler.q, sampler.q)


def test_proposal_selector_schedule_resumes_where_it_stopped():
    from carv.timesteps import ProposalSelector
    T = 200
    flat = torch.ones(T, dtype=torch.float64)
    sampler = TimestepSampler(T, 10, 189, floor=0.1)
    whole = ProposalSelector(T, every=2, settle=1)
    full = _schedule_run(whole, sampler, flat, 50, 7)
    assert full == [2, 6, 14, 30, 46]  # intervals 2, 4, 8, 16, then 16: every_max defaults to 8 * every
    # stop after step 20, restore into a fresh selector and continue with the same draws
    part = ProposalSelector(T, every=2, settle=1)
    g = torch.Generator().manual_seed(7)
    got = []
    for i in range(1, 51):
        if i == 21:
            resumed = ProposalSelector(T, every=2, settle=1)
            resumed.load_state_dict(part.state_dict())
            part = resumed
        d = sampler.sample(64, 1, generator=g)
        if part.step(d.t, flat[d.t.flatten()] * torch.randn(64, generator=g, dtype=torch.float64) ** 2, sampler):
            got.append(i)
    assert got == full
    assert all(torch.equal(part.state_dict()[k], whole.state_dict()[k]) for k in whole.state_dict())
    # a state saved before the schedule existed: refreshes every `every` steps from there
    old = {k: v for k, v in whole.state_dict().items() if k != "schedule"}
    legacy = ProposalSelector(T, every=2, settle=1)
    legacy.load_state_dict(old)
    assert (legacy.steps, legacy.interval, legacy.next_refresh) == (0, 2, 2)
    bad = dict(whole.state_dict(), schedule=torch.tensor([5, 99, 7, 0]))
    with pytest.raises(ValueError, match=r"state\['schedule'\].*every_max \(16\)"):
        ProposalSelector(T, every=2, settle=1).load_state_dict(bad)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every": 0}, "every: expected a positive integer"),
    ({"every": 4, "every_max": 3}, r"every_max: expected an integer >= every \(4\), got 3"),
    ({"every_max": True}, "every_max: expected an integer"),
    ({"settle": 0}, "settle: expected a positive integer"),
])
def test_proposal_selector_refuses_a_bad_schedule(kwargs, message):
    from carv.timesteps import ProposalSelector
    with pytest.raises(ValueError, match=message):
        ProposalSelector(200, **kwargs)
