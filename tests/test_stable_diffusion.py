"""Stable Diffusion drop-in, on a tiny random-weight pipeline built offline, saved and loaded (conftest):
from_pipeline, latent SDS through the VAE and a differentiable render against the gradient computed by hand,
epsilon / v-prediction, per-view and dict conditioning, bfloat16 weights with float32 inputs, max_batch with
guidance, the NaN policy, the guidance conventions, percent ranges and fantasia3d weighting."""

import pytest
import torch

from carv import ScoreDistillation, TimestepSampler, weight_table
from carv.render import VoxelGrid, random_cameras, render
from carv.teachers import NonFiniteTeacherError
from carv.timesteps import scheduled_value

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread on a shared machine."""


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None,
                                                             feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def teacher(pipe):
    from carv.teachers import DiffusersTeacher

    return DiffusersTeacher.from_pipeline(pipe, negative_prompt="blurry")


def unet_eps(pipe, x_t, t, emb):
    with torch.no_grad():
        return pipe.unet(x_t, t, encoder_hidden_states=emb).sample


def hand_sds(pipe, teacher, x, out, cond, uncond, scale, weighting="sds"):
    """The SDS gradient for the draws in ``out.draws``, from direct UNet calls: [R, ...]."""
    R, K = out.draws.t.shape
    t, eps = out.draws.t.reshape(-1), out.draws.eps.reshape(R * K, *x.shape[1:])
    ac = torch.as_tensor(pipe.scheduler.alphas_cumprod, dtype=torch.float64)[t]
    a, s = ac.sqrt().float().view(-1, 1, 1, 1), (1 - ac).sqrt().float().view(-1, 1, 1, 1)
    x_t = a * x.detach().repeat_interleave(K, 0) + s * eps
    ec = unet_eps(pipe, x_t, t, cond.repeat_interleave(K, 0))
    eu = unet_eps(pipe, x_t, t, uncond.repeat_interleave(K, 0))
    g = eu + scale * (ec - eu)
    w = weight_table(weighting, teacher.schedule).float()[t].view(-1, 1, 1, 1)
    f = w * (g - eps) * out.draws.weight.reshape(-1, 1, 1, 1)
    return f.reshape(R, K, *x.shape[1:]).mean(1)


def test_from_pipeline_refuses_a_unet_and_names_the_fix(pipe):
    from carv.teachers import DiffusersTeacher

    with pytest.raises(TypeError, match="pipe: .*lacks"):
        DiffusersTeacher.from_pipeline(pipe.unet)
    with pytest.raises(TypeError, match=r"from_pipeline\(pipe\)"):
        DiffusersTeacher(pipe, pipe.scheduler)
    with pytest.raises(TypeError, match="from_pipeline"):
        ScoreDistillation(pipe, TimestepSampler(1000))


def test_latent_sds_through_vae_and_render_matches_hand_gradient(pipe, teacher):
    """render (voxel grid) -> VAE encode -> SDS (K = 4, guidance 100, importance + strata): the grid gradient equals
    J_render^T J_vae^T (grad / R) with grad computed from direct UNet calls."""
    torch.manual_seed(0)
    grid = VoxelGrid(8, bound=1.0)
    grid.add_blob_(radius=0.5, peak=5.0)
    cams = random_cameras(2, torch.Generator().manual_seed(1), (0.0, 40.0), 3.0, 40.0)
    emb = teacher.encode_prompt("a red mushroom")
    cond, uncond = emb.for_views(cams.elevation_deg, cams.azimuth_deg)
    sampler = TimestepSampler.from_percent(1000, 0.02, 0.98, importance=weight_table("sds", teacher.schedule),
                                           floor=0.1, stratify="per_upstream")
    sds = ScoreDistillation(teacher, sampler, K=4, guidance_scale=100.0)

    rgb = render(grid, cams, 16, n_samples=8, bound=1.0).rgb
    latents = teacher.encode_images(rgb, size=64)
    assert latents.shape == (2, 4, 8, 8)
    out = sds(latents, cond, torch.Generator().manual_seed(2), uncond=uncond)
    out.loss.backward()
    got = torch.cat([grid.density.grad.flatten(), grid.color.grad.flatten()])

    grid.zero_grad(set_to_none=True)
    rgb2 = render(grid, cams, 16, n_samples=8, bound=1.0).rgb
    lat2 = teacher.encode_images(rgb2, size=64)
    g = hand_sds(pipe, teacher, lat2, out, cond, uncond, 100.0)
    assert torch.allclose(out.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
    want = torch.autograd.grad(lat2, [grid.density, grid.color], g / 2)
    want = torch.cat([w.flatten() for w in want])
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert out.draws.t.min() >= 20 and out.draws.t.max() <= 980


def test_epsilon_and_v_prediction(pipe):
    from carv.teachers import DiffusersTeacher

    x, t = torch.randn(2, 4, 8, 8), torch.tensor([30, 700])
    c = torch.randn(2, 16, 32)
    eps_t = DiffusersTeacher.from_pipeline(pipe)
    assert eps_t.prediction_type == "epsilon"
    with torch.no_grad():
        assert torch.allclose(eps_t.predict_eps(x, t, c), unet_eps(pipe, x, t, c))
    v_sched = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    v_t = DiffusersTeacher.from_pipeline(pipe, scheduler=v_sched)
    assert v_t.prediction_type == "v_prediction"
    ac = torch.as_tensor(v_sched.alphas_cumprod)[t].view(-1, 1, 1, 1).float()
    v = unet_eps(pipe, x, t, c)
    with torch.no_grad():
        assert torch.allclose(v_t.predict_eps(x, t, c), ac.sqrt() * v + (1 - ac).sqrt() * x, atol=1e-6)


def test_per_view_prompts_follow_threestudio_direction_rule(teacher):
    emb = teacher.encode_prompt("a chair", negative_prompt="ugly")
    # side (az 90), front (az 10), back (az -170), overhead (elevation 70)
    el, az = torch.tensor([10.0, 10.0, 10.0, 70.0]), torch.tensor([90.0, 10.0, -170.0, 0.0])
    cond, uncond = emb.for_views(el, az)
    want = teacher.encode_text(["a chair, side view", "a chair, front view", "a chair, back view",
                                "a chair, overhead view"])
    assert torch.allclose(cond, want)
    assert torch.allclose(uncond, teacher.encode_text(["ugly"] * 4))
    both = emb.get_text_embeddings(el, az, torch.full((4,), 3.0))  # threestudio's call: cond rows, then uncond
    assert torch.equal(both, torch.cat([cond, uncond]))
    plain, _ = emb.for_views(el, az, view_dependent_prompting=False)
    assert torch.allclose(plain, teacher.encode_text(["a chair"] * 4))


def test_per_view_and_dict_conditioning_match_hand_and_each_other(pipe, teacher):
    x = torch.randn(3, 4, 8, 8)
    cond, uncond = torch.randn(3, 16, 32), torch.randn(3, 16, 32)
    sds = ScoreDistillation(teacher, TimestepSampler(1000), K=2, guidance_scale=7.5, max_batch=4)
    out = sds(x, cond, torch.Generator().manual_seed(0), uncond=uncond)
    assert torch.allclose(out.grad, hand_sds(pipe, teacher, x, out, cond, uncond, 7.5), atol=1e-4)
    out_d = sds(x, {"encoder_hidden_states": cond}, torch.Generator().manual_seed(0),
                uncond={"encoder_hidden_states": uncond})
    assert torch.allclose(out_d.grad, out.grad, atol=1e-6)
    # without a per-call uncond, guidance uses the teacher's encoded negative prompt, for tensors and dicts alike
    out_n = sds(x, cond, torch.Generator().manual_seed(0))
    neg = teacher.encode_text(["blurry"]).expand(3, -1, -1)
    assert torch.allclose(out_n.grad, hand_sds(pipe, teacher, x, out_n, cond, neg, 7.5), atol=1e-4)
    out_nd = sds(x, {"encoder_hidden_states": cond}, torch.Generator().manual_seed(0))
    assert torch.allclose(out_nd.grad, out_n.grad, atol=1e-6)


def test_bfloat16_weights_with_float32_inputs(tiny_sd_path):
    from carv.teachers import DiffusersTeacher

    t32 = DiffusersTeacher.from_pretrained(str(tiny_sd_path))
    t16 = DiffusersTeacher.from_pretrained(str(tiny_sd_path), dtype=torch.bfloat16)
    assert t16.dtype == torch.bfloat16 and next(t16.vae.parameters()).dtype == torch.bfloat16
    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    lat16, lat32 = t16.encode_images(rgb, size=64), t32.encode_images(rgb, size=64)
    assert lat16.dtype == torch.float32 and lat16.shape == (2, 4, 8, 8)
    emb = t16.encode_prompt("a lamp")
    cond, uncond = emb.for_views(torch.tensor([10.0, 20.0]), torch.tensor([0.0, 90.0]))
    assert cond.dtype == torch.float32
    small = lat16
    sds16 = ScoreDistillation(t16, TimestepSampler(1000), K=2, guidance_scale=7.5)
    sds32 = ScoreDistillation(t32, TimestepSampler(1000), K=2, guidance_scale=7.5)
    o16 = sds16(small, cond, torch.Generator().manual_seed(0), uncond=uncond)
    o32 = sds32(small.detach(), cond, torch.Generator().manual_seed(0), uncond=uncond)
    assert o16.grad.dtype == torch.float32 and torch.isfinite(o16.grad).all()
    # bfloat16 keeps ~3 significant digits; guidance 7.5 amplifies the rounding of eps_c - eps_u
    assert float((o16.grad - o32.grad).norm() / o32.grad.norm()) < 0.1
    o16.loss.backward()
    assert rgb.grad.dtype == torch.float32 and torch.isfinite(rgb.grad).all()
    assert float((lat16 - lat32).detach().norm() / lat32.detach().norm()) < 0.05


class UNetBatches:
    def __init__(self, unet):
        self.sizes = []
        self.handle = unet.register_forward_pre_hook(lambda m, args: self.sizes.append(args[0].shape[0]))


def test_max_batch_bounds_what_the_unet_sees_with_guidance(teacher):
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    counter = UNetBatches(teacher.unet)
    try:
        # "auto" at these 4x8x8 latents allows 65536 / 256 = 256 rows: one call; at 4x64x64 it is 4 rows (below)
        for max_batch, guidance, bound in ((4, 7.5, 4), (5, 7.5, 4), ("auto", 7.5, 16), ("auto", 1.0, 8), (3, 1.0, 3),
                                           (None, 7.5, 16)):
            counter.sizes.clear()
            sds = ScoreDistillation(teacher, TimestepSampler(1000), K=4, guidance_scale=guidance, max_batch=max_batch)
            sds(x, cond, 0)
            rows = 2 * 4 * (2 if guidance != 1.0 else 1)
            assert max(counter.sizes) == bound, (max_batch, guidance, counter.sizes)
            assert sum(counter.sizes) == rows
        counter.sizes.clear()
        big_x, big_c = torch.randn(1, 4, 64, 64), torch.randn(1, 16, 32)
        ScoreDistillation(teacher, TimestepSampler(1000), K=5, guidance_scale=7.5)(big_x, big_c, 0)
        assert counter.sizes == [4, 4, 2]  # "auto": 65536 elements = 4 rows of 4x64x64, 10 rows in all
        with pytest.raises(ValueError, match="max_batch: with guidance"):
            ScoreDistillation(teacher, TimestepSampler(1000), K=2, guidance_scale=7.5, max_batch=1)(x, cond, 0)
    finally:
        counter.handle.remove()
    with pytest.raises(ValueError, match="max_batch"):
        ScoreDistillation(teacher, TimestepSampler(1000), max_batch=0)
    with pytest.raises(ValueError, match="max_batch"):
        ScoreDistillation(teacher, TimestepSampler(1000), max_batch="big")


def test_nan_policy_raise_or_skip_the_step(teacher):
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    cond = torch.randn(2, 16, 32)
    real_forward = teacher._forward

    def half_nan(x_t, t, c):
        out = real_forward(x_t, t, c)
        return torch.where((t > 500).view(-1, 1, 1, 1), torch.full_like(out, float("nan")), out)

    teacher._forward = half_nan
    try:
        sampler = TimestepSampler(1000, t_min=600, t_max=700)
        with pytest.raises(NonFiniteTeacherError, match=r"timesteps \[6"):
            ScoreDistillation(teacher, sampler, K=2)(x, cond, 0)
        sds = ScoreDistillation(teacher, sampler, K=2, nan_policy="skip")
        out = sds(x, cond, 0)
        assert out.skipped is not None and "NaN" in out.skipped and sds.skipped_steps == 1
        assert torch.count_nonzero(out.grad) == 0
        out.loss.backward()
        assert x.grad is not None and torch.count_nonzero(x.grad) == 0
        sds.sampler = TimestepSampler(1000, t_min=10, t_max=400)  # the settable sampler: finite draws again
        ok = sds(x, cond, 0)
        assert ok.skipped is None and sds.skipped_steps == 1 and torch.isfinite(ok.grad).all()
    finally:
        teacher._forward = real_forward
    with pytest.raises(ValueError, match="nan_policy"):
        ScoreDistillation(teacher, TimestepSampler(1000), nan_policy="zero")


def test_guidance_convention_carv_at_s_plus_1_is_threestudio_at_s(pipe, teacher):
    x, cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    ts = ScoreDistillation(teacher, TimestepSampler(1000), K=2, guidance_scale=100.0,
                           guidance_convention="threestudio")
    df = ScoreDistillation(teacher, TimestepSampler(1000), K=2, guidance_scale=101.0)
    a = ts(x, cond, torch.Generator().manual_seed(3), uncond=uncond)
    b = df(x, cond, torch.Generator().manual_seed(3), uncond=uncond)
    assert torch.equal(a.grad, b.grad)
    # threestudio's formula eps_c + s (eps_c - eps_u), by hand
    R, K = a.draws.t.shape
    t, eps = a.draws.t.reshape(-1), a.draws.eps.reshape(R * K, 4, 8, 8)
    x_t = teacher.schedule.add_noise(x.repeat_interleave(K, 0), t, eps)
    ec = unet_eps(pipe, x_t, t, cond.repeat_interleave(K, 0))
    eu = unet_eps(pipe, x_t, t, uncond.repeat_interleave(K, 0))
    w = weight_table("sds", teacher.schedule).float()[t].view(-1, 1, 1, 1)
    want = (w * (ec + 100.0 * (ec - eu) - eps)).reshape(R, K, 4, 8, 8).mean(1)
    assert torch.allclose(a.grad, want, atol=2e-3 * float(want.abs().max()))
    with pytest.raises(ValueError, match="guidance_convention"):
        ScoreDistillation(teacher, TimestepSampler(1000), guidance_convention="sd")


def test_percent_ranges_annealing_and_fantasia3d(teacher):
    s = TimestepSampler.from_percent(1000, 0.02, 0.98)
    assert (s.t_min, s.t_max) == (20, 980)  # threestudio: int(T * percent), randint(min, max + 1)
    d = s.sample(64, 4, 0)
    assert d.t.min() >= 20 and d.t.max() <= 980
    imp = weight_table("sds", teacher.schedule)
    s2 = TimestepSampler.from_percent(1000, 0.02, 0.98, importance=imp, floor=0.1, stratify="per_upstream")
    s2.set_t_percent(0.5, 0.6)
    d2 = s2.sample(64, 4, 0)
    assert d2.t.min() >= 500 and d2.t.max() <= 600
    assert torch.allclose(s2.p[500:601], torch.full((101,), 1 / 101, dtype=torch.float64))
    # the weights stay p/q on the new support, so E_q[v f] = E_p[f] exactly
    f = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose((s2.q * s2.weights * f).sum(), (s2.p * f).sum())
    with pytest.raises(ValueError, match="lo: expected a fraction"):
        TimestepSampler.from_percent(1000, -0.1, 0.5)
    with pytest.raises(ValueError, match="t_min, t_max"):
        s2.set_t_range(700, 600)
    # threestudio-style schedules: [start_step, start_value, end_value, end_step]
    spec = [0, 0.98, 0.5, 1000]
    assert scheduled_value(spec, 0) == 0.98 and scheduled_value(spec, 500) == pytest.approx(0.74)
    assert scheduled_value(spec, 5000) == 0.5 and scheduled_value([0.98, 0.5, 1000], 500) == pytest.approx(0.74)
    assert scheduled_value([0, 1.0, 0.0, 2.0], 10**6, epoch=1) == pytest.approx(0.5)  # float end: epochs
    assert scheduled_value(0.3, 7) == 0.3
    with pytest.raises(ValueError, match="spec"):
        scheduled_value([1, 2], 0)
    ac = teacher.schedule.alphas_cumprod
    assert torch.allclose(weight_table("fantasia3d", teacher.schedule), ac.sqrt() * (1 - ac))


# ----------------------------------------------------------------------------------------- threestudio-shaped
class ThreestudioPromptUtils:
    """Only what threestudio's PromptProcessorOutput offers the guidance: get_text_embeddings -> [cond; uncond]."""

    def __init__(self, emb):
        self.emb = emb

    def get_text_embeddings(self, elevation, azimuth, camera_distances, view_dependent_prompting=True):
        return self.emb.get_text_embeddings(elevation, azimuth, camera_distances, view_dependent_prompting)


def test_threestudio_guidance_loss_and_gradient_match_threestudio_formula(pipe, teacher):
    from carv.integrations.threestudio import CarvGuidance

    guidance = CarvGuidance({"guidance_scale": 100.0, "K": 4, "half_precision_weights": False,
                             "max_step_percent": [0, 0.98, 0.5, 100], "seed": 1, "image_size": 64}, teacher=teacher,
                            device="cpu")
    prompt_utils = ThreestudioPromptUtils(teacher.encode_prompt("a snowman"))
    el, az, dist = torch.tensor([15.0, 30.0]), torch.tensor([0.0, 120.0]), torch.tensor([3.0, 3.0])
    latents_bhwc = torch.randn(2, 8, 8, 4, requires_grad=True)  # rgb_as_latents: threestudio's latent path
    out = guidance(latents_bhwc, prompt_utils, el, az, dist, rgb_as_latents=True)
    assert (out["K"], out["R"], out["min_step"], out["max_step"]) == (4, 2, 20, 980)
    sds_out = guidance.last_output
    lat = latents_bhwc.detach().permute(0, 3, 1, 2)
    cond, uncond = prompt_utils.emb.for_views(el, az)
    grad = hand_sds(pipe, teacher, lat, sds_out, cond, uncond, 101.0)  # threestudio's s = 100 is carv's 101
    assert torch.allclose(sds_out.grad, grad, atol=2e-3 * float(grad.abs().max()))
    # loss_sds = 0.5 * mse(latents, (latents - grad).detach(), sum) / B, and d loss_sds / d latents = grad / B
    g = sds_out.grad
    assert float(out["loss_sds"].detach()) == pytest.approx(0.5 * float(g.pow(2).sum()) / 2, rel=1e-5)
    out["loss_sds"].backward()
    assert torch.allclose(latents_bhwc.grad, (g / 2).permute(0, 2, 3, 1), atol=1e-7)
    assert float(out["grad_norm"]) == pytest.approx(float(g.norm()), rel=1e-6)
    assert out["between"] >= 0 and out["within"] >= 0 and out["skipped"] == 0.0

    # the rgb path: render [B, H, W, 3] -> 8x latent size -> VAE posterior sample -> SDS, gradient reaches rgb
    rgb = torch.rand(2, 32, 32, 3, requires_grad=True)
    out_rgb = guidance(rgb, prompt_utils, el, az, dist)
    out_rgb["loss_sds"].backward()
    assert rgb.grad.shape == rgb.shape and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0

    # update_step: annealed max_step_percent (threestudio's [start_step, start, end, end_step]) and grad clipping
    guidance.update_step(epoch=0, global_step=50)
    assert guidance.max_step == 740 and guidance.sds.sampler.t_max == 740
    out2 = guidance(latents_bhwc, prompt_utils, el, az, dist, rgb_as_latents=True)
    assert out2["max_step"] == 740 and int(guidance.last_output.draws.t.max()) <= 740
    guidance.cfg.grad_clip = [0, 1e-3, 1e-3, 10]
    guidance.update_step(epoch=0, global_step=60)
    out3 = guidance(latents_bhwc, prompt_utils, el, az, dist, rgb_as_latents=True)
    assert float(out3["grad_norm"]) <= 1e-3 * (2 * 4 * 8 * 8) ** 0.5 * (1 + 1e-5)  # every entry clipped to 1e-3

    with pytest.raises(ValueError, match="cfg: unknown key"):
        CarvGuidance({"guidance_scal": 100.0}, teacher=teacher, device="cpu")


# ----------------------------------------------------------------------------------------- carv text-to-3d --teacher
def test_text_to_3d_with_a_stable_diffusion_folder_end_to_end(tiny_sd_path, tmp_path):
    """render -> VAE encode -> latent SDS through the same trainer, run folder and (with --compare) comparison."""
    import json

    from typer.testing import CliRunner

    from carv.cli import app

    out = tmp_path / "run"
    args = ["text-to-3d", "a snowman", "--teacher", str(tiny_sd_path), "--out", str(out), "--steps", "3",
            "--R", "2", "--K", "2", "--grid-resolution", "12", "--render-size", "32", "--n-samples", "8",
            "--guidance-scale", "7.5", "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["teacher"] == str(tiny_sd_path)
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in ln]
    steps = [r for r in steps if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["grad_x_norm"] > 0 for r in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["c_upstream_s"] > 0 and summary["c_draw_s"] > 0
    for f in ("turntable.png", "comparison.png", "carv-run.json"):
        assert (out / f).is_file(), f
    assert list(out.glob("checkpoint-*.safetensors")), "no checksummed checkpoint was written"
    # the latents the teacher saw: 8x the UNet's latent size in, latents out
    from carv.apps.text_to_3d import TextTo3DConfig, problem_for
    from carv.apps.text_to_3d.latent import LatentSceneProblem, load_sd_teacher

    problem = problem_for(TextTo3DConfig(prompt="a snowman", render_size=32, n_samples=8, n_eval_views=2,
                                          teacher=str(tiny_sd_path)), load_sd_teacher(tiny_sd_path))
    assert isinstance(problem, LatentSceneProblem) and problem.vae_size == 64
    grid = problem.new_grid(12, 5.0)
    cams = problem.cameras(2, torch.Generator().manual_seed(0))
    latents, opacity = problem.teacher_input(grid, cams)
    assert latents.shape == (2, 4, 8, 8) and opacity.shape == (2, 1, 32, 32)
    cond = problem.condition(cams)
    assert cond["cond"].shape == cond["uncond"].shape == (2, 16, 32)


def test_text_to_3d_refuses_unknown_teacher_folders(tmp_path):
    from typer.testing import CliRunner

    from carv.cli import app

    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["text-to-3d", "--teacher", str(tmp_path / "empty"), "--steps", "1"])
    assert res.exit_code != 0 and "model_index.json" in res.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["x", "y"]}')
    res = CliRunner().invoke(app, ["text-to-3d", "--teacher", str(other), "--steps", "1"])
    assert res.exit_code != 0 and "FluxPipeline" in res.output


def test_threestudio_guidance_auto_k_runs_the_accountant_from_update_step(teacher):
    from carv.accounting import optimal_k
    from carv.integrations.threestudio import CarvGuidance

    guidance = CarvGuidance({"K": 2, "auto_k": True, "probe_every": 1, "choose_every": 2, "k_max": 8,
                             "proposal": "none", "stratify": "none", "image_size": 64}, teacher=teacher, device="cpu")
    prompt_utils = ThreestudioPromptUtils(teacher.encode_prompt("a lamp"))
    el, az, dist = torch.tensor([15.0, 30.0]), torch.tensor([0.0, 120.0]), torch.tensor([3.0, 3.0])
    for step in range(3):
        guidance.update_step(epoch=0, global_step=step)  # closes the previous step, opens this one
        latents = torch.randn(2, 8, 8, 4, requires_grad=True, generator=torch.Generator().manual_seed(step))
        guidance(latents, prompt_utils, el, az, dist, rgb_as_latents=True)["loss_sds"].backward()
    acc = guidance.accountant
    assert acc.steps == 2 and acc.probes == 2 and acc.current is not None
    row, a = acc.history[-1], acc.allocator
    assert row["rechosen"]
    want = optimal_k(a.between, a.within, acc.meter.median("upstream"), acc.meter.median("draw"), k_max=8, k_min=2)
    assert row["next_K"] == want == guidance.K


# ----------------------------------------------------------------------------------------- inputs carv refuses
def test_tokenizer_without_model_max_length_falls_back_to_the_text_encoder(pipe):
    """Item 7: a tokenizer built from vocab/merges without model_max_length (transformers' huge default) pads to
    the text encoder's max_position_embeddings instead of overflowing."""
    import copy

    from carv.teachers import DiffusersTeacher

    p = copy.copy(pipe)
    p.tokenizer = copy.deepcopy(pipe.tokenizer)
    p.tokenizer.model_max_length = int(1e30)
    teacher = DiffusersTeacher.from_pipeline(p)
    positions = pipe.text_encoder.config.max_position_embeddings
    assert teacher.text_length == positions and teacher.encode_text(["a cat"]).shape[1] == positions


def test_encode_images_takes_floats_in_unit_range_and_the_unet_takes_latents(teacher):
    """Item 8: uint8 images, 0-255 floats and [-1, 1] images are refused with the fix; images passed where
    latents belong get a carv hint; for_views refuses a radian batch."""
    img = torch.rand(2, 3, 64, 64)
    assert teacher.encode_images(img, size=None).shape == (2, 4, 8, 8)
    with pytest.raises(TypeError, match=r"rgb: .*float.*\[0, 1\].*uint8.*/ 255"):
        teacher.encode_images((img * 255).to(torch.uint8), size=None)
    with pytest.raises(ValueError, match="divide by 255"):
        teacher.encode_images(img * 255, size=None)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        teacher.encode_images(img * 2 - 1, size=None)
    emb = teacher.encode_prompt("a cat")
    cond = emb.for_views(torch.tensor([10.0, 20.0]), torch.tensor([0.0, 90.0]))[0]
    with pytest.raises(ValueError, match=r"x_t: the UNet takes \[B, 4, H, W\].*encode_images"):
        teacher.predict_eps(img, torch.tensor([500, 500]), cond)
    with pytest.raises(ValueError, match="azimuth: expected degrees"):
        emb.for_views(torch.tensor([0.2, 0.5]), torch.tensor([0.0, 3.1]))
    emb.for_views(torch.tensor([0.2, 0.5]), torch.tensor([0.0, 3.1]), check_degrees=False)
    emb.for_views(torch.tensor([0.2]), torch.tensor([3.1]))  # one view: undecidable, accepted
    emb.for_views(torch.tensor([0.0, 30.0]), torch.tensor([-3.0, 3.0]))  # degree elevations above pi/2


def test_text_to_3d_with_a_stable_diffusion_folder_takes_any_prompt(tiny_sd_path, tmp_path):
    """Item 6: a prompt without a procedural scene runs with --teacher: turntable, step metrics, held-out opacity
    and the accounting, no ground-truth comparison; without --teacher, or with --compare, it is refused."""
    import json

    from typer.testing import CliRunner

    from carv.cli import app

    out = tmp_path / "cat"
    args = ["text-to-3d", "a cat / on a mat", "--teacher", str(tiny_sd_path), "--out", str(out), "--steps", "2",
            "--R", "2", "--K", "2", "--grid-resolution", "12", "--render-size", "32", "--n-samples", "8",
            "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "no ground truth" in res.output
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [r["step"] for r in rows if r.get("kind") == "step"] == [1, 2]
    assert evals and all("psnr" not in r and 0.0 <= r["opacity"] <= 1.0 for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt"] == "a cat / on a mat" and summary["c_upstream_s"] > 0 and summary["c_draw_s"] > 0
    assert (out / "turntable.png").is_file() and (out / "k_and_proposal.png").is_file()
    assert not (out / "comparison.png").exists()
    from carv.apps.text_to_3d.run import slug

    assert slug("a cat / on a mat") == "a-cat-on-a-mat"
    res = CliRunner().invoke(app, ["text-to-3d", "a cat", "--steps", "1"])
    assert res.exit_code != 0 and "allowed prompts" in res.output
    res = CliRunner().invoke(app, ["text-to-3d", "a cat", "--teacher", str(tiny_sd_path), "--compare", "--steps", "1"])
    assert res.exit_code != 0 and "ground truth" in res.output


def test_encode_images_names_every_bad_argument_in_one_line(teacher):
    """NaN/inf images, an empty batch, a size the VAE cannot halve three times, tiny images, a generator that is
    not one, and integer latents: one ValueError/TypeError naming the argument (not a torch or diffusers error)."""
    img = torch.rand(2, 3, 64, 64)
    for bad in (float("nan"), float("inf")):
        x = img.clone()
        x[1, 0, 3, 3] = bad
        with pytest.raises(ValueError, match=r"^rgb: expected finite .* image\(s\) \[1\] of 2$"):
            teacher.encode_images(x, size=None)
    with pytest.raises(ValueError, match="^rgb: expected at least one image"):
        teacher.encode_images(torch.rand(0, 3, 64, 64), size=None)
    for size in (0, -8, 63, "64", 64.0):
        with pytest.raises(ValueError, match=rf"^size: expected a positive multiple of 8 .*got {size!r}$"):
            teacher.encode_images(img, size=size)
    with pytest.raises(ValueError, match=r"^rgb: expected images of at least 8 x 8"):
        teacher.encode_images(torch.rand(1, 3, 4, 4), size=None)
    with pytest.raises(TypeError, match="^generator: expected a torch.Generator"):
        teacher.encode_images(img, size=None, generator=0)
    with pytest.raises(TypeError, match="^latents: expected floating-point"):
        teacher.decode_latents(torch.zeros(1, 4, 8, 8, dtype=torch.long))
    assert teacher.encode_images(img.double(), size=None).dtype == torch.float64  # other float dtypes are fine
    with pytest.raises(ValueError, match=r"^rgb: on meta, but the teacher's AutoencoderKL is on cpu; .*\.to\('cpu'\)"):
        teacher.encode_images(img.to("meta"), size=None)
    with pytest.raises(ValueError, match="^latents: on meta, but the teacher's AutoencoderKL is on cpu"):
        teacher.decode_latents(torch.zeros(1, 4, 8, 8, device="meta"))


def test_prompt_and_angle_arguments_are_named_when_bad(teacher):
    """for_views: scalars, 2-D, mismatched (with or without view-dependent prompting), NaN and string angles;
    encode_prompt/encode_text: non-string negatives, thresholds that are not numbers, an empty prompt list."""
    emb = teacher.encode_prompt("a cat")
    el, az = torch.tensor([10.0, 20.0]), torch.tensor([0.0, 90.0])
    cases = [((0.0, 90.0), r"^elevation: expected a tensor \[B\].*shape \(\)$"),
             ((el[:, None], az[:, None]), r"^elevation: .*shape \(2, 1\)$"),
             ((torch.tensor([float("nan"), 0.0]), az), "^elevation: expected finite angles"),
             ((el, torch.tensor([0.0, 90.0, 5.0])), r"^elevation, azimuth: .*\(2,\) and \(3,\)$")]
    for (e, a), msg in cases:
        for vd in (True, False):
            with pytest.raises(ValueError, match=msg):
                emb.for_views(e, a, view_dependent_prompting=vd)
    with pytest.raises(TypeError, match="^elevation: expected a tensor"):
        emb.for_views("a", "b")
    with pytest.raises(TypeError, match="^negative_prompt: expected a string"):
        teacher.encode_prompt("a cat", negative_prompt=3)
    with pytest.raises(TypeError, match=r"^negative_prompts_vd\['side'\]: expected a string"):
        teacher.encode_prompt("a cat", negative_prompts_vd={"side": 3})
    with pytest.raises(ValueError, match="^front_threshold: expected an angle"):
        teacher.encode_prompt("a cat", front_threshold="x")
    with pytest.raises(ValueError, match="^prompts: expected at least one prompt"):
        teacher.encode_text([])


def test_from_pipeline_with_odd_tokenizers(pipe):
    """A tokenizer whose model_max_length is 0 or None takes the text encoder's length; one without a pad token
    is refused with the fix; a non-string negative prompt is named."""
    import copy

    from carv.teachers import DiffusersTeacher

    positions = pipe.text_encoder.config.max_position_embeddings
    for n in (0, None, -1):
        p = copy.copy(pipe)
        p.tokenizer = copy.deepcopy(pipe.tokenizer)
        p.tokenizer.model_max_length = n
        teacher = DiffusersTeacher.from_pipeline(p)
        assert teacher.text_length == positions
        assert teacher.encode_text(["a cat", "a much longer prompt about a cat"]).shape[1] == positions
    p = copy.copy(pipe)
    p.tokenizer = copy.deepcopy(pipe.tokenizer)
    p.tokenizer.pad_token = None
    with pytest.raises(ValueError, match="^pipe.tokenizer: .*no pad_token.*eos_token"):
        DiffusersTeacher.from_pipeline(p)
    with pytest.raises(TypeError, match="^negative_prompt: expected a string, got int$"):
        DiffusersTeacher.from_pipeline(pipe, negative_prompt=3)


def test_run_folder_names_of_long_and_unicode_prompts():
    """A prompt longer than a file name allows gets a cut name ending in a hash (distinct for distinct prompts);
    short prompts keep their readable names."""
    from carv.apps.text_to_3d.run import slug

    long = "a very long prompt about a cat " * 12
    a, b = slug(long), slug(long + "on a mat")
    assert a != b and len(a.encode()) <= 120 and len(b.encode()) <= 120 and a.startswith("a-very-long-prompt")
    cjk = slug("中文" * 100)
    assert len(cjk.encode()) <= 120 and cjk.startswith("中文")
    assert slug("ein Kätzchen / ../etc") == "ein-Kätzchen-..-etc" and "/" not in slug("../../x")
    assert slug("a red mushroom") == "a-red-mushroom" and slug("🐱") == "prompt"
