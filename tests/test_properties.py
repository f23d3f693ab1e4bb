"""Hypothesis property tests: inverse CDF (and its guide-table implementation) and stratification."""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from carv.timesteps import GuideTable, inverse_cdf, stratified_uniform

tables = st.lists(st.sampled_from([0.0, 1e-9, 1e-4, 0.01, 0.3, 1.0, 7.0]), min_size=1, max_size=64).filter(
    lambda v: sum(v) > 0)


def brute_inverse(u: float, q: list[float]) -> int:
    total = sum(q)
    c = 0.0
    for i, qi in enumerate(q):
        c += qi / total
        if c > u:
            return i
    return len(q) - 1


@settings(max_examples=200, deadline=None)
@given(q=tables, us=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=20))
@example(q=[0.0, 0.0, 1e-9, 1e-9, 0.3, 0.0], us=[1 - 2**-53])  # cdf ends below 1: a zero-mass tail
def test_inverse_cdf_matches_brute_force_and_skips_zero_mass(q, us):
    qt = torch.tensor(q, dtype=torch.float64)
    cdf = torch.cumsum(qt, 0) / qt.sum()
    u = torch.tensor(us, dtype=torch.float64)
    t = inverse_cdf(u, cdf)
    assert torch.equal(GuideTable(cdf)(u), t)
    assert (qt[t] > 0).all()
    for ui, ti in zip(us, t.tolist(), strict=True):
        # brute force uses the same cumulative sums up to rounding; compare away from exact ties
        if all(abs(ui - float(c)) > 1e-12 for c in cdf):
            assert ti == brute_inverse(ui, q)


@settings(max_examples=100, deadline=None)
@given(R=st.integers(1, 9), K=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_per_upstream_puts_one_point_per_stratum_per_row(R, K, seed):
    u = stratified_uniform(R, K, "per_upstream", seed)
    assert torch.equal(torch.sort((u * K).floor().long(), 1).values, torch.arange(K).expand(R, K))


@settings(max_examples=100, deadline=None)
@given(R=st.integers(1, 9), K=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_global_covers_all_fine_strata_and_each_row_all_coarse_strata(R, K, seed):
    u = stratified_uniform(R, K, "global", seed)
    n = R * K
    assert torch.equal(torch.sort((u * n).floor().long().flatten()).values, torch.arange(n))
    assert torch.equal(torch.sort((u * K).floor().long(), 1).values, torch.arange(K).expand(R, K))


@settings(max_examples=100, deadline=None)
@given(R=st.integers(1, 9), K=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_lattice_is_an_evenly_spaced_shifted_grid(R, K, seed):
    u = torch.sort(stratified_uniform(R, K, "lattice", seed).flatten()).values
    gaps = torch.diff(u)
    n = R * K
    assert torch.allclose(gaps, torch.full_like(gaps, 1.0 / n), atol=1e-12)
    assert ((u >= 0) & (u < 1)).all()
