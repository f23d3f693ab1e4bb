import pytest
import torch

from carv import VPSchedule


def test_linear_betas_match_ddpm_definition():
    s = VPSchedule.from_betas(1e-4, 0.02, 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - betas, 0))
    t = torch.tensor([0, 10, 999])
    assert torch.allclose(s.a(t, torch.float64) ** 2 + s.s(t, torch.float64) ** 2, torch.ones(3, dtype=torch.float64))


def test_scaled_linear_and_cosine_are_decreasing():
    for s in (VPSchedule.from_betas(0.00085, 0.012, 1000, "scaled_linear"), VPSchedule.cosine(1000)):
        assert (torch.diff(s.alphas_cumprod) < 0).all()
        assert 0 < s.alphas_cumprod[-1] < s.alphas_cumprod[0] <= 1


def test_from_diffusers_matches_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012)
    s = VPSchedule.from_diffusers(sch)
    assert torch.allclose(s.alphas_cumprod, sch.alphas_cumprod.double(), atol=1e-6)
    ref = VPSchedule.from_betas(0.00085, 0.012, 1000, "scaled_linear")
    assert torch.allclose(s.alphas_cumprod, ref.alphas_cumprod, atol=1e-6)


def test_add_noise_broadcasts():
    s = VPSchedule.from_betas()
    x, e, t = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.tensor([0, 500, 999])
    out = s.add_noise(x, t, e)
    assert torch.allclose(out[1], s.a(t)[1] * x[1] + s.s(t)[1] * e[1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="kind"):
        VPSchedule.from_betas(kind="quadratic")
    with pytest.raises(ValueError, match="beta_start"):
        VPSchedule.from_betas(0.1, 0.01)
    with pytest.raises(ValueError, match="num_timesteps"):
        VPSchedule.cosine(0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule(torch.tensor([0.5, 1.5]))
    with pytest.raises(TypeError, match="scheduler"):
        VPSchedule.from_diffusers(object())
    s = VPSchedule.from_betas()
    with pytest.raises(ValueError, match="t: timesteps must lie in 0..999"):
        s.a(torch.tensor([1000]))
    with pytest.raises(TypeError, match="t: expected an integer"):
        s.a(torch.tensor([0.5]))


def test_add_noise_works_inside_vmap_and_grad():
    from torch.func import grad, vmap

    s = VPSchedule.from_betas()
    x, e, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 10, 500, 999])
    out = vmap(lambda xi, ti, ei: s.add_noise(xi[None], ti[None], ei[None])[0])(x, t, e)
    assert torch.allclose(out, s.add_noise(x, t, e))
    g = vmap(grad(lambda xi, ti, ei: s.add_noise(xi[None], ti[None], ei[None]).sum()))(x, t, e)
    assert torch.allclose(g, s.a(t)[:, None].expand(4, 3))
