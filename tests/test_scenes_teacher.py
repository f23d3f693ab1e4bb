"""The committed text-to-3D teacher (prompt + view conditioned DDPM on renders of the procedural scenes)."""

import functools

import pytest
import torch

from carv.render import PROMPTS, SCENES, VIEW_NAMES, cameras_from_angles, random_cameras
from carv.teachers.scenes import (
    BACKGROUND,
    IMAGE_SIZE,
    assets_dir,
    load_scenes_teacher,
    render_views,
    scene_cond,
)

# Held-out protocol: 2 fresh views per prompt (camera seed 2024, never used in training), rendered
# from the analytic fields without supersampling (cheaper than, and slightly sharper than, the training
# renders), each noised at the 5 midpoint timesteps t = 100, 300, ..., 900 with noise seed 0.
# eps_hat = 0 scores 1.0; the committed teacher scores about 0.008 here (the stats JSON has the
# 10-timestep, 16-view protocol and the best linear predictor's 0.02 for comparison).
HELDOUT_MSE_THRESHOLD = 0.02
N_T = 5


@functools.lru_cache(maxsize=1)
def _teacher():
    return load_scenes_teacher()


@functools.lru_cache(maxsize=1)
def _heldout():
    g = torch.Generator().manual_seed(2024)
    xs, cs = [], []
    for prompt in PROMPTS:
        cams = random_cameras(2, g)
        xs.append(render_views(prompt, cams, baked=False, supersample=1))
        cs.append(scene_cond(prompt, cams))
    x0, cond = torch.cat(xs), torch.cat(cs)
    T = _teacher().schedule.num_timesteps
    t = ((torch.arange(N_T) + 0.5) * T / N_T).long().repeat(x0.shape[0])
    x0, cond = x0.repeat_interleave(N_T, 0), cond.repeat_interleave(N_T, 0)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    return x0, cond, t, eps


@torch.no_grad()
def _per_draw_mse(cond):
    teacher = _teacher()
    x0, _, t, eps = _heldout()
    x_t = teacher.schedule.add_noise(x0, t, eps)
    return (teacher.predict_eps(x_t, t, cond) - eps).pow(2).flatten(1).mean(1)


@functools.lru_cache(maxsize=1)
def _right():
    return _per_draw_mse(_heldout()[1])


def test_committed_teacher_loads_with_its_conventions():
    path = assets_dir() / "scenes_teacher.safetensors"
    assert path.is_file() and path.stat().st_size < 10e6
    teacher = _teacher()
    assert teacher.meta["prompts"] == list(PROMPTS)
    assert teacher.meta["views"] == list(VIEW_NAMES)
    assert teacher.meta["render"]["image_size"] == IMAGE_SIZE
    assert teacher.meta["render"]["background"] == BACKGROUND
    assert teacher.model.cond_classes == (len(PROMPTS), 3)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_heldout_denoising_mse_is_far_below_trivial():
    eps = _heldout()[3]
    trivial = eps.pow(2).mean().item()
    per = _right()
    mse, se = per.mean().item(), (per.std() / per.numel() ** 0.5).item()
    print(f"held-out denoising MSE {mse:.4f} +- {se:.4f} (eps_hat = 0: {trivial:.3f})")
    assert abs(trivial - 1.0) < 0.02
    assert mse < HELDOUT_MSE_THRESHOLD


def test_teacher_uses_the_prompt():
    """Another prompt's label gives a larger denoising error on the same held-out draws (paired
    differences, asserted at 3 standard errors)."""
    cond = _heldout()[1]
    wrong = cond.clone()
    wrong[:, 0] = (cond[:, 0] + len(PROMPTS) // 2) % len(PROMPTS)
    d = _per_draw_mse(wrong) - _right()
    se = d.std() / d.numel() ** 0.5
    print(f"wrong prompt: +{d.mean():.4f} +- {se:.4f}")
    assert d.mean() > 3 * se


@torch.no_grad()
def test_teacher_uses_the_view():
    """Front and back renders of the front/back-asymmetric scenes (az 0 / 180, el 20) denoise better
    with their own view label than with the swapped one (t = 100, 200, 300; paired, 3 standard errors)."""
    teacher = _teacher()
    cams = cameras_from_angles([0.0, 180.0], [20.0, 20.0])
    prompts = [p for p in PROMPTS if SCENES[p].front_point is not None]
    x0 = torch.cat([render_views(p, cams, baked=False, supersample=1) for p in prompts])
    cond = torch.cat([scene_cond(p, cams) for p in prompts])
    ts = torch.tensor([100, 200, 300])
    t = ts.repeat(x0.shape[0])
    x0, cond = x0.repeat_interleave(len(ts), 0), cond.repeat_interleave(len(ts), 0)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = teacher.schedule.add_noise(x0, t, eps)
    swapped = torch.stack([cond[:, 0], 2 - cond[:, 1]], 1)
    right = (teacher.predict_eps(x_t, t, cond) - eps).pow(2).flatten(1).mean(1)
    wrong = (teacher.predict_eps(x_t, t, swapped) - eps).pow(2).flatten(1).mean(1)
    d = wrong - right
    se = d.std() / d.numel() ** 0.5
    print(f"front <-> back: +{d.mean():.4f} +- {se:.4f} over {d.numel()} draws")
    assert d.mean() > 3 * se


def test_guided_prediction_is_finite():
    teacher = _teacher()
    cond = scene_cond("a snowman", [0.0, 90.0, 180.0])
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    eps = teacher.guided_eps(x, torch.tensor([10, 500, 990]), cond, guidance_scale=5.0)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_scene_cond_maps_prompt_and_camera_to_labels():
    cams = cameras_from_angles([0.0, 60.0, -100.0, 170.0], 20.0)
    cond = scene_cond("  A Purple  Chair", cams)
    k = PROMPTS.index("a purple chair")
    assert cond.tolist() == [[k, 0], [k, 1], [k, 1], [k, 2]]
    assert scene_cond("a snowman", [10.0, -150.0]).tolist() == [[PROMPTS.index("a snowman"), 0]] + [
        [PROMPTS.index("a snowman"), 2]]


def test_scene_cond_rejects_unknown_prompts():
    with pytest.raises(ValueError, match="prompt.*a flying car.*allowed prompts"):
        scene_cond("a flying car", [0.0])
