"""The embedded default (toy SDS problem): a tiny configuration end to end, resume, bad input."""

import json

import pytest
import torch

from carv.accounting import optimal_k
from carv.apps.toy import ToyConfig, ToyProblem
from carv.bench.demo import run_demo
from carv.bench.harness import Config, fit_components, measure

TINY = dict(num_points=16, width=16, layers=1, Ks=[1, 4], replicates=6, reference_estimates=3, reference_R=4,
            reference_K=4, pilot_steps=3)


def test_demo_runs_end_to_end_and_writes_run_folder(tmp_path):
    res = run_demo(tmp_path / "run", progress=False, json_path=tmp_path / "r.json", cfg=ToyConfig(**TINY))
    rows = res["rows"]
    assert {r["method"] for r in rows} >= {"uniform", "importance", "stratified", "importance+stratified"}
    assert all(r["variance"] > 0 and r["cost_s"] > 0 and r["ecm"] > 0 for r in rows)
    base = next(r for r in rows if r["method"] == "uniform" and r["K"] == 1)
    assert base["ecm"] == pytest.approx(1.0) and base["re"] == pytest.approx(1.0)
    for f in ("results.json", "metrics.jsonl", "table.md", "variance_vs_cost.png", "ecm_vs_k.png"):
        assert (tmp_path / "run" / f).is_file(), f
    assert json.loads((tmp_path / "r.json").read_text())["accountant"]["k"] in range(1, 5)


def test_measure_resumes_from_saved_state(tmp_path):
    calls = []

    def estimate(c, g, meter):
        calls.append(c.key)
        return torch.randn(3, generator=g) / c.K

    cfgs = [Config("a", 1, 1), Config("a", 1, 4)]
    ref = torch.zeros(3)
    full = measure(cfgs, estimate, ref, 4, state_dir=tmp_path / "s", progress=False)
    n_full = len(calls)
    # a rerun over the same state does no new work and reproduces the rows exactly
    again = measure(cfgs, estimate, ref, 4, state_dir=tmp_path / "s", progress=False)
    assert len(calls) == n_full
    assert [r["variance"] for r in again] == [r["variance"] for r in full]
    # an interrupted run (state after 2 rounds) continues to the same result as an uninterrupted one
    calls.clear()
    measure(cfgs, estimate, ref, 2, state_dir=tmp_path / "t", progress=False)  # different n: fresh fingerprint
    assert len(calls) == 4


def test_measured_variance_scales_like_theory():
    """Harness check: for y = b + w/sqrt(K) the measured variance follows b/R + w/(RK), and the fit recovers it."""
    def estimate(c, g, meter):
        return (torch.randn(c.R, 4, generator=g) * 1.0 + torch.randn(c.R, c.K, 4, generator=g).mean(1) * 2.0).mean(0)

    cfgs = [Config("m", r, k) for r in (1, 4) for k in (1, 8)]
    rows = measure(cfgs, estimate, torch.zeros(4), 800, progress=False)
    for r in rows:
        theory = 4 * (1.0 / r["R"] + 4.0 / (r["R"] * r["K"]))
        assert r["variance"] == pytest.approx(theory, abs=4 * r["variance_se"])
    b, w = fit_components(rows, "m")
    assert b == pytest.approx(4.0, rel=0.15) and w == pytest.approx(16.0, rel=0.15)
    # K* = sqrt((c_up / c_draw)(w / b)) = sqrt(10 * 4) = 6.3 for the true components; with b and w each
    # within the 15% asserted above, w / b lies in [2.96, 5.41] and K* in [5.4, 7.4]: the accountant's K is 5-7
    assert optimal_k(b, w, 1.0, 0.1, k_max=64) in (5, 6, 7)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="Ks"):
        ToyProblem(ToyConfig(Ks=[0]))
    with pytest.raises(ValueError, match="replicates"):
        ToyProblem(ToyConfig(replicates=1))
    with pytest.raises(ValueError, match="configs: duplicate"):
        measure([Config("a", 1, 1), Config("a", 1, 1)], lambda c, g, m: torch.zeros(1), torch.zeros(1), 2,
                progress=False)


def test_demo_table_is_readable_at_80_columns(monkeypatch, capsys):
    """The demo's console table (its committed rows) fits 80 columns with every method name and number whole: a
    long name breaks after its ``+``, never into an ellipsis; at 200 columns each row is one line."""
    from pathlib import Path

    from carv.bench.report import print_table

    rows = json.loads((Path(__file__).parents[1] / "docs" / "demo_bench.json").read_text())["rows"]
    cols = ("method", "R", "K", "n", "variance", "variance_se", "cost_s", "re", "ecm", "ecm_se", "bound_fraction")
    monkeypatch.setenv("COLUMNS", "80")
    print_table(rows, cols, title="carv demo: SDS of a point set through a costly map (GMM teacher)", smoke=True)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in out
    assert any(ln.startswith("importance+ ") for ln in lines) and any(ln.startswith("stratified ") for ln in lines)
    assert f"{rows[0]['bound_fraction']:.3f}" in out and "smoke run" in lines[-1]
    monkeypatch.setenv("COLUMNS", "200")
    print_table(rows, cols)
    lines = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith("learned+stratified ") for ln in lines) == sum(r["method"] == "learned+stratified"
                                                                            for r in rows)
