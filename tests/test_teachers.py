"""Teachers: the Gaussian-mixture closed form against autograd of the exact log density; the diffusers
adapter against calling the UNet directly (epsilon and v_prediction, guidance); the compact UNet."""

import pytest
import torch

from carv import VPSchedule
from carv.teachers import CompactUNet, GaussianMixtureTeacher, UNetTeacher, load_unet_teacher, save_unet_teacher

SCHED = VPSchedule.from_betas(1e-4, 0.02, 1000)


def log_density(x, t, means, std, weights):
    a, s = SCHED.a(t, torch.float64)[:, None], SCHED.s(t, torch.float64)[:, None]
    comps = []
    for k in range(means.shape[0]):
        var = a**2 * std[k] ** 2 + s**2
        d = torch.distributions.Normal(a * means[k], var.sqrt())
        comps.append(torch.log(weights[k]) + d.log_prob(x).sum(-1))
    return torch.logsumexp(torch.stack(comps, -1), -1)


def test_gmm_eps_is_minus_s_times_score():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 3, generator=g, dtype=torch.float64)
    std = torch.tensor([0.1, 0.3, 0.5, 1.0], dtype=torch.float64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    teacher = GaussianMixtureTeacher(means, std, w, SCHED)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 1000, (16,), generator=g)
    (score,) = torch.autograd.grad(log_density(x, t, means, std, w).sum(), x)
    expected = -SCHED.s(t, torch.float64)[:, None] * score
    assert torch.allclose(teacher.predict_eps(x.detach(), t), expected, atol=1e-9)


def test_gmm_eps_is_the_mmse_denoiser():
    """Monte Carlo: E[eps | x_t] regressed on exact samples agrees with eps_hat (loss lower than any perturbation)."""
    teacher = GaussianMixtureTeacher(torch.tensor([[-2.0], [2.0]]), 0.5, None, SCHED)
    g = torch.Generator().manual_seed(1)
    x0 = teacher.sample(20000, g)
    t = torch.full((20000,), 400)
    eps = torch.randn(x0.shape, generator=g)
    xt = SCHED.add_noise(x0, t, eps)
    eh = teacher.predict_eps(xt, t)
    mse = (eh - eps).pow(2).mean()
    for delta in (0.9, 1.1):
        assert mse < (delta * eh - eps).pow(2).mean()


def test_gmm_conditional_and_null():
    teacher = GaussianMixtureTeacher(torch.tensor([[-2.0], [2.0]]), 0.5, None, SCHED)
    x, t = torch.zeros(2, 1), torch.tensor([500, 500])
    single = GaussianMixtureTeacher(torch.tensor([[2.0]]), 0.5, None, SCHED).predict_eps(x, t)
    assert torch.allclose(teacher.predict_eps(x, t, torch.tensor([1, 1])), single, atol=1e-6)
    assert torch.allclose(teacher.predict_eps(x, t, torch.tensor([-1, -1])), teacher.predict_eps(x, t))
    c = torch.tensor([1, 1])
    guided = teacher.guided_eps(x, t, c, 4.0)
    eu, ec = teacher.predict_eps(x, t), teacher.predict_eps(x, t, c)
    assert torch.allclose(guided, eu + 4.0 * (ec - eu), atol=1e-6)
    with pytest.raises(ValueError, match="cond"):
        teacher.predict_eps(x, t, torch.tensor([2, 0]))


def test_gmm_bad_args():
    with pytest.raises(ValueError, match="means"):
        GaussianMixtureTeacher(torch.zeros(3), 1.0, None, SCHED)
    with pytest.raises(ValueError, match="std"):
        GaussianMixtureTeacher(torch.zeros(3, 2), -1.0, None, SCHED)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureTeacher(torch.zeros(3, 2), 1.0, torch.ones(2), SCHED)
    with pytest.raises(TypeError, match="schedule"):
        GaussianMixtureTeacher(torch.zeros(3, 2), 1.0, None, "linear")


def test_compact_unet_teacher_save_load_roundtrip(tmp_path):
    model = CompactUNet(in_channels=1, base_channels=8, channel_mults=(1, 2), cond_classes=(3,))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_unet_teacher(tmp_path / "t.safetensors", model, SCHED, {"name": "tiny"})
    teacher = load_unet_teacher(tmp_path / "t.safetensors")
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    assert torch.allclose(teacher.predict_eps(x, t, c), UNetTeacher(model, SCHED).predict_eps(x, t, c))
    assert teacher.meta == {"name": "tiny"}
    assert torch.equal(teacher.null_cond(c), torch.tensor([3, 3]))
    with pytest.raises(FileNotFoundError, match="path"):
        load_unet_teacher(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------- diffusers
diffusers = pytest.importorskip("diffusers")


def tiny_unet2d(**kw):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), **kw).eval()


def tiny_cond_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                          attention_head_dim=2,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def test_diffusers_teacher_epsilon_matches_unet():
    from carv.teachers import DiffusersTeacher

    unet = tiny_unet2d()
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000)
    teacher = DiffusersTeacher(unet, sch)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(teacher.predict_eps(x, t), unet(x, t).sample)


def test_diffusers_teacher_v_prediction_converts_to_eps():
    from carv.teachers import DiffusersTeacher

    unet = tiny_unet2d()
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    teacher = DiffusersTeacher(unet, sch)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        v = unet(x, t).sample
    ac = sch.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(teacher.predict_eps(x, t), ac.sqrt() * v + (1 - ac).sqrt() * x, atol=1e-6)


def test_diffusers_v_prediction_roundtrip_on_exact_data():
    """If the UNet outputs the true v, the adapter returns the true eps."""
    from carv.teachers import DiffusersTeacher

    class Oracle(torch.nn.Module):
        pass

    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    teacher = DiffusersTeacher(tiny_unet2d(), sch)
    x0, eps, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([100, 700])
    a = teacher.schedule.a(t)[:, None, None, None]
    s = teacher.schedule.s(t)[:, None, None, None]
    xt, v = a * x0 + s * eps, a * eps - s * x0
    teacher._forward = lambda *_: v
    assert torch.allclose(teacher.predict_eps(xt, t), eps, atol=1e-5)


def test_diffusers_condition_unet_with_guidance():
    from carv.teachers import DiffusersTeacher

    unet = tiny_cond_unet()
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000)
    uncond = torch.zeros(1, 5, 8)
    teacher = DiffusersTeacher(unet, sch, uncond=uncond)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 8)
    with torch.no_grad():
        ec = unet(x, t, encoder_hidden_states=c).sample
        eu = unet(x, t, encoder_hidden_states=uncond.expand(2, 5, 8)).sample
        # the teacher runs cond and uncond as one batch of 4; fp32 kernels may sum in another order for another
        # batch size (seen on 1 thread), and guidance multiplies that rounding by 7.5: allow 1e-4, not 1e-5
        assert torch.allclose(teacher.guided_eps(x, t, c, 7.5), eu + 7.5 * (ec - eu), atol=1e-4)
    with pytest.raises(ValueError, match="cond"):
        teacher.predict_eps(x, t, None)


def test_diffusers_teacher_drives_score_distillation():
    from carv import ScoreDistillation, TimestepSampler, weight_table
    from carv.teachers import DiffusersTeacher

    sch = diffusers.DDPMScheduler(num_train_timesteps=1000)
    teacher = DiffusersTeacher(tiny_unet2d(), sch)
    sampler = TimestepSampler(1000, importance=weight_table("sds", teacher.schedule), floor=0.1,
                              stratify="per_upstream")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = ScoreDistillation(teacher, sampler, K=4, max_batch=3)(x, generator=0)
    out.loss.backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_diffusers_bad_args():
    from carv.teachers import DiffusersTeacher

    with pytest.raises(TypeError, match="unet"):
        DiffusersTeacher(torch.nn.Linear(2, 2), diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersTeacher(tiny_unet2d(), diffusers.DDPMScheduler(), prediction_type="score")
    with pytest.raises(ValueError, match="uncond"):
        DiffusersTeacher(tiny_cond_unet(), diffusers.DDPMScheduler(), uncond=torch.zeros(8))
