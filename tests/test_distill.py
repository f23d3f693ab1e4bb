"""One-step distillation (distribution matching): the gradient equals its definition on an analytic case,
the generator step moves samples toward the teacher, the CLI and resume work, bad configs fail clearly.

Statistical checks: the mean of independent replicates must match a quadrature reference within
Z = 4 standard errors per coordinate (fixed seeds; a false alarm has probability < 1e-4 per coordinate).
"""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from carv import TimestepSampler, VPSchedule, weight_table
from carv.objectives.dmd import DenoisingLoss, DistributionMatching
from carv.teachers import GaussianMixtureTeacher
from carv.teachers.unet import CompactUNet, save_unet_teacher

Z = 4.0
T = 100  # a short schedule keeps the exact sum over t cheap
SCHED = VPSchedule.from_betas(1e-3, 0.2, T)
REAL = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.5], [1.0, 1.0]]), 0.3, torch.tensor([0.6, 0.4]), SCHED)
FAKE = GaussianMixtureTeacher(torch.tensor([[0.2, -0.4], [1.5, 0.0]]), 0.5, None, SCHED)
X = torch.tensor([[0.3, -0.2], [1.5, 0.8], [-0.7, -1.1]])
COND = torch.tensor([0, 1, 1])


def reference(weighting: str, guidance_scale: float = 1.0, cond=None, nodes: int = 32) -> torch.Tensor:
    """E_{t ~ U(0..T-1)} E_eps [w (eps_real - eps_fake)] by an exact sum over t and 2-D Gauss-Hermite over eps."""
    z, wz = np.polynomial.hermite_e.hermegauss(nodes)
    wz = wz / math.sqrt(2 * math.pi)
    e = torch.tensor(np.stack(np.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2))
    we = torch.tensor(np.outer(wz, wz).reshape(-1))
    table = None if weighting == "dmd" else weight_table(weighting, SCHED)
    out = torch.zeros(X.shape, dtype=torch.float64)
    chunk = 50
    for r in range(X.shape[0]):
        for t0 in range(0, T, chunk):
            t = torch.arange(t0, t0 + chunk).repeat_interleave(e.shape[0])
            ee = e.repeat(chunk, 1)
            a, s = SCHED.a(t, torch.float64)[:, None], SCHED.s(t, torch.float64)[:, None]
            xt = a * X[r].double() + s * ee
            c = None if cond is None else cond[r].expand(t.shape[0])
            er = REAL.guided_eps(xt, t, c, guidance_scale).double()
            ef = FAKE.guided_eps(xt, t, c, 1.0).double()
            if table is None:
                w = 1.0 / (er - ee).abs().mean(1, keepdim=True)
            else:
                w = table[t][:, None]
            f = w * (er - ef) * we.repeat(chunk)[:, None]
            out[r] += f.sum(0) / T
    return out


def replicate(dmd, n, seed, cond=None):
    """``n`` independent estimates for every point of X, as the rows of one call (rows draw independently
    with iid or per-upstream stratified timesteps)."""
    c = None if cond is None else cond.repeat(n)
    return dmd(X.repeat(n, 1), c, torch.Generator().manual_seed(seed)).grad.double().reshape(n, *X.shape)


def assert_unbiased(reps, ref):
    mean, se = reps.mean(0), reps.std(0) / math.sqrt(reps.shape[0])
    z = ((mean - ref) / se).abs()
    assert float(z.max()) < Z, f"max |z| = {float(z.max()):.2f}; mean {mean}, ref {ref}, se {se}"


def test_gradient_matches_definition_sds_weighting_with_guidance():
    ref = reference("sds", guidance_scale=2.0, cond=COND)
    dmd = DistributionMatching(REAL, FAKE, TimestepSampler(T), K=1, weighting="sds", guidance_scale=2.0)
    assert_unbiased(replicate(dmd, 4000, 0, COND), ref)
    # the same expectation through reuse + importance sampling + stratification
    sampler = TimestepSampler(T, importance=weight_table("sds", SCHED), floor=0.1, stratify="per_upstream")
    dmd = DistributionMatching(REAL, FAKE, sampler, K=8, weighting="sds", guidance_scale=2.0)
    assert_unbiased(replicate(dmd, 1000, 1, COND), ref)


def test_dmd_normalisation_is_its_definition_per_draw():
    """Each weighted draw is v(t) (eps_real - eps_fake) / mean|eps_real - eps| (DMD's normalisation in noise space).
    (Its unbiasedness is the shared machinery tested above; in 2-D the normalised draws have a heavy tail,
    so a replicate test would be slow to converge.)"""
    sampler = TimestepSampler(T, importance=weight_table("sds", SCHED), floor=0.2, stratify="global")
    dmd = DistributionMatching(REAL, FAKE, sampler, K=8, weighting="dmd", guidance_scale=1.5)
    out = dmd(X, COND, generator=4, keep_draws=True)
    t, eps = out.draws.t.reshape(-1), out.draws.eps.reshape(-1, 2)
    xt = SCHED.add_noise(X.repeat_interleave(8, 0), t, eps)
    c = COND.repeat_interleave(8)
    er, ef = REAL.guided_eps(xt, t, c, 1.5), FAKE.guided_eps(xt, t, c, 1.0)
    f = out.draws.weight.reshape(-1, 1) * (er - ef) / (er - eps).abs().mean(1, keepdim=True)
    torch.testing.assert_close(out.estimate.draws.reshape(-1, 2), f)
    torch.testing.assert_close(out.grad, f.reshape(3, 8, 2).mean(1))


def test_surrogate_loss_backpropagates_the_estimate():
    x = X.clone().requires_grad_(True)
    dmd = DistributionMatching(REAL, FAKE, TimestepSampler(T, stratify="per_upstream"), K=4, weighting="sds")
    out = dmd(x, generator=3)
    out.loss.backward()
    torch.testing.assert_close(x.grad, out.grad / X.shape[0])
    assert out.estimate.within is not None and out.estimate.between is not None


def test_identical_scores_give_zero_gradient():
    dmd = DistributionMatching(REAL, REAL, TimestepSampler(T), K=4, weighting="dmd")
    assert torch.equal(dmd(X, generator=0).grad, torch.zeros_like(X))


def test_generator_steps_move_samples_toward_the_teacher():
    """A Gaussian generator x = mu + exp(log_sig) z, with the exact fake score of its own distribution:
    descending the DMD gradient moves mu and sigma to the teacher's (a single Gaussian N(m, 0.3^2))."""
    m, s_real = torch.tensor([[1.0, -0.5]]), 0.3
    real = GaussianMixtureTeacher(m, s_real, None, SCHED)
    mu = torch.nn.Parameter(torch.tensor([-1.0, 1.0]))
    log_sig = torch.nn.Parameter(torch.tensor(math.log(1.0)))
    opt = torch.optim.Adam([mu, log_sig], lr=0.03)
    g = torch.Generator().manual_seed(0)
    sampler = TimestepSampler(T, t_min=2, t_max=98, stratify="per_upstream")
    dist0 = float((mu.detach() - m[0]).norm())
    for _ in range(150):
        fake = GaussianMixtureTeacher(mu.detach()[None], float(log_sig.detach().exp()), None, SCHED)
        dmd = DistributionMatching(real, fake, sampler, K=4, weighting="dmd")
        x = mu + log_sig.exp() * torch.randn(16, 2, generator=g)
        opt.zero_grad()
        dmd(x, generator=g).loss.backward()
        opt.step()
    assert float((mu.detach() - m[0]).norm()) < 0.1 * dist0
    assert abs(float(log_sig.detach().exp()) - s_real) < 0.1


def test_denoising_loss_is_the_weighted_eps_mse():
    net = torch.nn.Linear(2, 2)
    loss_fn = DenoisingLoss(SCHED, TimestepSampler(T, importance=weight_table("sds", SCHED), floor=0.3))
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    d = loss_fn.estimator.draw(6, (2,), generator=5)
    expect = (d.weight[:, 0] * (net(SCHED.add_noise(x, d.t[:, 0], d.eps[:, 0])) - d.eps[:, 0]).pow(2).mean(1)).mean()
    got = loss_fn(lambda xt, t, c: net(xt), x, None, generator=5)
    torch.testing.assert_close(got, expect)


def test_bad_objective_arguments_are_named():
    other = GaussianMixtureTeacher(torch.zeros(1, 2), 0.3, None, VPSchedule.from_betas(1e-4, 0.02, 500))
    with pytest.raises(ValueError, match="fake_score"):
        DistributionMatching(REAL, other, TimestepSampler(T))
    with pytest.raises(TypeError, match="fake_score"):
        DistributionMatching(REAL, object(), TimestepSampler(T))
    with pytest.raises(ValueError, match="weighting"):
        DistributionMatching(REAL, FAKE, TimestepSampler(T), weighting="fancy")
    with pytest.raises(ValueError, match="guidance_scale"):
        DistributionMatching(REAL, FAKE, TimestepSampler(T), guidance_scale=-1)
    with pytest.raises(ValueError, match="sampler"):
        DistributionMatching(REAL, FAKE, TimestepSampler(1000))
    with pytest.raises(ValueError, match="x"):
        DistributionMatching(REAL, FAKE, TimestepSampler(T))(torch.zeros(3))


# ---------------------------------------------------------------------------------------------- the app
@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny random-weight digits-shaped teacher (fast), saved like the committed one."""
    with torch.random.fork_rng():  # leave the global RNG as other test modules expect it
        torch.manual_seed(0)
        net = CompactUNet(in_channels=1, base_channels=4, channel_mults=(1, 2), cond_classes=(10,))
        for p in net.parameters():  # non-zero output layer, so the scores are not identically 0
            if p.abs().sum() == 0:
                p.data.normal_(0, 0.05)
    sched = VPSchedule.from_betas(1e-4, 0.02, 1000)
    path = tmp_path_factory.mktemp("teacher") / "tiny.safetensors"
    save_unet_teacher(path, net, sched)
    from carv.teachers.digits import load_digits_teacher

    return path, load_digits_teacher(path=path)


def tiny_cfg(**kw):
    from carv.apps.distill import DistillConfig

    base = dict(steps=4, R=2, K=2, fake_batch=4, fake_warmup=2, eval_every=2, eval_per_class=3, grid_every=2,
                checkpoint_steps=[0, 4], threads=1)
    return DistillConfig(**{**base, **kw})


@pytest.mark.parametrize("refresh", [1, 3])
def test_resume_continues_bit_for_bit(tmp_path, tiny_teacher, refresh):
    """Stopped at step 2 and resumed: the same run as the uninterrupted one, also when the learned statistics
    have moved since the last refresh (every 3 steps: the table in use is restored, not rebuilt)."""
    from carv.apps.distill import Distiller, run_distill

    _, teacher = tiny_teacher
    cfg = tiny_cfg(proposal="learned", stratify="per_upstream", proposal_refresh=refresh)
    run_distill(tmp_path / "straight", cfg, progress=False, teacher=teacher)
    half = tiny_cfg(proposal="learned", stratify="per_upstream", proposal_refresh=refresh, steps=2)
    run_distill(tmp_path / "resumed", half, progress=False, teacher=teacher)
    res = run_distill(tmp_path / "resumed", cfg, progress=False, teacher=teacher)  # 'steps' may change on resume
    assert res["steps"] == 4
    from carv._runfolder import RunState

    a, b = Distiller(cfg, teacher), Distiller(cfg, teacher)
    a.load_state(RunState(tmp_path / "straight").load())
    b.load_state(RunState(tmp_path / "resumed").load())
    for pa, pb in zip(a.generator.parameters(), b.generator.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.equal(a.learned.m2, b.learned.m2) and torch.equal(a.sampler.q, b.sampler.q)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4]
    assert (tmp_path / "resumed" / "checkpoints" / "step_000004.safetensors").is_file()
    with pytest.raises(ValueError, match="different config"):
        run_distill(tmp_path / "resumed", tiny_cfg(K=4), progress=False, teacher=teacher)


def test_checkpoint_round_trip_gives_the_same_gradient(tmp_path, tiny_teacher):
    from carv.apps.distill import Distiller

    _, teacher = tiny_teacher
    a = Distiller(tiny_cfg(), teacher)
    a.step()
    a.save_checkpoint(tmp_path / "c.safetensors")
    b = Distiller(tiny_cfg(), teacher)
    info = b.load_checkpoint(tmp_path / "c.safetensors")
    assert info["step"] == 1
    ga = a.parameter_gradient(a.dmd, 3, torch.Generator().manual_seed(1))
    gb = b.parameter_gradient(b.dmd, 3, torch.Generator().manual_seed(1))
    assert ga.abs().sum() > 0 and torch.equal(ga, gb)


def test_fake_catch_up_is_the_fake_score_updates_the_next_step_starts_with(tiny_teacher):
    """A benchmark measuring the generator gradient at a checkpoint first makes the next step's fake-score updates
    (Distiller.fake_catch_up): the same updates as the step's own (same weights after), the generator untouched."""
    import copy

    from carv.apps.distill import Distiller

    _, teacher = tiny_teacher
    a = Distiller(tiny_cfg(fake_updates=2), teacher)
    a.step()
    b = copy.deepcopy(a)
    gen = [p.detach().clone() for p in b.generator.parameters()]
    fake = [p.detach().clone() for p in b.fake.model.parameters()]
    assert math.isfinite(b.fake_catch_up())
    assert all(torch.equal(p, q) for p, q in zip(b.generator.parameters(), gen, strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(b.fake.model.parameters(), fake, strict=True))
    a.step()  # its fake updates, then its generator update
    assert all(torch.equal(p, q) for p, q in zip(a.fake.model.parameters(), b.fake.model.parameters(), strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(a.generator.parameters(), gen, strict=True))
    c = Distiller(tiny_cfg(fake_updates=0), teacher)
    before = [p.detach().clone() for p in c.fake.model.parameters()]
    assert math.isnan(c.fake_catch_up())
    assert all(torch.equal(p, q) for p, q in zip(c.fake.model.parameters(), before, strict=True))


def test_cli_distill_smoke(tmp_path, tiny_teacher):
    from carv.cli import app

    path, _ = tiny_teacher
    out = tmp_path / "run"
    (tmp_path / "cfg.json").write_text(json.dumps({"fake_batch": 4, "K": 8, "eval_per_class": 3}))
    res = CliRunner().invoke(app, ["distill", "--out", str(out), "--teacher", str(path), "--steps", "2", "--R", "2",
                                   "--K", "2", "--stratify", "per_upstream", "--fake-warmup", "1",
                                   "--eval-every", "1", "--grid-every", "1", "--checkpoint-steps", "0,2",
                                   "--config", str(tmp_path / "cfg.json")])
    assert res.exit_code == 0, res.output
    for f in ("config.json", "metrics.jsonl", "carv-run.json", "checkpoint-0000002.safetensors", "final.safetensors",
              "quality.png",
              "samples/step_000002.png", "checkpoints/step_000000.safetensors"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "config.json").read_text())
    assert saved["K"] == 2 and saved["fake_batch"] == 4  # flags override the JSON config
    acc = json.loads((out / "summary.json").read_text())["accounting"]
    assert (acc["R"], acc["K"]) == (2, 2) and acc["bound_ecm"] > 1.0
    s, rho = acc["between"] / (acc["between"] + acc["within"]), acc["cost_upstream_s"] / acc["cost_draw_s"]
    assert acc["bound_ecm"] == pytest.approx((1 + rho) / (math.sqrt(s * rho) + math.sqrt(1 - s)) ** 2)
    assert f"this pipeline allows at most {acc['bound_ecm']:.2f}x over the plain estimator" in res.output
    bad = CliRunner().invoke(app, ["distill", "--out", str(tmp_path / "b"), "--teacher", str(path),
                                   "--proposal", "weight"])
    assert bad.exit_code != 0 and "proposal" in bad.output
    assert "--quick" in CliRunner().invoke(app, ["bench", "distill", "--help"]).output


def test_bench_json_schema(tmp_path, tiny_teacher):
    from carv.bench.distill import BenchSettings, bench_distill

    _, teacher = tiny_teacher
    # 2 s per run, so that one step (warm-up included) does not cross both the middle and the end mark even on a loaded
    # machine (then the middle checkpoint is the end one and is measured once: the test below)
    s = BenchSettings(seeds=[0, 1], budget_s=2.0, eval_every_s=1.0, eval_per_class=3, replicates=2, max_replicates=4,
                      reference_estimates=2, reference_R=4, pilot_estimates=1, carv_K=2)
    res = bench_distill(tmp_path / "bench", json_path=tmp_path / "out.json", progress=False, settings=s,
                        base=tiny_cfg(fake_warmup=1), teacher=teacher)
    data = json.loads((tmp_path / "out.json").read_text())
    assert {r["config"] for r in data["rows"]} == {"R8K1", "R8K4", "R8K16", "R8K16+strat", "R8K16+is+strat",
                                                  "R8K16+strat+upstream"}
    assert data["headline"]["config"]["method"] == "R8K16+is+strat" and data["best_of_n"]["n"] == 5 * 3
    assert "proposal pilot (amortised)" in data["headline"]["charged"]
    assert {"predicted", "measured", "z"} <= set(data["diagnostics"]["start"]["k4_check"])
    for r in data["rows"]:  # replicate counts for a stated relative error: the K = 1 baseline's is 5%
        assert r["rel_error"] == pytest.approx(0.05 if r["config"] == "R8K1" else 0.1)
    assert {r["checkpoint"] for r in data["rows"]} == {"start", "middle", "end"}
    for r in data["rows"]:
        assert {"config", "checkpoint", "R", "K", "variance", "cost_s", "ecm"} <= set(r)
    assert {q["method"] for q in data["quality"]} == {"baseline", "carv"}
    assert {"fd", "accuracy", "time_s", "seed"} <= set(data["quality"][0])
    assert res["carv_K"] == 2
    for f in ("variance.png", "quality.png", "table.md", "train/baseline_seed0/checkpoints/end.safetensors"):
        assert (tmp_path / "bench" / f).is_file(), f


def test_bench_measures_a_middle_checkpoint_that_is_the_end_once(tmp_path, tiny_teacher, monkeypatch):
    """When the step that crosses the middle mark also crosses the end (the warm-up, charged to the run, took the
    budget: what the earlier --quick did), the two checkpoints are the same weights: measured once, as 'end'. That
    checkpoint, saved after a generator update, is measured with the fake score caught up (the state the next
    step's gradient is taken at); the start checkpoint, warmed on its own generator, as it is."""
    import carv.bench.distill as bd
    from carv.apps.distill import Distiller
    from carv.bench.distill import BenchSettings, bench_distill

    caught, inside = [], []
    rows, catch_up = bd._checkpoint_rows, Distiller.fake_catch_up

    def measured(d, label, *a, **kw):
        inside.append(label)
        try:
            return rows(d, label, *a, **kw)
        finally:
            inside.pop()

    def caught_up(self):
        if inside:
            caught.append((inside[-1], self.step_count))
        return catch_up(self)

    monkeypatch.setattr(bd, "_checkpoint_rows", measured)
    monkeypatch.setattr(Distiller, "fake_catch_up", caught_up)
    _, teacher = tiny_teacher
    s = BenchSettings(seeds=[0], budget_s=1e-4, eval_every_s=5e-5, eval_per_class=2, replicates=2, max_replicates=2,
                      reference_estimates=2, reference_R=4, pilot_estimates=1, carv_K=2, fake_warmup=3)
    res = bench_distill(tmp_path / "bench", progress=False, settings=s, base=tiny_cfg(), teacher=teacher)
    assert [label for label, _ in caught] == ["end"] and caught[0][1] > 0
    assert res["base_config"]["fake_warmup"] == 3  # the settings' warm-up replaces the app's
    assert res["checkpoints"] == ["start", "end"] and "middle" not in res["diagnostics"]
    assert "middle checkpoint is the end" in res["diagnostics"]["end"]["middle_is_end"]
    assert BenchSettings.quick().fake_warmup < 100 and len(BenchSettings.quick().seeds) >= 2  # a paired SE


def test_bench_start_checkpoint_only(tmp_path, tiny_teacher):
    """BenchSettings(train=False) (``carv bench distill --config`` with ``{"train": false}``): the start
    checkpoint's rows with their headline and best-of-N, no training runs and no quality rows."""
    from carv.bench.distill import BenchSettings, bench_distill

    _, teacher = tiny_teacher
    s = BenchSettings(seeds=[0], replicates=2, max_replicates=3, reference_estimates=2, reference_R=4,
                      pilot_estimates=1, train=False)
    res = bench_distill(tmp_path / "bench", progress=False, settings=s, base=tiny_cfg(fake_warmup=1), teacher=teacher,
                        config_path="cfg.json")
    assert res["checkpoints"] == ["start"] and {r["checkpoint"] for r in res["rows"]} == {"start"}
    assert res["quality"] == [] and not (tmp_path / "bench" / "train" / "baseline_seed0" / "metrics.jsonl").exists()
    assert res["headline"]["config"]["method"] == "R8K16+is+strat" and res["best_of_n"]["n"] == 5
    assert res["headline"]["metric"] == "ecm_step" and res["headline"]["se"] is not None  # bootstrap error bar
    assert res["command"].endswith("--config cfg.json")


def test_bad_configs_are_named():
    from carv.apps.distill import DistillConfig

    for kw, name in ((dict(K=0), "K"), (dict(R=-1), "R"), (dict(proposal="oracle"), "proposal"),
                     (dict(stratify="grid"), "stratify"), (dict(weighting="fancy"), "weighting"),
                     (dict(proposal="weight"), "proposal"), (dict(t_min=500, t_max=100), "t_min"),
                     (dict(generator_lr=0), "generator_lr"), (dict(noise="antithetic", K=3), "K"),
                     (dict(fake_updates=-1), "fake_updates"), (dict(time_budget_s=-5), "time_budget_s"),
                     (dict(betas=(0.9, 1.5)), "betas"), (dict(checkpoint_steps=[-1]), "checkpoint_steps")):
        with pytest.raises(ValueError, match=name):
            DistillConfig(**kw).validate()
    with pytest.raises(ValueError, match="unknown field"):
        DistillConfig.from_dict({"K": 2, "Kay": 3})


def test_equal_time_interleaving_advances_runs_together():
    from carv.bench.distill import interleave_equal_time, time_marks

    class Run:
        def __init__(self, cost):
            self.cost, self.compute_s, self.steps = cost, 0.0, 0

        def step(self):
            self.compute_s += self.cost
            self.steps += 1

    runs = {"cheap": Run(1.0), "costly": Run(2.5)}
    seen = []
    interleave_equal_time(runs, 10.0, time_marks(10.0, 5.0), lambda k, r, crossed: seen.append((k, r.compute_s)),
                          progress=False)
    assert runs["cheap"].steps == 10 and runs["costly"].steps == 4
    # whichever run steps has spent the least so far: the compute clocks never drift more than one step apart
    clocks = {"cheap": 0.0, "costly": 0.0}
    for k, c in seen:
        other = "costly" if k == "cheap" else "cheap"
        assert c - runs[k].cost <= clocks[other] + 1e-9
        clocks[k] = c


def test_fresh_after_an_interrupted_fresh_run_never_resumes_the_old_run(tmp_path, tiny_teacher, monkeypatch):
    """Issue 11, case 1: `--fresh` moves the old run aside before writing; if the fresh run is interrupted, the
    next plain rerun of it continues the *fresh* run, and the old run (complete) is kept beside the folder."""
    from carv._runfolder import RunFolderError
    from carv.apps.distill import Distiller, run_distill

    _, teacher = tiny_teacher
    out = tmp_path / "D"
    run_distill(out, tiny_cfg(R=3), progress=False, teacher=teacher)  # the old run: finished, R = 3
    fresh_cfg = tiny_cfg(R=2)
    step = Distiller.step

    def interrupted(self):
        if self.step_count == 3:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Distiller, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_distill(out, fresh_cfg, progress=False, teacher=teacher, fresh=True)
    monkeypatch.setattr(Distiller, "step", step)
    old = [p for p in tmp_path.iterdir() if p.name.startswith("D.old-")]
    assert len(old) == 1 and (old[0] / "final.safetensors").is_file()  # the old run, whole
    assert not (out / "final.safetensors").exists() and not (out / "samples" / "step_000004.png").exists()
    with pytest.raises(RunFolderError, match=r"R: 2 -> 3.*--fresh"):  # the old settings no longer resume here
        run_distill(out, tiny_cfg(R=3), progress=False, teacher=teacher)
    res = run_distill(out, fresh_cfg, progress=False, teacher=teacher)
    assert res["steps"] == 4
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [0, 2, 4]


@pytest.mark.usefixtures("one_thread")
def test_parameter_components_predict_the_generator_gradient_variance(tiny_teacher):
    """A distillation probe's components are those of the generator-parameter gradient: averaged over probes,
    ``(sigma_b^2 + sigma_w^2 / K) / R`` equals the replicate variance of :meth:`Distiller.parameter_gradient` at
    the same ``(R, K)`` within 4 standard errors (both SEs from the samples; a wrong factor of R = 2 is about
    14 SE off at this count); R = 1 is refused, naming R."""
    from carv.apps.distill import Distiller

    _, teacher = tiny_teacher
    d = Distiller(tiny_cfg(), teacher)
    d.warmup()
    R, K, n = 2, 4, 60
    obj = d.make_objective(d.make_sampler("none", "none"), K)
    g = torch.Generator().manual_seed(3)
    gs = torch.stack([d.parameter_gradient(obj, R, g) for _ in range(n)]).double()
    sq = (gs - gs.mean(0)).pow(2).sum(1) * n / (n - 1)
    var, var_se = float(sq.mean()), float(sq.std() / n**0.5)
    comps = [d.parameter_components(obj, R, g) for _ in range(n)]
    pred = torch.tensor([(c.between + c.within / K) / R for c in comps], dtype=torch.float64)
    z = (float(pred.mean()) - var) / math.hypot(var_se, float(pred.std() / n**0.5))
    assert abs(z) < 4, (float(pred.mean()), var, z)
    with pytest.raises(ValueError, match="R"):
        d.parameter_components(obj, 1, g)


def test_reuse_ceiling_bounds_the_between_part_of_a_stratified_estimator():
    """``f(u, t) = u + t`` with ``u ~ N(0, 1)`` per sample and ``K`` stratified draws of ``t ~ U[0, 1)``: the
    between part is exactly ``Var(u) = 1`` and the stratified within part ``1 / (12 K^3)`` falls faster than
    ``1 / K``. From replicate rows at ``K = 4`` and ``16`` the floor must not exceed the true between part (by
    more than its error) and must sit close to it; with iid-like ``1 / K`` rows the algebra is exact."""
    from carv.bench.distill import reuse_ceiling

    exact = [{"R": 1, "K": k, "variance": 1.0 + 0.5 / k, "variance_se": 0.0} for k in (1, 4, 16)]
    c = reuse_ceiling(*exact)
    assert c["between_floor"] == pytest.approx(1.0) and c["ceiling"] == pytest.approx(1.5)
    assert c["reduction_at_4k"] == pytest.approx(1.5 / (1 + 0.5 / 16))

    g = torch.Generator().manual_seed(3)
    n = 20000

    def row(k):
        u = torch.randn(n, 1, generator=g, dtype=torch.float64)
        t = (torch.arange(k, dtype=torch.float64) + torch.rand(n, k, generator=g, dtype=torch.float64)) / k
        est = (u + t).mean(1)
        v = est.var().item()
        return {"R": 1, "K": k, "variance": v, "variance_se": v * math.sqrt(2 / (n - 1))}

    rows = [row(1), row(4), row(16)]
    c = reuse_ceiling(*rows)
    true_floor = 1.0 + (4 / (12 * 16**3) - 1 / (12 * 4**3)) / 3  # what the formula gives with exact variances
    assert true_floor < 1.0  # strata: the bound is conservative (the floor is below the between part)
    assert abs(c["between_floor"] - true_floor) < 4 * c["between_floor_se"]
    assert c["between_floor"] < 1.0 + 3 * c["between_floor_se"]
    assert c["ceiling"] > 0 and c["ceiling_se"] > 0
    with pytest.raises(ValueError, match="v_k, v_4k"):
        reuse_ceiling(rows[0], rows[1], rows[1])
    below = reuse_ceiling(exact[0], {**exact[1], "variance": 1.0}, {**exact[2], "variance": 0.2})
    assert below["ceiling"] is None  # a floor at or below 0 bounds nothing


def test_bench_upstream_strata_measures_the_reuse_ceiling(tmp_path, tiny_teacher):
    from carv.bench.distill import UPSTREAM_CONFIGS, BenchSettings, bench_upstream_strata

    _, teacher = tiny_teacher
    s = BenchSettings(seeds=[0], replicates=2, max_replicates=2, reference_estimates=2, reference_R=4,
                      pilot_estimates=1)
    res = bench_upstream_strata(tmp_path / "up", tmp_path / "up.json", s, tiny_cfg(fake_warmup=1), teacher,
                                progress=False)
    assert {r["config"] for r in res["rows"]} == set(UPSTREAM_CONFIGS)
    c = res["diagnostics"]["reuse_ceiling_with_upstream_strata"]
    assert {"between_floor", "between_floor_se", "ceiling", "reduction_at_4k"} <= set(c)
    assert json.loads((tmp_path / "up.json").read_text())["upstream_strata"]["rows"] == res["rows"]
