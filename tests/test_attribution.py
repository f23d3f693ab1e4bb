"""Attribution features: per-example gradients, projection, unbiasedness, common random numbers, the
benchmark and the `carv attribute` app end to end (tiny configurations), resume and bad input.

Statistical tolerances are in standard errors (stated next to each assertion); seeds are fixed.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from typer.testing import CliRunner

from carv.accounting import CostMeter
from carv.bench.attribution import (
    AttributionBenchConfig,
    ecm_at_equal_metric,
    run_attribution_bench,
    spearman,
    topk_overlap,
)
from carv.bench.harness import Config, measure
from carv.cli import app
from carv.objectives.attribution import GaussianProjection, GradientFeatures, cosine_scores
from carv.objectives.weighting import weight_table
from carv.schedules import VPSchedule
from carv.teachers.unet import CompactUNet, UNetTeacher
from carv.timesteps import TimestepSampler

T_TINY = 20


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_teacher(seed: int = 0) -> UNetTeacher:
    """A small random conditional UNet on 8x8 images (every parameter random, so every gradient is non-zero)."""
    model = CompactUNet(in_channels=1, base_channels=4, channel_mults=(1,), num_res_blocks=1, cond_classes=(10,))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return UNetTeacher(model, VPSchedule.from_betas(1e-3, 0.3, T_TINY))


def tiny_data(n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def loop_gradient(teacher, x0, label, t, eps, weight, w_table) -> torch.Tensor:
    """The plain-PyTorch reference: autograd on a python loop over draws, one example at a time."""
    params = list(teacher.model.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        total = 0.0
        for k in range(t.shape[0]):
            x_t = teacher.schedule.add_noise(x0[None], t[k : k + 1], eps[k : k + 1])
            err = (teacher.model(x_t, t[k : k + 1], label[None]) - eps[k : k + 1]).pow(2).mean()
            total = total + weight[k] * w_table[t[k]] * err
        grads = torch.autograd.grad(total / t.shape[0], params)
    finally:
        for p in params:
            p.requires_grad_(False)
    return torch.cat([g.flatten() for g in grads])


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("weighting", ["uniform", "sds"])
def test_per_example_gradients_match_a_plain_loop(weighting):
    teacher = tiny_teacher()
    x, y = tiny_data(3)
    sampler = TimestepSampler(T_TINY, importance=torch.linspace(1, 3, T_TINY), floor=0.2, stratify="per_upstream")
    feats = GradientFeatures(teacher, sampler, K=5, weighting=weighting, proj_dim=None, max_batch=4)  # chunked
    batch = feats.draw(x, y, generator=0)
    assert not torch.allclose(batch[4], torch.ones_like(batch[4]))  # importance weights are really in play
    got = feats.gradients(batch)
    w = weight_table(weighting, teacher.schedule).float()
    want = torch.stack([loop_gradient(teacher, x[i], y[i], batch[2][i], batch[3][i], batch[4][i], w)
                        for i in range(3)])
    assert got.shape == (3, feats.num_params)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # per-draw gradients (vmap over examples and draws) average to the same feature
    per = feats.per_draw_gradients(batch)
    torch.testing.assert_close((per * batch[4][..., None]).mean(1), got, rtol=1e-4, atol=1e-6)
    sq = feats.per_draw_sq_norms(batch)
    torch.testing.assert_close(sq, per.pow(2).sum(-1), rtol=1e-4, atol=1e-8)


def test_parameter_subset_is_the_matching_slice_of_the_full_gradient():
    teacher = tiny_teacher()
    x, y = tiny_data(2)
    full = GradientFeatures(teacher, TimestepSampler(T_TINY), K=3, proj_dim=None)
    sub = GradientFeatures(teacher, TimestepSampler(T_TINY), K=3, proj_dim=None, params=["conv_out", "norm_out"])
    batch = full.draw(x, y, generator=3)
    names = [n for n, _ in teacher.model.named_parameters()]
    sizes = [p.numel() for _, p in teacher.model.named_parameters()]
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    keep = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)
                      if n.startswith(("conv_out.", "norm_out."))])
    assert sub.num_params == keep.numel() < full.num_params
    torch.testing.assert_close(sub.gradients(batch), full.gradients(batch)[:, keep], rtol=1e-5, atol=1e-7)


def test_projection_is_linear_seeded_and_amortised_over_draws():
    teacher = tiny_teacher()
    x, y = tiny_data(3)
    feats = GradientFeatures(teacher, TimestepSampler(T_TINY), K=4, proj_dim=16, proj_seed=7)
    again = GaussianProjection(feats.num_params, 16, seed=7)
    other = GaussianProjection(feats.num_params, 16, seed=8)
    assert torch.equal(feats.projection.matrix, again.matrix) and not torch.equal(again.matrix, other.matrix)
    # the matrix is N(0, 1/dim): mean 0 and variance 1/16 within 5 standard errors
    m = again.matrix.double()
    n = m.numel()
    assert abs(float(m.mean())) < 5 * math.sqrt(1 / 16 / n)
    assert abs(float(m.var()) - 1 / 16) < 5 * (1 / 16) * math.sqrt(2 / n)
    batch = feats.draw(x, y, generator=1)
    per = feats.per_draw_gradients(batch) * batch[4][..., None]  # [N, K, P]
    after = feats.project(per).mean(1)       # project every draw, then average
    before = feats.project(per.mean(1))      # average, then project once (what features_of does)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-6)
    meter = CostMeter()
    phi = feats.features_of(batch, meter)
    torch.testing.assert_close(phi, before, rtol=1e-4, atol=1e-6)
    assert meter.counts["draw"] == 3 * 4 and meter.counts["upstream"] == 3  # stages timed per draw / per example
    # same generator seed -> same features; and they are linear in the gradient
    torch.testing.assert_close(feats(x, y, generator=1), phi)
    torch.testing.assert_close(feats.project(2 * per[:, 0] - per[:, 1]),
                               2 * feats.project(per[:, 0]) - feats.project(per[:, 1]), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- unbiasedness
def test_every_estimator_is_unbiased_for_the_feature_and_the_grid_is_not():
    """Mean of many estimates vs an exact-in-t reference (sum over all T timesteps, noise averaged by MC).

    Statistic: per coordinate z = (mean - ref) / sqrt(se_mean^2 + se_ref^2); every |z| < 4.5 (4.5 sigma,
    16 coordinates per estimator). Negative control: D-TRAK's grid at K = 2 is a quadrature and is off by
    more than 8 sigma (at K = 1: every draw at the middle timestep).
    """
    teacher = tiny_teacher(seed=2)
    x, y = tiny_data(2, seed=5)
    d = 8
    base = GradientFeatures(teacher, TimestepSampler(T_TINY), K=1, proj_dim=d, proj_seed=0)
    proj = base.projection
    # reference: every timestep, M noises each, weighted by p(t) (uniform here)
    M = 40
    t_all = torch.arange(T_TINY).repeat_interleave(M)
    g = torch.Generator().manual_seed(11)
    per_t = []
    for i in range(2):
        eps = torch.randn(T_TINY * M, 1, 8, 8, generator=g)
        batch = (x[i : i + 1], y[i : i + 1], t_all[None], eps[None], torch.ones(1, T_TINY * M))
        per_t.append(base.project(base.per_draw_gradients(batch)[0]).reshape(T_TINY, M, d))
    per_t = torch.stack(per_t)  # [2, T, M, d]
    ref = per_t.mean((1, 2))
    ref_se = (per_t.var(2) / M).mean(1).div(T_TINY).sqrt()  # strata (timesteps) are independent

    imp = torch.linspace(0.2, 3.0, T_TINY) ** 2
    samplers = {
        "iid": TimestepSampler(T_TINY),
        "stratified": TimestepSampler(T_TINY, stratify="per_upstream"),
        "importance": TimestepSampler(T_TINY, importance=imp, floor=0.1),
        "stratified+importance": TimestepSampler(T_TINY, importance=imp, floor=0.1, stratify="per_upstream"),
        "grid": TimestepSampler(T_TINY, stratify="grid"),
    }
    worst = {}
    for name, sampler in samplers.items():
        # independent draws: n replicates of the 2 examples in one call (rows are independent estimates)
        n = 400
        feats = GradientFeatures(teacher, sampler, K=1 if name == "grid" else 2, noise="iid", projection=proj)
        est = feats(x.repeat(n, 1, 1, 1), y.repeat(n), torch.Generator().manual_seed(len(name))).reshape(n, 2, d)
        worst[(name, "iid")] = float(((est.mean(0) - ref) / (est.var(0) / n + ref_se**2).sqrt()).abs().max())
    # shared draws (one call per replicate, since every row of a call shares them)
    n = 60
    feats = GradientFeatures(teacher, samplers["stratified+importance"], K=2, noise="crn", projection=proj)
    gen = torch.Generator().manual_seed(99)
    est = torch.stack([feats(x, y, gen) for _ in range(n)])
    worst[("stratified+importance", "crn")] = float(((est.mean(0) - ref) / (est.var(0) / n + ref_se**2).sqrt())
                                                   .abs().max())
    for key, z in worst.items():
        if key[0] == "grid":
            assert z > 8.0, (key, z)  # the quadrature's deterministic error is visible
        else:
            assert z < 4.5, (key, z)


# ---------------------------------------------------------------------------------------------- CRN
def test_common_random_numbers_share_draws_across_examples():
    teacher = tiny_teacher()
    x, y = tiny_data(1)
    x2, y2 = x.repeat(4, 1, 1, 1), y.repeat(4)  # four copies of one example
    sampler = TimestepSampler(T_TINY, stratify="per_upstream")
    crn = GradientFeatures(teacher, sampler, K=3, noise="crn", proj_dim=8)
    _, _, t, eps, w = crn.draw(x2, y2, generator=0)
    assert (t == t[:1]).all() and (eps == eps[:1]).all() and (w == w[:1]).all()
    assert len(set(t[0].tolist())) == 3  # stratified within the shared row
    phi = crn(x2, y2, generator=0)
    torch.testing.assert_close(phi, phi[:1].expand_as(phi))  # identical examples, identical features
    iid = GradientFeatures(teacher, sampler, K=3, noise="iid", projection=crn.projection)
    _, _, t_i, eps_i, _ = iid.draw(x2, y2, generator=0)
    assert not (eps_i == eps_i[:1]).all()
    phi_i = iid(x2, y2, generator=0)
    assert (phi_i - phi_i[:1]).abs().max() > 1e-4
    # the shared draws do not depend on how many examples are drawn at once (the app relies on this)
    _, _, t1, eps1, _ = crn.draw(x, y, generator=0)
    assert torch.equal(t1[0], t[0]) and torch.equal(eps1[0], eps[0])


# ---------------------------------------------------------------------------------------------- metrics
def test_rank_metrics_and_ecm_at_equal_metric():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 40, generator=g)
    assert torch.allclose(spearman(a, a), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(spearman(a, -a), -torch.ones(5, dtype=torch.float64))
    assert torch.allclose(spearman(a, a.exp()), torch.ones(5, dtype=torch.float64))  # rank-based
    assert torch.allclose(topk_overlap(a, a, 10), torch.ones(5, dtype=torch.float64))
    assert float(topk_overlap(a, -a, 10).max()) == 0.0
    # baseline metric = log2(K) / 10, cost = K: the method at K = 4 with the baseline's metric at K = 16 -> 4x
    base = [(K, math.log2(K) / 10, float(K)) for K in (1, 2, 4, 8, 16, 32, 64)]
    ecm, bound = ecm_at_equal_metric(base, 0.4, 4.0)
    assert bound == "=" and ecm == pytest.approx(4.0)
    ecm, bound = ecm_at_equal_metric(base, math.log2(24) / 10, 2.0)  # between budgets: log-linear
    assert bound == "=" and ecm == pytest.approx(12.0, rel=1e-6)
    assert ecm_at_equal_metric(base, 0.9, 4.0) == (16.0, ">=")   # beyond the baseline: a lower bound
    assert ecm_at_equal_metric(base, -0.1, 4.0) == (0.25, "<=")  # below it: an upper bound
    noisy = [(1, 0.1, 1.0), (2, 0.3, 2.0), (4, 0.25, 4.0), (8, 0.5, 8.0)]  # made monotone by a running max
    assert ecm_at_equal_metric(noisy, 0.3, 1.0)[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="query, train"):
        cosine_scores(torch.zeros(2, 3), torch.zeros(4, 5))


def test_harness_reports_and_resumes_per_replicate_metrics(tmp_path):
    calls = []

    def estimate(c, g, meter):
        calls.append(c.key)
        return torch.randn(3, generator=g) / c.K

    def metrics(c, est):
        return {"norm": float(est.norm()), "const": 1.0}

    cfgs = [Config("a", 1, 1), Config("a", 1, 4)]
    rows = measure(cfgs, estimate, torch.zeros(3), 6, state_dir=tmp_path, progress=False, metrics=metrics)
    for r in rows:
        assert r["const"] == 1.0 and r["const_se"] == 0.0 and r["norm"] > 0 and r["norm_se"] > 0
    assert rows[0]["norm"] > rows[1]["norm"]
    n = len(calls)
    again = measure(cfgs, estimate, torch.zeros(3), 6, state_dir=tmp_path, progress=False, metrics=metrics)
    assert len(calls) == n and [r["norm"] for r in again] == [r["norm"] for r in rows]
    plain = measure(cfgs, estimate, torch.zeros(3), 6, progress=False)  # without metrics: rows as before
    assert "norm" not in plain[0]
    # more replicates extend the saved run: only the new ones are computed, and the rows equal a fresh run's
    calls.clear()
    more = measure(cfgs, estimate, torch.zeros(3), lambda c: 9 if c.K == 1 else 6, state_dir=tmp_path,
                   progress=False, metrics=metrics)
    assert sorted(calls) == ["a|R=1|K=1"] * 3
    fresh = measure(cfgs, estimate, torch.zeros(3), lambda c: 9 if c.K == 1 else 6, progress=False, metrics=metrics)
    for a, b in zip(more, fresh, strict=True):
        assert a["n"] == b["n"] and a["variance"] == pytest.approx(b["variance"], rel=1e-12)
        assert a["norm"] == pytest.approx(b["norm"], rel=1e-12)
    calls.clear()
    fewer = measure(cfgs, estimate, torch.zeros(3), 3, state_dir=tmp_path, progress=False, metrics=metrics)
    assert len(calls) == 6 and all(r["n"] == 3 for r in fewer)  # fewer replicates than saved: a fresh run


# ---------------------------------------------------------------------------------------------- end to end
TINY_BENCH = dict(num_train=6, num_test_queries=1, num_sample_queries=1, budgets=[4], baseline_budgets=[2, 8],
                  reference_evals=16, reference_K=8, small_k_replicates=0, pilot_examples=2, pilot_K=4, pilot_bins=5,
                  replicates=3, baseline_factor=2,
                  proj_dim=16, top_k=3, params=["up.7", "norm_out", "conv_out"])


def test_bench_runs_end_to_end_writes_json_and_resumes(tmp_path):
    cfg = AttributionBenchConfig(**TINY_BENCH)
    res = run_attribution_bench(tmp_path / "run", json_path=tmp_path / "r.json", progress=False, cfg=cfg)
    data = json.loads((tmp_path / "r.json").read_text())
    rows = data["rows"]
    assert {r["method"] for r in rows} == {"iid", "grid", "stratified", "stratified+importance", "stratified+learned",
                                           "d-trak", "journey-trak"}
    assert {r["crn"] for r in rows} == {False, True}
    # + D-TRAK (its own seeded noise: CRN) + journey-TRAK (its own fresh noise) + the baseline's extra budgets
    assert len(rows) == 5 * 2 * 1 + 1 + 1 + 2
    assert [r["crn"] for r in rows if r["method"] in ("d-trak", "journey-trak")] == [True, False]
    for r in rows:
        assert set(r) >= {"method", "crn", "budget", "n", "variance", "spearman", "ecm", "ecm_wall"}
        assert -1 <= r["spearman"] <= 1 and r["ecm"] > 0
        assert r["n"] == (3 * 2 if (r["method"], r["crn"]) == ("iid", False) else 3)  # the baseline: baseline_factor x
    learned = [r for r in rows if r["method"] == "stratified+learned"]
    assert all(r["ecm_pilot_bench"] <= r["ecm_pilot_trainset"] <= r["ecm"] for r in learned)  # the pilot charged
    assert data["headline"]["config"]["method"] == "stratified" and data["best_of_n"]["n"] >= 1
    dt = data["dtrak_objective"]["rows"]
    assert {r["method"] for r in dt} == {"iid", "stratified", "d-trak"}
    for f in ("results.json", "metrics.jsonl", "table.md", "variance_vs_k.png", "spearman_vs_k.png", "ecm_vs_k.png",
              "reference.safetensors", "learned_proposal.safetensors", "pilot_grad_norm_vs_t.png"):
        assert (tmp_path / "run" / f).is_file(), f
    assert res["reference"]["evals_per_point"] == 16
    # resume: a rerun loads the reference, the pilot and the measurements instead of recomputing them
    mtime = (tmp_path / "run" / "reference.safetensors").stat().st_mtime_ns
    again = run_attribution_bench(tmp_path / "run", progress=False, cfg=AttributionBenchConfig(**TINY_BENCH))
    assert (tmp_path / "run" / "reference.safetensors").stat().st_mtime_ns == mtime
    assert [r["variance"] for r in again["rows"]] == [r["variance"] for r in res["rows"]]


def test_quick_config_is_a_valid_smoke_run_of_every_kind_of_row():
    """--quick keeps one method of each kind (baseline, strata, learned proposal + pilot, both peers' own draws)
    with independent and shared draws, and D-TRAK's own objective; it drops only same-kind samplers."""
    from carv.bench.attribution import METHODS, QUICK

    cfg = AttributionBenchConfig(**QUICK)
    cfg.validate()
    assert set(METHODS) - set(cfg.methods) == {"grid", "stratified+importance"}
    assert cfg.crn == [False, True] and cfg.dtrak_objective and 4 in cfg.budgets  # the headline's budget


def test_only_rows_names_rows_of_the_configuration_and_keeps_the_baseline():
    from carv.bench.attribution import row_keys

    assert row_keys(["iid", "d-trak", "journey-trak"], [False, True]) == ["iid|indep", "iid|crn", "d-trak|crn",
                                                                          "journey-trak|indep"]
    AttributionBenchConfig(methods=["iid", "stratified"], only_rows=["iid|indep", "stratified|crn"]).validate()
    for bad in (["stratified|crn"], ["iid|indep", "d-trak|indep"], ["iid|indep", "grid|crn"], "iid|indep"):
        with pytest.raises(ValueError, match="only_rows"):
            AttributionBenchConfig(methods=["iid", "stratified", "d-trak"], only_rows=bad).validate()


def test_cli_bench_attribution_passes_flags(monkeypatch, tmp_path):
    import carv.bench.attribution as mod

    seen = {}

    def fake(out, quick, json_path, cfg, command=None):
        seen.update(out=out, quick=quick, json_path=json_path, threads=cfg.threads, num_train=cfg.num_train,
                    command=command)
        return {}

    monkeypatch.setattr(mod, "run_attribution_bench", fake)
    res = CliRunner().invoke(app, ["bench", "attribution", "--quick", "--json", str(tmp_path / "x.json"),
                                   "--out", str(tmp_path / "o"), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert {k: seen[k] for k in ("out", "quick", "json_path", "threads")} == {
        "out": tmp_path / "o", "quick": True, "json_path": tmp_path / "x.json", "threads": 1}
    # --config: a JSON object of AttributionBenchConfig fields, named in the run record's command
    cfg = tmp_path / "c.json"
    cfg.write_text('{"num_train": 12}')
    res = CliRunner().invoke(app, ["bench", "attribution", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert seen["num_train"] == 12 and seen["command"].startswith("carv")  # sys.argv: pytest's here
    cfg.write_text('{"num_trains": 12}')
    res = CliRunner().invoke(app, ["bench", "attribution", "--config", str(cfg)])
    assert res.exit_code != 0 and "num_trains" in res.output


def test_cli_attribute_smoke_resume_and_image_query(tmp_path):
    from PIL import Image

    from carv.apps.attribute import load_query_image
    from carv.teachers.digits import load_digits_data

    runner = CliRunner()
    args = ["--out", str(tmp_path / "run"), "--num-train", "12", "--k", "2", "--top-k", "3"]
    res = runner.invoke(app, ["attribute", "5", *args])
    assert res.exit_code == 0, res.output
    (scores_path,) = (tmp_path / "run").glob("scores_test5_*.json")
    scores = json.loads(scores_path.read_text())
    assert scores["query"]["kind"] == "test" and scores["query"]["test_index"] == 5
    top = scores["top"]
    assert [t["rank"] for t in top] == [1, 2, 3] and all(0 <= t["train_position"] < 12 for t in top)
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    assert (tmp_path / "run" / scores["files"]["grid"]).is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    acc = summary["accounting"]
    assert acc["between"] == 0.0 and acc["within"] > 0 and acc["K"] == 2  # one fixed example: no between part
    assert acc["bound_ecm"] == pytest.approx(1 + acc["cost_upstream_s"] / acc["cost_draw_s"])  # s = 0
    assert f"this pipeline allows at most {acc['bound_ecm']:.2f}x" in res.output
    assert list(summary["queries"].values())[0]["files"] == scores["files"]
    cache = list((tmp_path / "run").glob("train_features_*.safetensors"))
    assert len(cache) == 1
    mtime = cache[0].stat().st_mtime_ns
    # an image query (a test digit written as a 32x32 dark-on-light PNG) reuses the cached training features
    x_te, _ = load_digits_data("test")
    big = torch.nn.functional.interpolate(x_te[5:6], size=(32, 32), mode="bilinear")[0, 0]
    Image.fromarray(((1 - (big.clamp(-1, 1) + 1) / 2) * 255).round().byte().numpy()).save(tmp_path / "q.png")
    q = load_query_image(tmp_path / "q.png")
    assert q.shape == (1, 1, 16, 16) and q.min() >= -1 and q.max() <= 1
    assert torch.corrcoef(torch.stack([q.flatten(), x_te[5].flatten()]))[0, 1] > 0.95  # polarity read correctly
    Image.fromarray(((big.clamp(-1, 1) + 1) / 2 * 255).round().byte().numpy()).save(tmp_path / "q_dark.png")
    q_dark = load_query_image(tmp_path / "q_dark.png")  # light-on-dark (MNIST style) gives the same digit
    torch.testing.assert_close(q_dark, q, atol=5 / 255, rtol=0)  # byte rounding on both sides
    res = runner.invoke(app, ["attribute", str(tmp_path / "q.png"), "--label", "2", *args])
    assert res.exit_code == 0, res.output
    (image_scores,) = (tmp_path / "run").glob("scores_image-q-*.json")
    assert json.loads(image_scores.read_text())["query"]["kind"] == "image"
    assert cache[0].stat().st_mtime_ns == mtime
    # a second test query into the same folder keeps the first one's outputs (issue 25)
    first = scores_path.read_bytes()
    res = runner.invoke(app, ["attribute", "7", *args])
    assert res.exit_code == 0, res.output
    assert scores_path.read_bytes() == first
    assert len(list((tmp_path / "run").glob("scores_*.json"))) == 3
    assert len(list((tmp_path / "run").glob("attribution_*.png"))) == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["queries"]) == 3 and summary["query"]["test_index"] == 7  # every query kept, latest on top


def test_degenerate_query_images_are_warned_about(tmp_path):
    from PIL import Image

    from carv.apps.attribute import DegenerateQueryWarning, load_query_image

    Image.new("L", (1, 1), 0).save(tmp_path / "dot.png")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (16, 16), 128).save(tmp_path / "grey.png")
    for name, what in (("dot", "only 1x1 pixels"), ("clear", "fully transparent"), ("grey", "one flat grey level")):
        with pytest.warns(DegenerateQueryWarning, match=what):
            load_query_image(tmp_path / f"{name}.png")
    img = Image.new("L", (16, 16), 0)
    img.paste(255, (4, 4, 12, 12))
    img.save(tmp_path / "ok.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_query_image(tmp_path / "ok.png")


def test_bad_queries_and_arguments_give_clear_errors(tmp_path):
    from carv.apps.attribute import AttributeConfig, attribute

    runner = CliRunner()
    res = runner.invoke(app, ["attribute", "999", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "test index must be in 0..354, got 999" in res.output
    res = runner.invoke(app, ["attribute", str(tmp_path / "missing.png"), "--out", str(tmp_path)])
    assert res.exit_code != 0 and "no file at" in res.output
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(ValueError, match="image: could not read"):
        attribute(tmp_path / "not_an_image.png", tmp_path, progress=False)
    with pytest.raises(ValueError, match="query: test index"):
        attribute(-1, tmp_path, progress=False)
    with pytest.raises(ValueError, match="method: expected one of"):
        attribute(0, tmp_path, cfg=AttributeConfig(method="sobol"), progress=False)
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match="params: no parameter matches"):
        GradientFeatures(teacher, TimestepSampler(T_TINY), params=["decoder"])
    with pytest.raises(ValueError, match="sampler: has 1000 timesteps"):
        GradientFeatures(teacher, TimestepSampler(1000))
    with pytest.raises(ValueError, match="labels: expected integer labels"):
        GradientFeatures(teacher, TimestepSampler(T_TINY)).draw(torch.zeros(2, 1, 8, 8), torch.zeros(3).long())
    broken = tiny_teacher()
    with torch.no_grad():
        broken.model.conv_out.bias.fill_(float("nan"))
    feats = GradientFeatures(broken, TimestepSampler(T_TINY), K=2, proj_dim=4)
    with pytest.raises(FloatingPointError, match=r"NaN or inf for examples \[0, 1\], whose draws used timesteps"):
        feats(*tiny_data(2), generator=0)
    with pytest.raises(ValueError, match="methods: expected a non-empty subset"):
        AttributionBenchConfig(methods=["iid", "sobol"]).validate()
    with pytest.raises(ValueError, match="reference_evals: must be a multiple"):
        AttributionBenchConfig(reference_evals=1000).validate()


# ---------------------------------------------------------------------------------------------- dattri
def test_mc_loss_plugs_into_dattri_attribution_task():
    dattri_task = pytest.importorskip("dattri.task")
    teacher = tiny_teacher()
    x, y = tiny_data(3)
    feats = GradientFeatures(teacher, TimestepSampler(T_TINY, stratify="per_upstream"), K=4, noise="crn",
                             proj_dim=None)
    batch = feats.draw(x, y, generator=0)
    model = copy.deepcopy(teacher.model).requires_grad_(True)  # dattri takes the parameters that need grad
    task = dattri_task.AttributionTask(loss_func=feats.mc_loss, model=model, checkpoints=model.state_dict())
    flat, _ = task.get_param()
    grads = task.get_grad_loss_func(in_dims=(None, 0))(flat, batch)  # dattri's vmap(grad) over examples
    torch.testing.assert_close(grads, feats.gradients(batch), rtol=1e-5, atol=1e-7)
    losses = torch.stack([task.get_loss_func()(flat, tuple(b[i] for b in batch)) for i in range(3)])
    assert losses.shape == (3,) and torch.isfinite(losses).all()


# ------------------------------------------------------------------------------------ D-TRAK as it is
def test_dtrak_timesteps_are_its_range():
    """sail-sg/D-TRAK grad_unconditional.py, t_strategy "uniform": range(0, 1000, 1000 // K)."""
    from carv.objectives.attribution import dtrak_timesteps

    assert dtrak_timesteps(1).tolist() == [0]  # t = 0 at K = 1, not a midpoint
    assert dtrak_timesteps(4).tolist() == [0, 250, 500, 750]
    assert dtrak_timesteps(10).tolist() == list(range(0, 1000, 100))
    assert dtrak_timesteps(16).tolist() == list(range(0, 1000, 62))  # 17 timesteps at K = 16
    assert len(dtrak_timesteps(64)) == len(range(0, 1000, 15)) == 67
    with pytest.raises(ValueError, match="K"):
        dtrak_timesteps(0)


def test_dtrak_noise_is_seeded_per_timestep_and_batch_position():
    """For each timestep t, one randn of the batch from seed e_seed * 1000 + t: the example at batch position j
    gets row j in every batch; rerunning gives the same draws; another e_seed gives others."""
    from carv.objectives.attribution import dtrak_draws

    x0, y = tiny_data(n=5)
    _, _, t, eps, w = dtrak_draws(x0, y, K=4, num_timesteps=1000, e_seed=3, batch_size=2)
    assert t.tolist() == [[0, 250, 500, 750]] * 5
    assert torch.all(w == 1.0)
    for k, tk in enumerate([0, 250, 500, 750]):
        rows = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3 * 1000 + tk))
        for j in range(5):
            assert torch.equal(eps[j, k], rows[j % 2])
    assert torch.equal(eps[0], eps[2]) and torch.equal(eps[0], eps[4]) and not torch.equal(eps[0], eps[1])
    again = dtrak_draws(x0, y, K=4, num_timesteps=1000, e_seed=3, batch_size=2)[3]
    other = dtrak_draws(x0, y, K=4, num_timesteps=1000, e_seed=4, batch_size=2)[3]
    assert torch.equal(eps, again) and not torch.equal(eps, other)
    _, _, t16, _, w16 = dtrak_draws(x0, y, K=16, num_timesteps=1000)
    assert t16.shape == (5, 17) and torch.allclose(w16, torch.full_like(w16, 17 / 16))  # sum / K


# ------------------------------------------------------------------------------------ journey-TRAK as it is
def test_journey_trak_timesteps_and_noise_as_its_featurizer_makes_them():
    """MadryLab/journey-TRAK examples/featurize_cifar10.py: np.random.choice(np.arange(0, 1000), size=[batch, K],
    replace=True), i.e. K iid uniform timesteps per example (none shared), and one fresh randn noise per example and
    timestep (modelout_functions.py, vmap randomness="different"); weights 1 (its sum over timesteps / K)."""
    from carv.objectives.attribution import JOURNEY_TRAK_NUM_TIMESTEPS, journey_trak_draws

    assert JOURNEY_TRAK_NUM_TIMESTEPS == 5  # TrakConfig.num_timesteps
    x0, y = tiny_data(n=5)
    _, _, t, eps, w = journey_trak_draws(x0, y, K=4, num_timesteps=1000, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same stream, in its order: timesteps first, then the noise
    assert torch.equal(t, torch.randint(0, 1000, (5, 4), generator=g))
    assert torch.equal(eps, torch.randn(5, 4, 1, 8, 8, generator=g))
    assert t.dtype == torch.long and torch.all(w == 1.0)
    assert not torch.equal(t[0], t[1]) and not torch.equal(eps[0, 0], eps[1, 0])  # nothing shared across examples
    seven, again, eight = (journey_trak_draws(x0, y, K=4, generator=s)[3] for s in (7, 7, 8))  # a seed is a stream
    assert torch.equal(seven, again) and not torch.equal(seven, eight)
    # repeated timesteps are allowed (replace=True): with K = 64 draws out of T = 20 some repeat in every row
    _, _, t64, _, _ = journey_trak_draws(x0, y, K=64, num_timesteps=20, generator=0)
    assert all(len(set(row.tolist())) < 64 for row in t64)
    # uniform on 0..T-1: 2000 x 50 draws over T = 20, every count within 5 sigma of 5000 (binomial sd 68.9)
    xs = torch.zeros(2000, 1, 2, 2)
    _, _, tt, _, _ = journey_trak_draws(xs, torch.zeros(2000, dtype=torch.long), K=50, num_timesteps=20, generator=1)
    counts = torch.bincount(tt.flatten(), minlength=20).double()
    assert counts.numel() == 20 and torch.all((counts - 5000).abs() < 5 * math.sqrt(1e5 * 0.05 * 0.95))
    _, _, tr, _, _ = journey_trak_draws(x0, y, K=8, num_timesteps=1000, generator=0, start_tstep=100, end_tstep=200)
    assert int(tr.min()) >= 100 and int(tr.max()) < 200
    with pytest.raises(ValueError, match="end_tstep"):
        journey_trak_draws(x0, y, K=4, num_timesteps=1000, end_tstep=1001)
    with pytest.raises(ValueError, match="K"):
        journey_trak_draws(x0, y, K=0)


def test_journey_trak_output_is_the_unweighted_mse_loss():
    """Its output function is F.mse_loss(noise_pred, noise): the bench's journey-trak features use weighting
    "uniform" whatever the bench's weighting, so one draw's loss is that mse (no w(t))."""
    from carv.bench.attribution import AttributionBenchConfig, AttributionProblem

    prob = AttributionProblem.__new__(AttributionProblem)  # only the feature factory is exercised
    teacher = tiny_teacher()
    prob.cfg = AttributionBenchConfig(weighting="sds", params="all", max_batch=64)
    prob.teacher, prob.T, prob.learned, prob._features = teacher, T_TINY, None, {}
    prob.projection = GradientFeatures(teacher, TimestepSampler(T_TINY), proj_dim=4).projection
    f = prob.features("journey-trak", False)
    x0, y = tiny_data(n=1)
    t = torch.tensor([12])
    eps = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    got = f.draw_loss(f.params, x0[0], y[0], t[0], eps[0])
    params = {n: p.detach() for n, p in teacher.model.named_parameters()}
    want = torch.nn.functional.mse_loss(
        torch.func.functional_call(teacher.model, params, (teacher.schedule.add_noise(x0, t, eps), t, y)), eps)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    weighted = prob.features("iid", False).draw_loss(f.params, x0[0], y[0], t[0], eps[0])
    assert float(weighted) != pytest.approx(float(want), rel=1e-3)  # the bench's own rows keep w(t)


def test_dtrak_output_is_the_squared_norm_of_the_model_output():
    """output="squared_norm" differentiates ||eps_theta(x_t, t, c)||^2 / D (no target, no weighting)."""
    teacher = tiny_teacher()
    x0, y = tiny_data(n=1)
    f = GradientFeatures(teacher, TimestepSampler(T_TINY), output="squared_norm", proj_dim=None, weighting="sds")
    t = torch.tensor([7])
    eps = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in teacher.model.named_parameters()}
    got = f.draw_loss(f.params, x0[0], y[0], t[0], eps[0])
    x_t = teacher.schedule.add_noise(x0, t, eps)
    want = torch.func.functional_call(teacher.model, params, (x_t, t, y)).pow(2).mean()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    with pytest.raises(ValueError, match="output"):
        GradientFeatures(teacher, TimestepSampler(T_TINY), output="l2")
