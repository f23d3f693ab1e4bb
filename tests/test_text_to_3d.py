"""Text-to-3D app and benchmark: score distillation improves the scene, the CLI runs and resumes, errors are clear.

Tiny configurations (16-24^3 grids, 32 px renders, 16 samples per ray) with the committed scenes teacher.
"""

import dataclasses
import functools
import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

from carv.apps.text_to_3d import SceneProblem, TextTo3DConfig, Trainer, run_text_to_3d, text_to_3d_from_cli
from carv.bench.compare import compare_text_to_3d
from carv.bench.text_to_3d import BenchSettings, binned_resampler_update, equal_quality_ecm, predicted_best_ecm
from carv.cli import app
from carv.render.cameras import cameras_from_angles
from carv.teachers.scenes import load_scenes_teacher, teacher_cond
from carv.timesteps import SecondMomentResampler

runner = CliRunner()
TINY = dict(grid_resolution=16, render_size=32, n_samples=16, n_eval_views=4, eval_every_s=1e6)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@functools.lru_cache(maxsize=1)
def _teacher():
    return load_scenes_teacher()


def _metrics(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_few_sds_steps_lower_the_distance_to_the_ground_truth():
    """30 steps of the carv estimator move the renders of 8 held-out views towards the ground truth.

    Deterministic (fixed seeds, fixed K): the colour MSE must fall by at least 20% from the blob start."""
    cfg = TextTo3DConfig(prompt="a red mushroom", steps=30, R=2, K=2, lr=0.1, seed=0,
                         **{**TINY, "n_eval_views": 8, "grid_resolution": 24})
    problem = SceneProblem(cfg.prompt, _teacher(), cfg.render_size, cfg.n_samples, cfg.guidance_scale, 8)
    trainer = Trainer(cfg, None, problem)
    before = trainer.evaluate()
    while not trainer.done:
        trainer.step()
    after = trainer.evaluate()
    assert after["mse"] < 0.8 * before["mse"], (before, after)
    assert after["iou"] > before["iou"]


def test_cli_runs_a_tiny_config_and_resumes_after_interruption(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["text-to-3d", "a snowman", "--out", str(out), "--steps", "3", "--K", "2", "--checkpoint-every", "2",
            "--grid-resolution", "16", "--render-size", "32", "--n-samples", "16", "--threads", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    for f in ("config.json", "metrics.jsonl", "turntable.png", "comparison.png", "quality_vs_time.png",
              "k_and_proposal.png", "checkpoint-0000003.safetensors", "carv-run.json", "summary.json"):
        assert (out / f).is_file(), f
    # the newest two checkpoints are kept (the older one is the fallback if the newest is damaged)
    assert sorted(p.name for p in out.glob("checkpoint-*.safetensors")) == [
        "checkpoint-0000002.safetensors", "checkpoint-0000003.safetensors"]
    # rerun with more steps: it continues from the checkpoint at step 3 instead of restarting
    res = runner.invoke(app, [*args[:5], "5", *args[6:]])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 3 and summary["steps"] == 5
    assert [r["step"] for r in _metrics(out / "metrics.jsonl") if r["kind"] == "step"] == [1, 2, 3, 4, 5]


def _killed_and_rerun(monkeypatch, out, cfg, teacher, at_call: int) -> dict:
    """Run ``cfg`` into ``out``, killed (KeyboardInterrupt) at the ``at_call``-th step, then rerun it to the end."""
    calls, real_step = {"n": 0}, Trainer.step

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_text_to_3d(cfg.prompt, out, cfg, progress=False, teacher=teacher)
    monkeypatch.setattr(Trainer, "step", real_step)
    return run_text_to_3d(cfg.prompt, out, cfg, progress=False, teacher=teacher)


def test_evaluations_by_steps_come_at_the_same_steps_on_any_machine_and_after_a_resume(tmp_path, monkeypatch):
    """``eval_every`` (steps) evaluates at step 0, every multiple and the last step whatever a step costs, and a run
    killed and rerun keeps the cadence; --compare evaluates every steps / 20 by default (its steps-to-quality
    reading needs 9 or more evaluations per run) unless told otherwise."""
    from carv.apps.text_to_3d import config_from_cli

    cfg = TextTo3DConfig(prompt="a snowman", steps=7, K=2, checkpoint_every=4, seed=3, **{**TINY, "eval_every": 3})
    teacher = _teacher()
    run_text_to_3d("a snowman", tmp_path / "full", cfg, progress=False, teacher=teacher)
    steps = [r["step"] for r in _metrics(tmp_path / "full" / "metrics.jsonl") if r["kind"] == "eval"]
    assert steps == [0, 3, 6, 7]
    _killed_and_rerun(monkeypatch, tmp_path / "cut", cfg, teacher, at_call=6)
    assert [r["step"] for r in _metrics(tmp_path / "cut" / "metrics.jsonl") if r["kind"] == "eval"] == steps
    assert config_from_cli(None, {}, compare=True).eval_every == 20
    assert config_from_cli(None, {"steps": 100}, compare=True).eval_every == 5
    assert config_from_cli(None, {"eval_every_s": 2.0}, compare=True).eval_every is None  # the user's cadence
    assert config_from_cli(None, {}).eval_every is None  # the main job: by seconds, as before
    with pytest.raises(ValueError, match="eval_every: expected a positive number of steps"):
        TextTo3DConfig(eval_every=0).validate()


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    """A run killed after step 3 (last checkpoint at step 2) and rerun ends bit-identical to an uninterrupted run."""
    cfg = TextTo3DConfig(prompt="a snowman", steps=4, K=2, checkpoint_every=2, seed=3, **TINY)
    teacher = _teacher()
    full = run_text_to_3d("a snowman", tmp_path / "full", cfg, progress=False, teacher=teacher)

    resumed = _killed_and_rerun(monkeypatch, tmp_path / "cut", cfg, teacher, at_call=4)
    assert resumed["resumed_from"] == 2
    assert [r["step"] for r in _metrics(tmp_path / "cut" / "metrics.jsonl") if r["kind"] == "step"] == [1, 2, 3, 4]
    a = Trainer(cfg, tmp_path / "full", teacher=teacher)
    b = Trainer(cfg, tmp_path / "cut", teacher=teacher)
    assert torch.equal(a.grid.density, b.grid.density) and torch.equal(a.grid.color, b.grid.color)
    assert full["final"]["psnr"] == pytest.approx(resumed["final"]["psnr"], abs=1e-9)


def test_compare_at_equal_per_step_compute_runs_carv_at_r1_with_charged_probes(tmp_path):
    """--compare (equal per-step compute): both runs make the same steps; the baseline runs R = 2, K = 1, carv
    starts at R = 1 with the allocator, its probe steps run at R, K >= 2 on iid cameras, the rest on the camera
    lattice; the allocator's budget is the baseline's measured step cost, and its re-choices, the lattice and the
    curves are saved."""
    cfg = TextTo3DConfig(prompt="a snowman", steps=12, probe_every=4, accountant_every=4, k_init=4,
                         checkpoint_every=6, **TINY)
    res = compare_text_to_3d("a snowman", tmp_path / "c", cfg, progress=False, teacher=_teacher())
    assert res["steps"] == {"carv": 12, "baseline": 12} and res["compare_at"] == "step"
    rows = [r for r in _metrics(tmp_path / "c" / "carv" / "metrics.jsonl") if r["kind"] == "step"]
    probes = [r for r in rows if r["probe"]]
    assert [r["step"] for r in probes] == [1, 5, 9]
    assert all(r["R"] >= 2 and r["K"] >= 2 for r in probes)
    assert rows[1]["R"] == 1 and rows[1]["K"] == 4  # an ordinary step before the first re-choice
    hist = res["allocator_history"]
    assert hist and hist[-1]["budget"] is not None
    base = [r for r in _metrics(tmp_path / "c" / "baseline" / "metrics.jsonl") if r["kind"] == "step"]
    assert all(r["R"] == 2 and r["K"] == 1 for r in base)
    for f in ("turntables.png", "quality_vs_steps.png", "quality_vs_seconds.png"):
        assert (tmp_path / "c" / f).is_file(), f
    from carv._runfolder import RunState

    meta = RunState(tmp_path / "c" / "carv").load()[1]  # the newest checksummed checkpoint's state
    assert meta["allocator"]["steps"] == 12 and meta["upstream"]["count"] > 0
    assert set(res["steps_ratio_equal_quality"]) == {"psnr", "iou"}


def test_compare_gives_the_baseline_its_own_learning_rate(tmp_path):
    """``baseline_lr`` (``--baseline-lr``) sets the baseline's Adam rate in --compare, carv keeps ``lr``; a decay to
    ``lr_end`` keeps its ratio for the baseline; None leaves both at ``lr``."""
    from carv.bench.compare import baseline_lr_fields as _baseline_lr

    assert _baseline_lr(TextTo3DConfig(lr=0.2)) == {}
    assert _baseline_lr(TextTo3DConfig(lr=0.2, lr_end=0.05, baseline_lr=0.1)) == pytest.approx(
        {"lr": 0.1, "lr_end": 0.025, "baseline_lr": None})
    cfg = TextTo3DConfig(prompt="a snowman", steps=2, K=2, lr=0.2, baseline_lr=0.05, **TINY)
    compare_text_to_3d("a snowman", tmp_path / "c", cfg, progress=False, teacher=_teacher())
    lrs = {m: json.loads((tmp_path / "c" / m / "config.json").read_text())["lr"] for m in ("carv", "baseline")}
    assert lrs == {"carv": 0.2, "baseline": 0.05}


def test_bad_prompts_and_flags_give_clear_errors(tmp_path):
    res = runner.invoke(app, ["text-to-3d", "a flying car", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
    text = " ".join(res.output.replace("│", " ").split())  # the error box wraps lines
    assert "a flying car" in text and "allowed prompts" in text and "a snowman" in text
    for flags, needle in ((["--baseline", "--K", "4"], "baseline"), (["--baseline", "--compare"], "compare"),
                          (["--render-size", "40"], "render_size"), (["--proposal", "oracle"], "proposal"),
                          (["--stratify", "grid"], "stratify"), (["--R", "9"], "r_max"), (["--steps", "0"], "steps"),
                          (["--step-budget", "lots"], "step_budget"), (["--upstream", "sobol"], "upstream"),
                          (["--compare", "--compare-at", "flops"], "compare_at"),
                          (["--t-lo", "0.6"], "t_lo"), (["--t-hi-end", "1.5"], "end[1]"),
                          (["--sparsity", "-1"], "sparsity_weight"), (["--lr", "0"], "lr"),
                          (["--baseline-lr", "0.2"], "baseline_lr"),
                          (["--compare", "--baseline-lr", "-0.1"], "baseline_lr")):
        res = runner.invoke(app, ["text-to-3d", "a snowman", "--out", str(tmp_path / "y"), *flags])
        assert res.exit_code != 0, flags
        assert needle in res.output.replace("│", " "), (flags, res.output)
    with pytest.raises(ValueError, match="flags: unknown"):
        text_to_3d_from_cli("a snowman", tmp_path / "z", {"step": 3})
    with pytest.raises(ValueError, match="budget_s"):
        TextTo3DConfig(budget_s=-1.0).validate()


def test_resuming_with_another_configuration_is_refused(tmp_path):
    cfg = TextTo3DConfig(prompt="a snowman", steps=1, K=2, **TINY)
    run_text_to_3d("a snowman", tmp_path, cfg, progress=False, teacher=_teacher())
    with pytest.raises(ValueError, match="different configuration.*lr"):
        Trainer(dataclasses.replace(cfg, lr=0.5), tmp_path, teacher=_teacher())
    Trainer(dataclasses.replace(cfg, steps=9), tmp_path, teacher=_teacher())  # more steps: fine


def test_resuming_with_other_teacher_weights_is_refused(tmp_path):
    """A run folder records its teacher's weights digest: after the teacher file changes (retrained weights under
    the same name) the same command refuses to continue, naming ``teacher_weights``, in the manifest and in the
    checkpoint. The digest sees a single changed parameter and nothing else."""
    import copy

    from carv.teachers.unet import weights_digest

    teacher = _teacher()
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.model.parameters()).view(-1)[0] += 1e-3
    assert weights_digest(copy.deepcopy(teacher)) == weights_digest(teacher) != weights_digest(other)
    cfg = TextTo3DConfig(prompt="a snowman", steps=1, K=2, **TINY)
    run_text_to_3d("a snowman", tmp_path, cfg, progress=False, teacher=teacher)
    with pytest.raises(ValueError, match="different configuration.*teacher_weights"):
        run_text_to_3d("a snowman", tmp_path, dataclasses.replace(cfg, steps=2), progress=False, teacher=other)
    with pytest.raises(ValueError, match="different configuration.*teacher_weights"):
        Trainer(dataclasses.replace(cfg, steps=2), tmp_path, teacher=other)
    Trainer(dataclasses.replace(cfg, steps=2), tmp_path, teacher=teacher)  # the same weights: resumes


# ----------------------------------------------------------------------------- benchmark pieces
def test_equal_quality_ecm_interpolates_first_crossings():
    base = [{"elapsed_s": t, "psnr": q} for t, q in ((0, 10.0), (10, 14.0), (20, 16.0), (30, 16.0))]
    fast = [{"elapsed_s": t, "psnr": q} for t, q in ((0, 10.0), (10, 18.0), (20, 19.0))]
    slow = [{"elapsed_s": t, "psnr": q} for t, q in ((0, 10.0), (30, 12.0))]
    r = equal_quality_ecm(base, fast, window=1)
    assert r["target"] == 16.0 and r["t_base_s"] == 20.0 and r["t_method_s"] == pytest.approx(7.5)
    assert r["ecm"] == pytest.approx(20.0 / 7.5)
    r = equal_quality_ecm(base, slow, window=1)
    assert r["ecm"] is None and r["upper_bound"] == pytest.approx(20.0 / 30.0)
    # smoothed (trailing mean of 2): base -> 10, 12, 15, 16; fast -> 10, 14, 18.5: crossing at 10 + 10 * 2 / 4.5
    r = equal_quality_ecm(base, fast, window=2, align="trailing")
    assert r["target"] == 16.0 and r["t_base_s"] == 30.0 and r["ecm"] == pytest.approx(30.0 / (10 + 20 / 4.5))
    # centred: the same averages at 0, 5, 15, 25 (base) and 0, 5, 15 (fast): base reaches 16 at 25, fast 16 at
    # 5 + 10 * 2 / 4.5
    r = equal_quality_ecm(base, fast, window=2)
    assert r["align"] == "center" and r["t_base_s"] == 25.0 and r["ecm"] == pytest.approx(25.0 / (5 + 20 / 4.5))
    with pytest.raises(ValueError, match="align"):
        equal_quality_ecm(base, fast, align="middle")


def test_centred_smoothing_reads_the_true_ratio_where_a_trailing_one_is_pulled_to_1():
    """Two straight lines, the method twice as steep, evaluated every 50 steps to step 400, window 3: the
    method reaches any level in half the steps, and the centred reading says 2.00x; the trailing average
    delays the method's crossing by one interval but not the baseline's (its own final is its target), 1.78x."""
    base = [{"step": t, "elapsed_s": t, "psnr": t / 10} for t in range(0, 401, 50)]
    fast = [{"step": t, "elapsed_s": t, "psnr": t / 5} for t in range(0, 401, 50)]
    centred = equal_quality_ecm(base, fast, window=3, x="step")
    assert centred["target"] == pytest.approx(35.0) and centred["t_base_s"] == pytest.approx(350.0)
    assert centred["ecm"] == pytest.approx(2.0)
    trailing = equal_quality_ecm(base, fast, window=3, x="step", align="trailing")
    assert trailing["t_base_s"] == 400.0 and trailing["ecm"] == pytest.approx(400 / 225)


def test_predicted_best_ecm_follows_the_cost_model():
    comps = {"uniform": (1.0, 9.0), "importance+stratified": (1.0, 4.0)}
    # free renders: reuse cannot help, only the smaller within component does (K = 1 is best)
    ecm, k = predicted_best_ecm(comps, 1e-9, 16)
    assert k == 1 and ecm == pytest.approx(10.0 / 5.0, rel=1e-6)
    # expensive renders (c_up = 100 c_draw): K* = sqrt(100 * 4 / 1) = 20, ECM = 10 * 101 / ((1 + 4/20) * 120)
    ecm, k = predicted_best_ecm(comps, 100.0, 64)
    assert k == 20 and ecm == pytest.approx(1010.0 / 144.0)


def test_binned_resampler_fills_every_bin_from_stratified_warmup():
    res = SecondMomentResampler(50, history=2)
    t = torch.arange(0, 1000, 20).repeat(2)  # one draw in each of 50 bins, twice
    binned_resampler_update(res, t, torch.ones(100), 1000)
    assert res.ready and torch.allclose(res.importance(), torch.ones(50, dtype=torch.float64))
    # on the objective's support (t in 20..500, 481 values the bins do not divide): stratified draws of twice
    # the bins per render fill every bin, and the table maps back to length T with zeros outside the support
    from carv.bench.text_to_3d import binned_importance
    from carv.timesteps import TimestepSampler
    res = SecondMomentResampler(50, history=10)
    samp = TimestepSampler(1000, 20, 500, stratify="per_upstream")
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        t = samp.sample(1, 100, generator=g).t
        binned_resampler_update(res, t, (t.double() - 20) / 481 + 1, 1000, (20, 500))
    assert res.ready
    table = binned_importance(res.importance(), 1000, (20, 500))
    assert table.shape == (1000,) and table[:20].eq(0).all() and table[501:].eq(0).all() and table[20:501].gt(0).all()
    assert table[499] > table[21]  # the loss grows with t, and so does its second moment
    with pytest.raises(ValueError, match="warmup_K, resampler_bins"):
        BenchSettings(warmup_K=30).validate()
    with pytest.raises(ValueError, match="Rs, Ks"):
        BenchSettings(Rs=(1, 4)).validate()


def test_quick_settings_are_a_smoke_run_whose_warmup_fills_the_peer_resampler():
    """--quick: the headline's snapshot only, no cost sweep, a baseline row, and a warm-up (warmup_steps x warmup_R
    renders of warmup_K stratified draws) that gives every bin of improved-diffusion's resampler its history on the
    objective's supports (the full range and the annealed ends), so that the smoke run does not stop 'not warmed up'."""
    from carv.timesteps import TimestepSampler

    q = BenchSettings.quick()
    q.validate()
    assert q.smoke and q.snapshots == ("middle",) and q.cost_settings == () and 2 in q.Rs and 1 in q.Ks
    assert max(q.Ks) <= q.k_max < BenchSettings().k_max and len(q.quality_prompts) * len(q.quality_seeds) == 1
    for support in ((20, 980), (20, 400), (20, 500)):
        res = SecondMomentResampler(q.resampler_bins, history=q.resampler_history)
        samp = TimestepSampler(1000, *support, stratify="per_upstream")
        g = torch.Generator().manual_seed(0)
        for _ in range(q.warmup_steps):
            t = samp.sample(q.warmup_R, q.warmup_K, generator=g).t
            binned_resampler_update(res, t, torch.ones(t.numel()), 1000, support)
        assert res.ready, support


def test_component_probe_recovers_parameter_space_components():
    """ComponentProbe (carv.accounting): two vector-Jacobian products of one R x K batch give unbiased
    parameter-space components. Linear upstream x_r = W_r theta (W_r random per sample, the 'camera'),
    f_rk = m_r + e_rk; the truth is computed from the same model. Mean of 600 probes within 4 standard errors."""
    from carv.accounting import ComponentProbe

    g = torch.Generator().manual_seed(0)
    P, D, R, K, sb, se = 5, 12, 3, 4, 0.7, 1.3
    theta = torch.randn(P, dtype=torch.float64, generator=g).requires_grad_(True)
    mu = torch.randn(D, dtype=torch.float64, generator=g)
    probe = ComponentProbe(R, K)
    est_b, est_w, gr_all = [], [], []
    for _ in range(600):
        W = torch.randn(R, D, P, dtype=torch.float64, generator=g)
        x = torch.einsum("rdp,p->rd", W, theta)
        m = mu + sb * torch.randn(R, D, dtype=torch.float64, generator=g)
        f = m[:, None, :] + se * torch.randn(R, K, D, dtype=torch.float64, generator=g)
        u, h = probe.cotangents(f, g)
        ju = torch.autograd.grad(x, theta, u, retain_graph=True)
        jh = torch.autograd.grad(x, theta, h)
        b, w = probe.components(ju, jh)
        est_b.append(b)
        est_w.append(w)
        gr_all.append(torch.einsum("rdp,rd->rp", W, f.mean(1)))
    # truth: within = E||W^T e-mean||^2 * K = se^2 E||W||_F^2 = se^2 D P; Var(g_r) from the samples themselves
    w_true = se**2 * D * P
    gr = torch.cat(gr_all)
    total_true = float(gr.var(0).sum())  # Var(g_r) = sigma_b^2 + sigma_w^2 / K (sampling error ~1%)
    b_true = total_true - w_true / K
    for est, truth in ((est_w, w_true), (est_b, b_true)):
        t = torch.tensor(est)
        assert abs(t.mean() - truth) < 4 * t.std() / len(est) ** 0.5 + 0.02 * truth, (float(t.mean()), truth)
    with pytest.raises(ValueError, match="K: the within"):
        ComponentProbe(2, 1)
    with pytest.raises(ValueError, match="values: expected shape"):
        probe.cotangents(torch.zeros(2, 4, 3))


def test_measure_times_estimates_with_the_given_clock():
    """carv.bench.harness.measure(clock=...): the text-to-3D benchmark charges CPU seconds (process_time)."""
    from carv.bench.harness import Config, measure

    ticks = iter(range(10_000))
    rows = measure([Config("a", 1, 1), Config("a", 1, 2)], lambda c, g, m: torch.randn(3, generator=g),
                   torch.zeros(3), 3, progress=False, clock=lambda: float(next(ticks)) * 0.5)
    assert [r["cost_s"] for r in rows] == [0.5, 0.5]
    with pytest.raises(ValueError, match="clock"):
        BenchSettings(clock="gpu").validate()


def test_resume_drops_the_evaluation_taken_after_the_checkpoint(tmp_path):
    """Rows logged after the checkpoint (an evaluation at the checkpoint's step, later steps, a partial last
    line of a killed run) are dropped on resume: that work is redone, and each row appears once."""
    from carv._runfolder import RunState

    st = RunState(tmp_path)
    st.start()
    ev0 = {"kind": "eval", "step": 0, "elapsed_s": 0.0, "psnr": 15.0}
    rows = [ev0, {"kind": "step", "step": 1}, {"kind": "step", "step": 2}]
    for r in rows:
        st.append(r)
    st.save(2, {"x": torch.zeros(1)}, {"step": 2})
    for r in ({"kind": "eval", "step": 2, "elapsed_s": 20.5, "psnr": 17.0}, {"kind": "step", "step": 3}):
        st.append(r)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "st')  # the partial last line of a killed run
    again = RunState(tmp_path)
    _, state = again.load()
    assert state == {"step": 2} and again.rows == rows
    assert [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows


def test_equal_step_compute_counts_unreached_pairs_at_their_bound():
    from carv.bench.text_to_3d import equal_step_compute

    def curve(vals, dt):
        return [{"step": 10 * i, "elapsed_s": dt * i, "psnr": v, "iou": v / 20} for i, v in enumerate(vals)]

    base, fast = curve([10, 12, 14, 16, 18, 18, 18, 18, 18], 1.0), curve([10, 16, 18, 19, 19, 19, 19, 19, 19], 1.1)
    sm = {"compare_at": "step", "prompt": "a snowman", "seed": 1, "steps": {"carv": 80, "baseline": 80},
          "train_seconds": {"carv": 6.6, "baseline": 6.0},
          "steps_ratio_equal_quality": {k: equal_quality_ecm(base, fast, k, x="step") for k in ("psnr", "iou")},
          "ecm_equal_quality": {k: equal_quality_ecm(base, fast, k) for k in ("psnr", "iou")}}
    never = {**sm, "steps_ratio_equal_quality": {k: equal_quality_ecm(base, curve([10] * 9, 1.0), k, x="step")
                                                 for k in ("psnr", "iou")},
             "ecm_equal_quality": {k: equal_quality_ecm(base, curve([10] * 9, 1.0), k) for k in ("psnr", "iou")}}
    res = equal_step_compute([sm, never])
    assert res["n_pairs"] == 4 and res["n_unreached"] == 2
    reached = [p for p in res["pairs"] if p["reached"]]
    assert all(p["carv_steps"] < p["baseline_steps"] for p in reached)
    assert all(p["carv_steps"] == 80 for p in res["pairs"] if not p["reached"])  # at the bound
    with pytest.raises(ValueError, match="summaries"):
        equal_step_compute([{**sm, "compare_at": "wall-clock"}])
    # a run evaluated too few times for the reading (a fast machine at 20 s between evaluations) is refused, named
    sparse = {**sm, "steps_ratio_equal_quality": {k: equal_quality_ecm(base[::2], fast[::2], k, x="step")
                                                  for k in ("psnr", "iou")}}
    assert not sparse["steps_ratio_equal_quality"]["psnr"]["readable"]
    with pytest.raises(ValueError, match=r"'a snowman' seed 1 has 5 evaluations.*eval_every_s"):
        equal_step_compute([sm, sparse])


def test_steps_to_quality_needs_evaluations_spanning_the_run():
    """The target is the baseline's final 3-evaluation average: with fewer than 9 evaluations it spans over a quarter
    of the run and the reading follows the evaluation interval, so the result says it cannot be read; the compare
    command's line then names the count and the --eval-every-s that fixes it."""
    from carv.bench.compare import _reading
    from carv.bench.quality import min_evaluations

    assert min_evaluations(3) == 9 and min_evaluations(1) == 1
    base = [{"step": t, "elapsed_s": t, "psnr": t / 10} for t in range(0, 401, 50)]  # 9 evaluations
    fast = [{"step": t, "elapsed_s": t, "psnr": t / 5} for t in range(0, 401, 50)]
    dense = equal_quality_ecm(base, fast, window=3, x="step")
    assert dense["readable"] and dense["evaluations"] == [9, 9] and dense["ecm"] == pytest.approx(2.0)
    cfg = TextTo3DConfig(steps=400)
    assert _reading(dense, cfg, 44.0, 400) == "2.00x"
    sparse = equal_quality_ecm(base[::2], fast[::2], window=3, x="step")  # 5 evaluations: 0, 100, ..., 400
    assert not sparse["readable"] and sparse["evaluations"] == [5, 5]
    line = _reading(sparse, cfg, 44.0, 400)  # the shorter run's training seconds, over 2 x 9 evaluations
    assert line.startswith("not read: 5 evaluations, the reading needs 9") and "--eval-every-s 2.4)" in line
    by_steps = _reading(sparse, dataclasses.replace(cfg, eval_every=100), 44.0, 400)
    assert "every 100 steps; rerun with --fresh --eval-every 22)" in by_steps


def test_the_variance_ceiling_refuses_to_read_a_sparsely_evaluated_baseline(tmp_path):
    """The ceiling's reading smooths over 3 evaluations, so a baseline evaluated 4 times in 400 steps (a fast machine
    at the app's 20 s between evaluations) would move the figure by itself: one line naming the folder, the count and
    the flag that fixes it; a dense curve passes the check."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def write(folder, steps):
        folder.mkdir(parents=True)
        rows = [{"kind": "eval", "step": s, "elapsed_s": s / 10, "psnr": 15 + s / 100, "iou": 0.5 + s / 1000}
                for s in steps]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(tmp_path / "oracle" / "oracle-a-red-mushroom-s0-S400", range(0, 401, 20))
    (tmp_path / "oracle" / "oracle-a-red-mushroom-s0-S400" / "summary.json").write_text(
        json.dumps({"steps": 400, "train_seconds": 400.0}))

    def run(compare_steps):
        c = tmp_path / "compare" / "a-red-mushroom-s0-S400"
        for arm in ("baseline", "carv"):
            write(c / arm, compare_steps)
        (c / "summary.json").write_text(json.dumps({"seconds_per_step": {"baseline": 0.116, "carv": 0.11},
                                                    "train_seconds": {"baseline": 46.4, "carv": 44.0}}))
        return subprocess.run([sys.executable, str(root / "benchmarks" / "equal_step_ceiling.py"), "--root",
                               str(tmp_path / "oracle"), "--compare-root", str(tmp_path / "compare"), "--report-only"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root / "src")},
                              timeout=120)

    sparse = run([0, 175, 345, 400])
    last = sparse.stderr.strip().splitlines()[-1]
    assert sparse.returncode == 2 and "Traceback" not in sparse.stderr
    assert "a-red-mushroom-s0-S400" in last and "has 4 evaluations" in last
    assert "--eval-every-s (here about 2.4)" in last  # the shorter run's 44 s of training over 2 x 9
    shutil.rmtree(tmp_path / "compare")
    dense = run(range(0, 401, 25))
    assert dense.returncode == 0, dense.stderr


def test_equal_step_budget_sweep_reads_steps_off_the_shortest_run_that_reaches_the_target():
    """Runs of 100, 200 and 400 steps per (prompt, seed): the target is the baseline's 400-step final, each
    estimator's steps are the interpolated first crossing of its final-vs-length curve, an unreached carv
    curve enters at 400, and seconds use the pooled per-step medians."""
    from carv.bench.text_to_3d import equal_step_budget_sweep

    def run(prompt, seed, n, base, carv, s_base=0.10, s_carv=0.12):
        return {"compare_at": "step", "prompt": prompt, "seed": seed, "steps": {"carv": n, "baseline": n},
                "train_seconds": {"carv": n * s_carv, "baseline": n * s_base},
                "seconds_per_step": {"carv": s_carv, "baseline": s_base},
                "final": {"baseline": {"psnr": base, "iou": base / 40}, "carv": {"psnr": carv, "iou": carv / 40}}}

    fast = [run("a snowman", 0, 100, 18.0, 19.0), run("a snowman", 0, 200, 19.0, 20.5),
            run("a snowman", 0, 400, 20.0, 21.0)]
    never = [run("a snowman", 1, n, b, 15.0) for n, b in ((100, 18.0), (200, 19.0), (400, 20.0))]
    res = equal_step_budget_sweep(fast + never)
    assert res["n_pairs"] == 4 and res["n_unreached"] == 2
    p = next(p for p in res["pairs"] if p["seed"] == 0 and p["metric"] == "psnr")
    assert p["target"] == 20.0 and p["baseline_steps"] == pytest.approx(400.0)
    assert p["carv_steps"] == pytest.approx(100 + 100 * (20.0 - 19.0) / (20.5 - 19.0))  # between 100 and 200
    assert p["baseline_seconds"] == pytest.approx(400 * 0.10) and p["carv_seconds"] == pytest.approx(
        p["carv_steps"] * 0.12)
    q = next(p for p in res["pairs"] if p["seed"] == 1 and p["metric"] == "psnr")
    assert not q["reached"] and q["carv_steps"] == 400.0  # at its bound: ratio 1, an upper bound
    ratios = [p["baseline_steps"] / p["carv_steps"] for p in res["pairs"]]
    assert res["steps_ratio_geomean"] == pytest.approx(math.exp(sum(map(math.log, ratios)) / 4))
    assert res["steps_ratio_log_se_across_runs"] > 0
    alone = equal_step_budget_sweep(fast + [run("a duck", 0, 400, 20.0, 21.0)])
    assert alone["skipped"] == [{"prompt": "a duck", "seed": 0, "lengths": [400]}]  # one length: no curve
    running = equal_step_budget_sweep(fast + never[:2], lengths=(100, 200, 400))  # seed 1 lacks its 400 steps
    assert running["skipped"] == [{"prompt": "a snowman", "seed": 1, "lengths": [100, 200]}]
    assert running["n_pairs"] == 2 and all(p["seed"] == 0 for p in running["pairs"])
    with pytest.raises(ValueError, match="stopped early"):
        equal_step_budget_sweep([{**fast[0], "steps": {"carv": 100, "baseline": 60}}])
    with pytest.raises(ValueError, match="compare_at"):
        equal_step_budget_sweep([{**fast[0], "compare_at": "wall-clock"}])


def test_log_spread_is_the_standard_error_of_the_groups_log_geomeans():
    from carv.bench.text_to_3d import geomean, log_spread

    g, se = log_spread({"a": [2.0, 8.0], "b": [1.0], "empty": []})
    assert g == {"a": pytest.approx(4.0), "b": pytest.approx(1.0)}  # an empty group is left out
    assert se == pytest.approx(math.log(2.0))  # logs ln 4 and 0: sd ln 4 / sqrt 2, over sqrt 2
    assert log_spread({"a": [3.0]})[1] is None
    assert geomean([2.0, 8.0, None, 0.0]) == pytest.approx(4.0) and geomean([]) is None


def test_the_annealed_timestep_range_is_the_samplers_support_at_every_step():
    """t_hi moves linearly from 0.98 to 0.5 over anneal_steps = 4 and then stays; every draw of a step lies
    inside that step's range, and the importance proposal is restricted to it (q = 0 outside)."""
    cfg = TextTo3DConfig(prompt="a red mushroom", steps=6, R=2, K=4, seed=0, t_lo=0.02, t_hi=0.98, t_lo_end=0.02,
                         t_hi_end=0.5, anneal_steps=4, **TINY)
    trainer = Trainer(cfg, None, SceneProblem(cfg.prompt, _teacher(), cfg.render_size, cfg.n_samples,
                                              cfg.guidance_scale, 4))
    sampler = trainer.sds.sampler
    drawn = []
    real_sample = sampler.sample
    sampler.sample = lambda *a, **k: drawn.append(real_sample(*a, **k)) or drawn[-1]
    want_hi = [980, 860, 740, 620, 500, 500]
    for n in range(cfg.steps):
        trainer.step()
        assert (sampler.t_min, sampler.t_max) == (20, want_hi[n]) == cfg.t_range(n)
        t = drawn[-1].t
        assert int(t.min()) >= 20 and int(t.max()) <= want_hi[n]
        assert float(sampler.q[:20].sum()) == 0.0 and float(sampler.q[want_hi[n] + 1:].sum()) == 0.0
    with pytest.raises(ValueError, match="t_lo_end, t_hi_end"):
        TextTo3DConfig(t_lo_end=None).validate()
    with pytest.raises(ValueError, match="t_lo"):
        TextTo3DConfig(t_lo=0.7, t_hi=0.5).validate()


def test_learning_rate_decays_geometrically_and_adam_uses_it_at_every_step():
    """lr_end = lr / 16 over anneal_steps = 4: the rate halves every step (0.1, 0.05, 0.025, ...), then stays at
    lr_end; the Adam step the trainer takes uses that step's rate (the grid moves by at most it per element)."""
    cfg = TextTo3DConfig(prompt="a red mushroom", steps=6, R=2, K=2, seed=0, lr=0.1, lr_end=0.1 / 16,
                         anneal_steps=4, **TINY)
    want = [0.1, 0.05, 0.025, 0.0125, 0.00625, 0.00625]
    assert [cfg.lr_at(n) for n in range(6)] == pytest.approx(want, rel=1e-12)
    assert TextTo3DConfig().lr_at(10**6) == TextTo3DConfig().lr == 0.1  # no decay by default
    trainer = Trainer(cfg, None, SceneProblem(cfg.prompt, _teacher(), cfg.render_size, cfg.n_samples,
                                              cfg.guidance_scale, 4))
    for n in range(cfg.steps):
        before = torch.cat([trainer.grid.density.detach().flatten(), trainer.grid.color.detach().flatten()])
        trainer.step()
        assert trainer.opt.param_groups[0]["lr"] == pytest.approx(want[n], rel=1e-12)
        after = torch.cat([trainer.grid.density.detach().flatten(), trainer.grid.color.detach().flatten()])
        moved = float((after - before).abs().max())
        # Adam's first step moves by exactly lr where the gradient is non-zero; later ones by at most ~lr
        assert 0.5 * want[n] < moved <= 1.0001 * want[n] if n == 0 else moved <= 3.2 * want[n], (n, moved)
    with pytest.raises(ValueError, match="lr_end"):
        TextTo3DConfig(lr_end=0.0).validate()


def test_colour_learning_rate_scale_moves_the_colour_that_many_times_further_than_the_density():
    """color_lr_scale = 4: Adam's first step moves every raw density element with a non-zero gradient by exactly lr
    and every raw colour element by exactly 4 lr (Adam's first step is lr * sign(g) up to its eps); with lr_end the
    colour's rate follows the same decay, 4 times higher."""
    # sparsity from step 0: at step 0 every voxel has the background's grey, so only the sparsity term gives the
    # density a gradient
    cfg = TextTo3DConfig(prompt="a red mushroom", steps=3, R=2, K=2, seed=0, lr=0.05, lr_end=0.05 / 4,
                         anneal_steps=2, color_lr_scale=4.0, sparsity_weight=0.03, sparsity_start=0, **TINY)
    trainer = Trainer(cfg, None, SceneProblem(cfg.prompt, _teacher(), cfg.render_size, cfg.n_samples,
                                              cfg.guidance_scale, 4))
    d0, c0 = trainer.grid.density.detach().clone(), trainer.grid.color.detach().clone()
    trainer.step()
    dd, dc = (trainer.grid.density.detach() - d0).abs(), (trainer.grid.color.detach() - c0).abs()
    assert float(dd.max()) == pytest.approx(0.05, rel=1e-3) and float(dc.max()) == pytest.approx(0.2, rel=1e-3)
    big_d, big_c = dd[dd > 1e-3], dc[dc > 1e-3]  # moved elements (a gradient of Adam's eps' size moves less)
    assert big_d.numel() > 100 and big_c.numel() > 100
    assert float(big_d.median()) == pytest.approx(0.05, rel=1e-3)
    assert float(big_c.median()) == pytest.approx(0.2, rel=1e-3)
    for n, (lr_d, lr_c) in enumerate([(0.05, 0.2), (0.025, 0.1), (0.0125, 0.05)]):
        trainer.set_lr(n)
        assert [g["lr"] for g in trainer.opt.param_groups] == pytest.approx([lr_d, lr_c], rel=1e-12)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="color_lr_scale"):
            TextTo3DConfig(color_lr_scale=bad).validate()


def test_adam_beta2_is_the_memory_of_the_squared_gradients_of_both_groups():
    """adam_beta2 = 0.9: after one step Adam's second moment of every raw density and colour element is
    (1 - 0.9) g^2 of that step's gradient; after a second, 0.9 of that plus 0.1 g_2^2 (the trainer's optimiser
    uses the configured beta2 for both parameter groups)."""
    cfg = TextTo3DConfig(prompt="a red mushroom", steps=2, R=2, K=2, seed=0, adam_beta2=0.9, **TINY)
    trainer = Trainer(cfg, None, SceneProblem(cfg.prompt, _teacher(), cfg.render_size, cfg.n_samples,
                                              cfg.guidance_scale, 4))
    params = (trainer.grid.density, trainer.grid.color)
    want = None
    for _ in range(2):
        trainer.step()
        g2 = [p.grad.detach() ** 2 for p in params]
        want = [0.1 * g for g in g2] if want is None else [0.9 * w + 0.1 * g for w, g in zip(want, g2, strict=True)]
        for p, w in zip(params, want, strict=True):
            torch.testing.assert_close(trainer.opt.state[p]["exp_avg_sq"], w, rtol=1e-5, atol=1e-20)
    assert [g["betas"] for g in trainer.opt.param_groups] == [(0.9, 0.9)] * 2
    for bad in (0.0, 1.0, -0.5, True):
        with pytest.raises(ValueError, match="adam_beta2"):
            TextTo3DConfig(adam_beta2=bad).validate()


def test_initial_blob_is_the_ellipsoid_of_its_centre_height_and_radius():
    """init_center_z = -0.2, init_height = 0.8, init_radius = 0.6, init_blob = 4 on a 21^3 grid (voxel centres every
    0.1): raw density 4 at the centre (0, 0, -0.2), half of it half-way to the top (0, 0, 0.2) and to the side
    (0.3, 0, -0.2), and 0 on and beyond the ellipsoid's surface (0, 0, 0.6), (0.6, 0, -0.2), (0, 0, -1)."""
    cfg = TextTo3DConfig(prompt="a red mushroom", grid_resolution=21, init_blob=4.0, init_radius=0.6,
                         init_center_z=-0.2, init_height=0.8, render_size=32, n_samples=16, n_eval_views=2)
    trainer = Trainer(cfg, None, SceneProblem(cfg.prompt, _teacher(), 32, 16, cfg.guidance_scale, 2))
    d = trainer.grid.density.detach()[0, 0]  # [z, y, x]

    def at(x, y, z):
        i = lambda v: round((v + 1) / 0.1)  # noqa: E731
        return float(d[i(z), i(y), i(x)])

    assert at(0, 0, -0.2) == pytest.approx(4.0, abs=1e-5)
    assert at(0, 0, 0.2) == pytest.approx(2.0, abs=1e-5) and at(0.3, 0, -0.2) == pytest.approx(2.0, abs=1e-5)
    assert at(0, 0.3, -0.2) == pytest.approx(2.0, abs=1e-5) and at(0, 0, -0.6) == pytest.approx(2.0, abs=1e-5)
    assert at(0, 0, 0.6) == at(0.6, 0, -0.2) == at(0, 0, -1.0) == 0.0
    assert float(d.max()) == pytest.approx(4.0, abs=1e-5)
    ball = Trainer(dataclasses.replace(cfg, init_center_z=0.0, init_height=None), None, trainer.problem).grid
    c = ball.voxel_centers().norm(dim=-1)  # the default: a ball of radius init_radius at the origin
    torch.testing.assert_close(ball.density.detach()[0, 0], (4.0 * (1 - c / 0.6)).clamp_min(0.0), rtol=0, atol=1e-5)
    for name, bad in (("init_center_z", 1.5), ("init_height", 0.0), ("init_height", -0.3)):
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(cfg, **{name: bad}).validate()


def test_coarse_to_fine_upsamples_the_grid_and_adams_moments_and_resumes_across_the_switch(tmp_path):
    """coarse_resolution = 9 for coarse_steps = 3: steps 1-3 train a 9^3 grid, step 4 a 16^3 grid that is the
    trilinear resampling of the coarse one (a smooth raw field -- linear in x, y, z -- is reproduced exactly, and
    renders of the two grids agree), Adam's moments are resampled and its step count kept; a run checkpointed
    before the switch and resumed ends identical to an uninterrupted one."""
    from carv.render import VoxelGrid

    coarse = VoxelGrid(9)
    c = coarse.voxel_centers()
    with torch.no_grad():
        coarse.density.copy_((4 + c @ torch.tensor([1.0, 2.0, -1.5]))[None, None])
        coarse.color.copy_(c.permute(3, 0, 1, 2)[None])
    fine = coarse.upsampled(16)
    cf = fine.voxel_centers()
    torch.testing.assert_close(fine.density[0, 0], 4 + cf @ torch.tensor([1.0, 2.0, -1.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(fine.color[0], cf.permute(3, 0, 1, 2), atol=1e-5, rtol=0)
    pts = torch.rand(500, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for a, b in zip(coarse(pts), fine(pts), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    cfg = TextTo3DConfig(prompt="a red mushroom", steps=5, R=2, K=2, seed=0, coarse_resolution=9, coarse_steps=3,
                         checkpoint_every=3, **TINY)
    problem = SceneProblem(cfg.prompt, _teacher(), cfg.render_size, cfg.n_samples, cfg.guidance_scale, 4)
    full = Trainer(cfg, tmp_path / "full", problem, resume=False)
    res, before = [], None
    while not full.done:
        if full.step_count == 3:
            before = (full.grid, {k: v.clone() for k, v in full.opt.state_dict()["state"][0].items()})
        full.step()
        res.append(full.grid.resolution)
        if full.step_count == 3:
            full.save()
    assert res == [9, 9, 9, 16, 16]
    # the upsampling itself (no step): parameters and Adam's moments resampled, its step count kept
    cut = Trainer(cfg, tmp_path / "full", problem)  # resumes the step-3 checkpoint: still 9^3
    assert (cut.step_count, cut.grid.resolution) == (3, 9)
    cut.upsample(16)
    torch.testing.assert_close(cut.grid.density, before[0].upsampled(16).density)
    st = cut.opt.state_dict()["state"][0]
    assert float(st["step"]) == float(before[1]["step"]) == 3
    torch.testing.assert_close(st["exp_avg"], VoxelGrid.resample_volume(before[1]["exp_avg"], 16))
    resumed = Trainer(cfg, tmp_path / "full", problem)
    while not resumed.done:
        resumed.step()
    assert torch.equal(resumed.grid.density, full.grid.density) and torch.equal(resumed.grid.color, full.grid.color)
    with pytest.raises(ValueError, match="coarse_resolution"):
        TextTo3DConfig(coarse_resolution=64).validate()


def test_guidance_anneals_linearly_and_the_teacher_is_called_with_each_steps_scale():
    """guidance 7 -> 3 over anneal_steps = 4: the teacher's classifier-free guidance at steps 0..5 is 7, 6, 5, 4, 3,
    3 (recorded at the teacher call), and the SDS gradient is the guided one: eps_u + s (eps_c - eps_u)."""
    cfg = TextTo3DConfig(prompt="a red mushroom", steps=6, R=2, K=2, seed=0, guidance_scale=7.0, guidance_end=3.0,
                         anneal_steps=4, **TINY)
    assert [cfg.guidance_at(n) for n in range(6)] == pytest.approx([7, 6, 5, 4, 3, 3])
    assert TextTo3DConfig().guidance_at(10**6) == 3.0
    teacher = _teacher()
    trainer = Trainer(cfg, None, SceneProblem(cfg.prompt, teacher, cfg.render_size, cfg.n_samples,
                                              cfg.guidance_scale, 4))
    seen = []
    real = type(teacher).guided_eps

    def spy(self, x_t, t, cond=None, guidance_scale=1.0, uncond=None):
        seen.append(guidance_scale)
        return real(self, x_t, t, cond, guidance_scale, uncond)

    import unittest.mock

    with unittest.mock.patch.object(type(teacher), "guided_eps", spy):
        for _ in range(cfg.steps):
            n = len(seen)
            trainer.step()
            assert len(set(seen[n:])) == 1  # one scale per step
        per_step = [seen[i] for i in range(len(seen)) if i == 0 or seen[i] != seen[i - 1]]
    assert per_step == pytest.approx([7, 6, 5, 4, 3])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 300])
    cond = teacher_cond(teacher, "a red mushroom", cameras_from_angles([0.0, 90.0], 20.0))  # front, side
    e_c, e_u = teacher.predict_eps(x, t, cond), teacher.predict_eps(x, t, teacher.null_cond(cond))
    torch.testing.assert_close(teacher.guided_eps(x, t, cond, 5.0), e_u + 5.0 * (e_c - e_u), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="guidance_end"):
        TextTo3DConfig(guidance_end=-1.0).validate()


def test_initial_colour_is_the_grey_level_every_voxel_renders_with():
    """init_color = 0.8: every voxel's activated colour is 0.8 (the raw value is its logit), so a render of the
    blob alone is lighter than the background; the default 0.5 is the background's grey."""
    p = SceneProblem("a red mushroom", _teacher(), 32, 16, 3.0, 2)
    grid = p.new_grid(12, 5.0, 0.85, 0.8)
    _, rgb = grid(torch.rand(100, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    torch.testing.assert_close(rgb, torch.full_like(rgb, 0.8))
    x, op = p.render(grid, p.eval_cameras)
    inside = op > 0.2
    assert bool(((x + 1) / 2).mean(1, keepdim=True)[inside].gt(0.5 + 0.3 * 0.2).all())
    _, rgb = p.new_grid(12, 5.0, 0.85)(torch.rand(10, 3, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(rgb, torch.full_like(rgb, 0.5))
    for bad in (0.0, 1.0, True):
        with pytest.raises(ValueError, match="init_color"):
            TextTo3DConfig(init_color=bad).validate()


def test_opacity_regulariser_adds_its_exact_gradient_to_the_sds_gradient():
    """Same seed, same cameras and jitter: (gradient with the regulariser) - (gradient without) equals the
    gradient of sum(sparsity_weight * opacity + opaque_weight * H(opacity)) / R over the step's renders."""
    from carv.render import opaque_loss, sparsity_loss

    cfg = TextTo3DConfig(prompt="a red mushroom", R=2, K=2, seed=0, sparsity_weight=0.05, sparsity_start=0,
                         opaque_weight=0.02, **TINY)
    problem = SceneProblem(cfg.prompt, _teacher(), cfg.render_size, cfg.n_samples, cfg.guidance_scale, 4)
    trainer = Trainer(cfg, None, problem)
    grids = []
    for reg in (None, trainer.regulariser):
        trainer.grid.zero_grad(set_to_none=True)
        problem.gradient(trainer.grid, trainer.sds, 2, torch.Generator().manual_seed(5), regulariser=reg)
        grids.append(torch.cat([trainer.grid.density.grad.flatten(), trainer.grid.color.grad.flatten()]))
    trainer.grid.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(5)
    _, op = problem.render(trainer.grid, problem.cameras(2, g), g)
    (op[0].numel() * (0.05 * sparsity_loss(op) + 0.02 * opaque_loss(op))).backward()
    want = torch.cat([trainer.grid.density.grad.flatten(), trainer.grid.color.grad.flatten()])
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(grids[1] - grids[0], want, rtol=1e-4, atol=1e-6)
    assert Trainer(dataclasses.replace(cfg, sparsity_weight=0.0, opaque_weight=0.0), None, problem).regulariser is None


def test_sparsity_schedule_is_zero_before_its_start_then_linear_and_the_regulariser_uses_the_steps_weight():
    """sparsity_weight 0.01 -> sparsity_end 0.05 from sparsity_start 2 to anneal_steps 6: 0, 0, 0.01, 0.02, 0.03,
    0.04, 0.05, 0.05; without sparsity_end the weight is constant from sparsity_start on. The regulariser's value
    on a fixed opacity at step n is sparsity_at(n) * sum(opacity) / R (its exact charge), and at step 0 it charges
    nothing."""
    cfg = TextTo3DConfig(prompt="a red mushroom", R=2, K=2, seed=0, sparsity_weight=0.01, sparsity_end=0.05,
                         sparsity_start=2, anneal_steps=6, **TINY)
    assert [cfg.sparsity_at(n) for n in range(8)] == pytest.approx([0, 0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.05])
    assert all(TextTo3DConfig().sparsity_at(n) == 0.0 for n in (0, 99, 100, 10**6))  # the default: none
    d = TextTo3DConfig(sparsity_weight=0.03)  # none for the first 100 steps (sparsity_start), then 0.03
    assert d.sparsity_at(0) == d.sparsity_at(99) == 0.0 and d.sparsity_at(100) == d.sparsity_at(10**6) == 0.03
    assert dataclasses.replace(d, sparsity_start=0).sparsity_at(0) == 0.03  # constant from step 0
    assert Trainer(TextTo3DConfig(**TINY), None, SceneProblem("a red mushroom", _teacher(), 32, 16, 3.0, 2)
                   ).regulariser is None  # the default charges no regulariser
    ramp = dataclasses.replace(cfg, sparsity_weight=0.0, sparsity_start=0)  # 0 -> 0.05 from step 0
    assert [ramp.sparsity_at(n) for n in (0, 3, 6)] == pytest.approx([0.0, 0.025, 0.05])
    problem = SceneProblem(cfg.prompt, _teacher(), cfg.render_size, cfg.n_samples, cfg.guidance_scale, 4)
    trainer = Trainer(cfg, None, problem)
    opacity = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    for n in (0, 3, 7):
        trainer.step_count = n
        assert float(trainer.regulariser(opacity)) == pytest.approx(cfg.sparsity_at(n) * float(opacity.sum()) / 2,
                                                                    rel=1e-6, abs=1e-9)
    assert Trainer(ramp, None, problem).regulariser is not None  # 0 at step 0, but not for the whole run
    for name, bad in (("sparsity_end", -0.1), ("sparsity_start", 7), ("sparsity_start", -1), ("sparsity_start", 1.5)):
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(cfg, **{name: bad}).validate()


def test_app_defaults_are_the_measured_objective_settings():
    """The defaults BENCHMARKS.md's "Text-to-3D quality" section measured (ablation there): timestep range
    0.02-0.98 at step 0 annealed linearly to 0.02-0.4 at step 200 (20..980 -> 20..400 of 1000), training cameras
    over the camera-conditioned teacher's elevations 0-40, blob radius 0.85, no sparsity penalty (0.03 from step
    100 with the earlier teacher), Adam's beta2 0.99, guidance 3,
    constant lr, no coarse-to-fine; the problem built
    from them carries the step-0 range and the elevations for the benchmark's samplers."""
    cfg = TextTo3DConfig()
    assert (cfg.t_lo, cfg.t_hi, cfg.t_lo_end, cfg.t_hi_end, cfg.anneal_steps) == (0.02, 0.98, 0.02, 0.4, 200)
    assert cfg.t_range(0) == (20, 980) and cfg.t_range(100) == (20, 690)
    assert cfg.t_range(200) == cfg.t_range(10_000) == (20, 400)
    assert (cfg.elev_lo, cfg.elev_hi, cfg.init_radius, cfg.init_color) == (0, 40, 0.85, 0.5)
    assert (cfg.sparsity_weight, cfg.sparsity_start, cfg.sparsity_end, cfg.opaque_weight) == (0.0, 100, None, 0)
    assert cfg.adam_beta2 == 0.99 and cfg.color_lr_scale == 1.0
    assert (cfg.init_blob, cfg.init_center_z, cfg.init_height) == (5.0, 0.0, None)
    assert (cfg.guidance_scale, cfg.guidance_end, cfg.steps, cfg.R) == (3.0, None, 400, 2)
    assert (cfg.lr, cfg.lr_end) == (0.1, None)
    assert cfg.coarse_resolution is None
    from carv.apps.text_to_3d import problem_for

    p = problem_for(dataclasses.replace(cfg, n_eval_views=2), _teacher())
    s = p.sampler("learned", "per_upstream", 0.1)
    assert (s.t_min, s.t_max) == (20, 980) and float(s.q[981:].sum()) == 0.0
    el = p.cameras(64, torch.Generator().manual_seed(0)).elevation_deg
    assert float(el.min()) >= 0 and float(el.max()) <= 40 and float(el.max() - el.min()) > 30
    narrow = problem_for(dataclasses.replace(cfg, n_eval_views=2, elev_lo=15.0, elev_hi=25.0), _teacher())
    el = narrow.cameras(64, torch.Generator().manual_seed(0)).elevation_deg
    assert float(el.min()) >= 15 and float(el.max()) <= 25
    ev = p.eval_cameras.elevation_deg  # held-out views keep the teacher's 0-40
    assert float(ev.min()) >= 0 and float(ev.max()) <= 40


def test_bench_charges_every_extra_to_the_methods_that_pay_it():
    """The learned proposal's warm-up and refreshes go to every learned row, the accountant's pilot and probes
    to the app's estimator, the resampler's warm-up to improved-diffusion; one-off costs are amortised."""
    from carv.bench.text_to_3d import _charges

    acc = {"warmup_s": 30.0, "pilot_s": 6.0, "proposal_update_s": 0.002, "probe_s": 0.05}
    ch = _charges(acc, BenchSettings(amortise_steps=300))
    assert ch["importance"] == {"learned-proposal warm-up (amortised)": 0.1, "proposal refresh": 0.0002}
    both = ch["importance+stratified"]
    assert both["accountant pilot (amortised)"] == pytest.approx(0.02) and both["accountant probes"] == 0.005
    assert both["learned-proposal warm-up (amortised)"] == pytest.approx(0.1)
    assert ch["improved-diffusion"] == {"resampler warm-up (amortised)": 0.1}
    assert "uniform" not in ch and "stratified" not in ch and "threestudio" not in ch and "vdm" not in ch


def test_full_disk_ends_with_one_line_and_the_run_resumes_to_the_same_result(tmp_path, monkeypatch, capsys):
    """Issue 11: an OSError on a write (here ENOSPC at the second checkpoint) ends with one line naming the
    path (exit 2, no traceback); the same command then resumes from the first checkpoint and ends bit-identical
    to an uninterrupted run."""
    import errno
    import sys

    from carv import _runfolder as rf
    from carv.cli import main

    args = ["carv", "text-to-3d", "a snowman", "--steps", "4", "--K", "2", "--checkpoint-every", "2",
            "--grid-resolution", "16", "--render-size", "32", "--n-samples", "16", "--threads", "1"]
    save, calls = rf.save_tensors, []

    def full(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(path, *a, **k)

    def run(out):
        monkeypatch.setattr(sys, "argv", [*args, "--out", str(out)])
        try:
            main()
        except SystemExit as e:
            return e.code
        return 0

    monkeypatch.setattr(rf, "save_tensors", full)
    assert run(tmp_path / "cut") == 2
    text = capsys.readouterr().err
    err = [ln.split("Error: ", 1)[1] for ln in text.splitlines() if "Error: " in ln]
    assert "Traceback" not in text and len(err) == 1 and err[0].startswith("No space left on device")
    assert "checkpoint-0000004" in err[0], err
    monkeypatch.setattr(rf, "save_tensors", save)
    assert run(tmp_path / "cut") == 0 and run(tmp_path / "straight") == 0
    a, b = rf.RunState(tmp_path / "cut").load(), rf.RunState(tmp_path / "straight").load()
    assert a[1]["step"] == b[1]["step"] == 4
    assert torch.equal(a[0]["grid.density"], b[0]["grid.density"]) and torch.equal(a[0]["grid.color"],
                                                                                    b[0]["grid.color"])
    assert [r["step"] for r in _metrics(tmp_path / "cut" / "metrics.jsonl") if r["kind"] == "step"] == [1, 2, 3, 4]


def test_reference_solution_metrics_measure_the_distance_to_a_finished_run(tmp_path):
    """--reference: evaluations also report PSNR / IoU against a finished run's held-out renders; the
    reference grid scores itself exactly (IoU 1, the PSNR clamp), another grid less; bad folders are named."""
    from carv.apps.text_to_3d import load_reference_grid, problem_for

    cfg = TextTo3DConfig(prompt="a snowman", steps=3, K=2, checkpoint_every=3, **TINY)
    run_text_to_3d("a snowman", tmp_path / "ref", cfg, progress=False, teacher=_teacher())
    grid = load_reference_grid(tmp_path / "ref")
    problem = problem_for(cfg, _teacher())
    problem.set_reference(grid)
    own = problem.evaluate(grid)
    assert own["iou_ref"] == 1.0 and own["psnr_ref"] == pytest.approx(120.0)
    other = problem.evaluate(problem.new_grid(cfg.grid_resolution, cfg.init_blob, cfg.init_radius))
    assert other["psnr_ref"] < 60 and other["psnr"] == pytest.approx(
        problem_for(cfg, _teacher()).evaluate(problem.new_grid(cfg.grid_resolution, cfg.init_blob,
                                                               cfg.init_radius))["psnr"])
    # a compare run against the reference: its evaluations and its equal-quality summary carry the _ref metrics
    cmp_cfg = dataclasses.replace(cfg, steps=4, eval_every_s=1e-9, reference=str(tmp_path / "ref"), K=None)
    res = compare_text_to_3d("a snowman", tmp_path / "cmp", cmp_cfg, progress=False, teacher=_teacher())
    assert set(res["steps_ratio_equal_quality"]) == {"psnr", "iou", "psnr_ref", "iou_ref"}
    evals = [r for r in _metrics(tmp_path / "cmp" / "baseline" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and all("psnr_ref" in r and 0 <= r["iou_ref"] <= 1 for r in evals)
    for bad, msg in ((tmp_path / "nothing", "not a directory"), (tmp_path, "no checkpoint")):
        with pytest.raises(ValueError, match=f"reference: .*{msg}"):
            dataclasses.replace(cfg, reference=str(bad)).validate()


def test_load_run_grid_is_read_only_and_falls_back_past_a_damaged_checkpoint(tmp_path):
    """Reading someone else's run (a reference, a figure) never rewrites its metrics or renames its files, and
    a damaged newest checkpoint falls back to the previous good one; none good is an error naming the argument."""
    from carv.apps.text_to_3d import load_run_grid

    cfg = TextTo3DConfig(prompt="a snowman", steps=4, K=2, checkpoint_every=2, **TINY)
    run_text_to_3d("a snowman", tmp_path / "r", cfg, progress=False, teacher=_teacher())
    files = sorted((tmp_path / "r").glob("checkpoint-*.safetensors"))
    assert len(files) == 2
    _, state = load_run_grid(tmp_path / "r")
    newest_step = state["step"]
    raw = bytearray(files[-1].read_bytes())
    raw[-200:] = bytes(200)  # damage the newest checkpoint's tensor data
    files[-1].write_bytes(bytes(raw))
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    _, state = load_run_grid(tmp_path / "r")
    assert state["step"] < newest_step
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before
    files[0].write_bytes(b"")
    with pytest.raises(ValueError, match="figure: no checkpoint .* verifies"):
        load_run_grid(tmp_path / "r", "figure")


class StageClock:
    """A fake clock that only the stages move: each render costs ``render_s``, each teacher draw ``draw_s``, times
    ``scale`` (a loaded machine slows every stage alike) and a +-5% jitter from its own generator."""

    def __init__(self, scale: float, seed: int, render_s: float = 0.004 * 2 ** 3, draw_s: float = 0.004):
        self.t, self.scale, self.render_s, self.draw_s = 0.0, scale, render_s, draw_s
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds * self.scale * (1 + 0.05 * (2 * float(torch.rand((), generator=self.g)) - 1))


def _run_on_clock(cfg, clock, monkeypatch):
    teacher = _teacher()
    problem = SceneProblem(cfg.prompt, teacher, cfg.render_size, cfg.n_samples, cfg.guidance_scale,
                           cfg.n_eval_views, clock=clock)
    render = problem.teacher_input
    predict = teacher.predict_eps

    def timed_render(grid, cams, *args, **kwargs):
        clock.advance(clock.render_s * len(cams))
        return render(grid, cams, *args, **kwargs)

    def timed_predict(x_t, t, cond=None):
        clock.advance(clock.draw_s * x_t.shape[0])
        return predict(x_t, t, cond)

    monkeypatch.setattr(problem, "teacher_input", timed_render)
    monkeypatch.setattr(teacher, "predict_eps", timed_predict)
    tr = Trainer(cfg, None, problem)
    rows = [tr.step() for _ in range(cfg.steps)]
    monkeypatch.undo()
    return tr, rows


def test_same_seed_same_result_when_every_stage_is_five_times_slower(monkeypatch):
    """The main job's defaults (auto proposal, per-upstream strata, allocator at the plain step's budget), short:
    every stage timed by an injected clock, once at scale 1 and once 5x slower with other timing noise. The
    allocator reads calibrated, quantised cost ratios, so both runs make the same choices and end bit-identical."""
    cfg = TextTo3DConfig(prompt="a red mushroom", steps=30, probe_every=4, accountant_every=4, k_init=12, seed=1,
                         **TINY)
    a, rows_a = _run_on_clock(cfg, StageClock(1.0, 0), monkeypatch)
    b, rows_b = _run_on_clock(cfg, StageClock(5.0, 1), monkeypatch)
    # guidance calls the teacher twice per draw: render : draw = 2^3 / 2, a point of the quantisation grid
    assert a.alloc.calibration["cost_ratio"] == b.alloc.calibration["cost_ratio"] == 4.0
    assert [(r["R"], r["K"]) for r in rows_a] == [(r["R"], r["K"]) for r in rows_b]
    assert len({(r["R"], r["K"]) for r in rows_a if not r["probe"]}) > 1  # the allocator did re-choose
    assert torch.equal(a.grid.density, b.grid.density) and torch.equal(a.grid.color, b.grid.color)
    assert a.alloc.costs(b.meter) == a.alloc.costs(a.meter)  # live medians differ 5x; the choice reads neither


def test_pinned_cost_ratios_end_bit_identical_on_machines_whose_ratios_differ(monkeypatch):
    """Two machines whose render : draw ratios (4.6 and 5.0) calibrate to neighbouring grid points: unpinned their
    calibrations differ; with --cost-ratio / --probe-ratio pinned both runs make the same choices and end
    bit-identical."""
    base = dict(prompt="a red mushroom", steps=30, probe_every=4, accountant_every=4, k_init=12, seed=1, **TINY)
    cals = [_run_on_clock(TextTo3DConfig(**base), StageClock(1.0, 0, render_s=0.008 * r), monkeypatch)[0]
            .alloc.calibration["cost_ratio"] for r in (4.6, 5.0)]
    assert cals == [4.0, pytest.approx(2 ** 2.5)]
    pinned = TextTo3DConfig(**base, cost_ratio=5.0, probe_ratio=6.0)
    a, rows_a = _run_on_clock(pinned, StageClock(1.0, 0, render_s=0.008 * 4.6), monkeypatch)
    b, rows_b = _run_on_clock(pinned, StageClock(3.0, 1, render_s=0.008 * 5.0), monkeypatch)
    assert a.alloc.calibration["pinned"] == ["cost_ratio", "probe_ratio"] and a.alloc.calibration["cost_ratio"] == 5.0
    assert [(r["R"], r["K"]) for r in rows_a] == [(r["R"], r["K"]) for r in rows_b]
    assert torch.equal(a.grid.density, b.grid.density) and torch.equal(a.grid.color, b.grid.color)


@pytest.mark.parametrize("argv, match", [
    (["--cost-ratio", "-1"], "cost_ratio: expected a positive number"),
    (["--probe-ratio", "inf"], "probe_ratio: expected a non-negative number"),
    (["--cost-ratio", "4", "--live-costs"], "cost_ratio: pins the calibrated costs, which --live-costs"),
    (["--cost-ratio", "4", "--K", "4"], "cost_ratio: only the accountant's choice of (R, K) reads it"),
    (["--cost-ratio", "4", "--baseline"], "cost_ratio: only the accountant's choice of (R, K) reads it"),
])
def test_pinned_cost_ratio_flags_are_checked(tmp_path, argv, match):
    res = runner.invoke(app, ["text-to-3d", "--out", str(tmp_path / "r"), "--steps", "1", *argv])
    assert res.exit_code != 0
    assert match in " ".join(res.output.split()), res.output
    assert not (tmp_path / "r").exists()  # refused before a folder was made


def test_summary_accounting_is_consistent_and_the_cli_says_the_bound(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["text-to-3d", "a snowman", "--out", str(out), "--steps", "2", "--grid-resolution", "16",
                              "--render-size", "32", "--n-samples", "16", "--threads", "1"])
    assert res.exit_code == 0, res.output
    acc = json.loads((out / "summary.json").read_text())["accounting"]
    from carv.accounting import ACCOUNTING_KEYS

    assert set(acc) == set(ACCOUNTING_KEYS) and acc["proposal"] in ("uniform", "weight", "learned")
    s, rho = acc["between"] / (acc["between"] + acc["within"]), acc["cost_upstream_s"] / acc["cost_draw_s"]
    assert acc["bound_ecm"] == pytest.approx((1 + rho) / (math.sqrt(s * rho) + math.sqrt(1 - s)) ** 2, rel=1e-12)
    assert acc["bound_fraction"] == pytest.approx(acc["predicted_ecm"] / acc["bound_ecm"])
    last = res.output.strip().splitlines()[-1]
    assert last.startswith(f"this pipeline allows at most {acc['bound_ecm']:.2f}x over the plain estimator")


def test_a_folder_from_before_the_efficiency_first_allocator_resumes_with_the_budget_filled(tmp_path):
    """A run folder whose manifest predates ``fill_budget`` (and ``live_costs``, ``between_estimate``, ``selection``)
    resumes as it started: the allocator re-reading live costs, spending the whole plain step's budget and clipping
    its between part at 0; a new folder gets the defaults."""
    from carv._runfolder import MANIFEST
    from carv.apps.text_to_3d.config import LEGACY_SETTINGS as LEGACY

    assert set(LEGACY) == {"fill_budget", "live_costs", "between_estimate", "selection", "mix_pairs"}
    out = tmp_path / "run"
    args = ["text-to-3d", "a snowman", "--out", str(out), "--grid-resolution", "16", "--render-size", "32",
            "--n-samples", "16", "--threads", "1"]
    assert runner.invoke(app, [*args, "--steps", "2"]).exit_code == 0
    assert json.loads((out / MANIFEST).read_text())["config"]["fill_budget"] is False
    manifest = json.loads((out / MANIFEST).read_text())
    for key in LEGACY:
        del manifest["config"][key]
    (out / MANIFEST).write_text(json.dumps(manifest))
    from safetensors import safe_open

    from carv._runfolder import save_tensors

    for ck in out.glob("checkpoint-*.safetensors"):  # the checkpoints an older carv wrote lack the keys too
        with safe_open(str(ck), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(meta["state"])
        for key in LEGACY:
            del state["config"][key]
        meta = {k: v for k, v in meta.items() if k != "carv.sha256"} | {"state": json.dumps(state)}
        save_tensors(ck, tensors, meta)
    for steps in ("3", "4"):  # every resume, not only the first (the manifest now records the adopted values)
        res = runner.invoke(app, [*args, "--steps", steps])
        assert res.exit_code == 0, res.output
    assert json.loads((out / MANIFEST).read_text())["config"]["fill_budget"] is True
    # a folder started with --fill-budget resumes without the flag; one started without it refuses the flag
    filled, plain = [*args[:3], str(tmp_path / "filled"), *args[4:]], [*args[:3], str(tmp_path / "plain"), *args[4:]]
    for argv in ([*filled, "--steps", "2", "--fill-budget"], [*filled, "--steps", "3"], [*plain, "--steps", "2"]):
        res = runner.invoke(app, argv)
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*plain, "--steps", "3", "--fill-budget"])
    assert res.exit_code != 0 and "fill_budget" in res.output + str(res.exception)  # carv's main prints one line
    from carv.apps.text_to_3d.run import open_run

    with open_run("a snowman", out, TextTo3DConfig(steps=3, grid_resolution=16, render_size=32, n_samples=16,
                                                   threads=1), progress=False) as (cfg, _, _p):
        assert cfg.fill_budget is True and cfg.live_costs is True and cfg.between_estimate == "clipped"
        assert cfg.selection == "least-variance" and cfg.mix_pairs is False
    # --no-mix-pairs is recorded and kept on resume; a new folder mixes by default
    nomix = [*args[:3], str(tmp_path / "nomix"), *args[4:]]
    assert runner.invoke(app, [*nomix, "--steps", "2", "--no-mix-pairs"]).exit_code == 0
    assert json.loads((tmp_path / "nomix" / MANIFEST).read_text())["config"]["mix_pairs"] is False
    assert json.loads((tmp_path / "plain" / MANIFEST).read_text())["config"]["mix_pairs"] is True
    assert runner.invoke(app, [*nomix, "--steps", "3"]).exit_code == 0  # the folder's setting, without the flag
    assert json.loads((tmp_path / "nomix" / MANIFEST).read_text())["config"]["mix_pairs"] is False
    res = runner.invoke(app, [*plain, "--steps", "4", "--no-mix-pairs"])  # a folder that mixed refuses the change
    assert res.exit_code != 0 and "mix_pairs" in res.output + str(res.exception)


@pytest.mark.parametrize("method, proposal, steps", [("carv", "learned", 1), ("carv", "learned", 3),
                                                     ("carv", "weight", 3), ("baseline", None, 3)])
def test_a_checkpoint_restores_the_table_the_sampler_draws_from(tmp_path, method, proposal, steps):
    """The checkpoint holds the sampler's own table (TimestepSampler.importance_state; empty for q = p), so a
    resumed run draws from exactly the proposal the run drew from, before its first refresh (step 1; proposal_every
    2) or after; a checkpoint written without
    the key (a run at q = p before the key was always written) resumes at q = p."""
    cfg = TextTo3DConfig(prompt="a snowman", steps=steps, K=2, checkpoint_every=steps, seed=3, method=method,
                         proposal=proposal, proposal_every=2, **TINY)
    teacher = _teacher()
    run = Trainer(cfg, tmp_path / "run", teacher=teacher)
    for _ in range(steps):
        run.step()
    run.save()
    before = run.sds.sampler.importance
    back = Trainer(cfg, tmp_path / "run", teacher=teacher)
    assert back.step_count == steps
    after = back.sds.sampler.importance
    assert (before is None and after is None) or torch.equal(before, after)
    if method == "baseline":
        tensors, meta = back.state.load()
        assert tensors.pop("sampler.importance").numel() == 0
        back.sds.sampler.set_importance(torch.ones(len(back.sds.sampler.q), dtype=torch.float64))
        back._load((tensors, meta))
        assert back.sds.sampler.importance is None


def test_probes_read_the_within_half_variance_while_the_run_draws_at_most_two_per_render(tmp_path):
    """The trainer's probe steps draw iid (sampler.iid()), yet under the run's per-row strata and a pair of at most
    two draws per render they also read the within-half variance (Allocator.probe_reads_halves, the third contrast);
    with K_init = 4 they do not."""
    teacher = _teacher()
    for k_init, reads in ((2, True), (4, False)):
        cfg = TextTo3DConfig(prompt="a snowman", steps=8, k_init=k_init, probe_every=2, accountant_every=100,
                             seed=3, **TINY)
        run = Trainer(cfg, tmp_path / f"k{k_init}", teacher=teacher)
        for _ in range(8):
            run.step()
        assert run.alloc.n_observed >= 3 and run.sds.sampler.row_strata
        assert (len(run.alloc.halves) >= 1) == reads
