"""Renderer, cameras and procedural scenes (fast, CPU, fixed seeds)."""

import math

import pytest
import torch
from torch.func import functional_call

from carv.render import (
    PROMPTS,
    SCENES,
    VoxelGrid,
    cameras_from_angles,
    get_scene,
    random_cameras,
    render,
    render_rays,
    turntable_cameras,
    view_label,
)
from carv.render.volume import ray_box_intersect


def _random_grid(res=4, seed=0, dtype=torch.float64, **kw):
    g = torch.Generator().manual_seed(seed)
    grid = VoxelGrid(res, **kw).to(dtype)
    with torch.no_grad():
        grid.density.copy_(torch.randn(grid.density.shape, generator=g, dtype=dtype) * 2 + 5)
        grid.color.copy_(torch.randn(grid.color.shape, generator=g, dtype=dtype))
    return grid


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("activation", ["softplus", "exp"])
def test_gradients_match_finite_differences(activation):
    """d(render)/d(density grid, colour grid) from autograd equals central finite differences (float64)."""
    grid = _random_grid(res=3, density_activation=activation, density_bias=-5.0, density_scale=1.0)
    cams = cameras_from_angles([20.0, 200.0], [15.0, 30.0], dtype=torch.float64)
    # two random projections of every output pixel (rgb, opacity, depth): one backward pass each
    w = torch.randn(2, 2, 5, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def f(density, color):
        field = lambda p: functional_call(grid, {"density": density, "color": color}, (p,))  # noqa: E731
        out = render(field, cams, 3, n_samples=6, background=(0.2, 0.5, 0.9), need_depth=True)
        return (torch.cat([out.rgb, out.opacity, out.depth], 1) * w).flatten(1).sum(1)

    assert torch.autograd.gradcheck(f, (grid.density.detach().clone().requires_grad_(True),
                                        grid.color.detach().clone().requires_grad_(True)),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradients_reach_both_grids():
    grid = _random_grid(res=8, dtype=torch.float32)
    out = render(grid, random_cameras(3, torch.Generator().manual_seed(0)), 8, n_samples=16)
    (out.rgb.mean() + out.opacity.mean()).backward()
    assert grid.density.grad.abs().sum() > 0 and grid.color.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- cameras
def test_known_points_project_to_expected_pixels():
    H = W = 32
    cam = cameras_from_angles(0.0, 0.0, radius=3.0, fov_deg=40.0, dtype=torch.float64)
    f = 0.5 * H / math.tan(math.radians(20.0))
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    uv, depth = cam.project(pts, H, W)
    expected = torch.tensor([[16.0, 16.0], [16.0 + f * 0.5 / 3.0, 16.0], [16.0, 16.0 - f * 0.5 / 3.0],
                             [16.0, 16.0]], dtype=torch.float64)
    torch.testing.assert_close(uv[0], expected)  # world +y is image right, +z is image up
    torch.testing.assert_close(depth[0], torch.tensor([3.0, 3.0, 3.0, 2.0], dtype=torch.float64))


def test_camera_positions_follow_the_convention():
    cams = cameras_from_angles([0.0, 90.0, 180.0, -90.0, 0.0], [0.0, 0.0, 0.0, 0.0, 30.0], radius=2.0,
                               dtype=torch.float64)
    s, c = math.sin(math.radians(30)), math.cos(math.radians(30))
    expected = torch.tensor([[2, 0, 0], [0, 2, 0], [-2, 0, 0], [0, -2, 0], [2 * c, 0, 2 * s]], dtype=torch.float64)
    torch.testing.assert_close(cams.position, expected)
    # every camera looks at the origin: the forward axis (third column) points from the camera to 0
    torch.testing.assert_close(cams.rotation[..., 2], -cams.position / 2.0)
    # the rotation is orthonormal and right-handed
    eye = torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    torch.testing.assert_close(cams.rotation.transpose(1, 2) @ cams.rotation, eye)


def test_rays_and_projection_agree():
    cams = random_cameras(3, torch.Generator().manual_seed(3), dtype=torch.float64)
    H, W = 5, 7
    o, d = cams.rays(H, W)
    pts = (o + 1.7 * d).reshape(3, -1, 3)
    uv, _ = cams.project(pts, H, W)
    jj, ii = torch.meshgrid(torch.arange(W, dtype=torch.float64), torch.arange(H, dtype=torch.float64),
                            indexing="xy")
    centres = torch.stack([jj + 0.5, ii + 0.5], -1).reshape(-1, 2)
    torch.testing.assert_close(uv, centres.expand(3, -1, -1))
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(3, H, W, dtype=torch.float64))


def test_random_cameras_are_reproducible_and_cover_the_ranges():
    a = random_cameras(500, torch.Generator().manual_seed(7), elevation_range=(5.0, 25.0))
    b = random_cameras(500, torch.Generator().manual_seed(7), elevation_range=(5.0, 25.0))
    torch.testing.assert_close(a.position, b.position)
    assert a.elevation_deg.min() >= 5.0 and a.elevation_deg.max() <= 25.0
    assert a.azimuth_deg.min() < -170 and a.azimuth_deg.max() > 170
    # the view labels of uniform azimuths: front 1/4, side 1/2, back 1/4 (binomial, 5 sigma)
    frac = torch.bincount(a.view_labels, minlength=3).double() / 500
    sd = (0.25 * 0.75 / 500) ** 0.5
    assert abs(frac[0] - 0.25) < 5 * sd and abs(frac[2] - 0.25) < 5 * sd


def test_turntable_is_evenly_spaced():
    cams = turntable_cameras(8, elevation_deg=10.0)
    torch.testing.assert_close(cams.azimuth_deg, torch.tensor([0, 45, 90, 135, 180, -135, -90, -45.0]))
    assert torch.allclose(cams.elevation_deg, torch.tensor(10.0))


def test_view_labels():
    az = torch.tensor([0.0, 44.9, -44.9, 45.0, 90.0, -90.0, 135.0, 135.1, 180.0, -170.0, 360.0, 400.0])
    assert view_label(az).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 0, 0]


# ----------------------------------------------------------------------------- renderer
def test_empty_grid_renders_the_background():
    grid = VoxelGrid(8)
    with torch.no_grad():
        grid.density.fill_(-100.0)
    cams = random_cameras(2, torch.Generator().manual_seed(0))
    out = render(grid, cams, 8, n_samples=16, background=(0.1, 0.2, 0.3), need_depth=True)
    assert out.opacity.abs().max() < 1e-6
    torch.testing.assert_close(out.rgb, torch.tensor([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1).expand(2, 3, 8, 8))
    assert out.depth.abs().max() == 0
    # a fresh grid (raw density 0) is almost transparent, so optimisation starts from the background
    fresh = render(VoxelGrid(16), cams, 8, n_samples=32)
    assert fresh.opacity.max() < 0.1


def test_grid_is_empty_outside_its_box():
    grid = _random_grid(res=6, dtype=torch.float32)
    cams = random_cameras(2, torch.Generator().manual_seed(4))
    inner = render(grid, cams, 6, n_samples=256, bound=1.0)
    outer = render(grid, cams, 6, n_samples=512, bound=2.0)  # same step length, twice the box
    torch.testing.assert_close(outer.opacity, inner.opacity, atol=0.02, rtol=0)


def test_rays_that_miss_the_box_show_the_background():
    o = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    near, far = ray_box_intersect(o, d, 1.0)
    torch.testing.assert_close(near, torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(far, torch.tensor([6.0, 0.0]))
    solid = lambda p: (torch.full(p.shape[:-1], 50.0), torch.ones(p.shape))  # noqa: E731
    rgb, op, _ = render_rays(solid, o, d, 16, 1.0, torch.tensor([0.0, 0.5, 0.0]))
    torch.testing.assert_close(op, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(rgb, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 0.0]]))


def test_uniform_slab_matches_beer_lambert():
    """A constant density sigma over a path of length L has opacity 1 - exp(-sigma L), exactly."""
    o = torch.tensor([[-3.0, 0.2, 0.1]], dtype=torch.float64)
    d = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    field = lambda p: (torch.full(p.shape[:-1], 0.7, dtype=p.dtype), torch.ones(p.shape, dtype=p.dtype))  # noqa: E731
    _, op, depth = render_rays(field, o, d, 7, 1.0, torch.zeros(3, dtype=torch.float64), need_depth=True)
    torch.testing.assert_close(op, torch.tensor([1 - math.exp(-1.4)], dtype=torch.float64))
    assert 2.0 < depth.item() < 3.0


def test_batch_of_cameras_equals_one_by_one():
    grid = _random_grid(res=8, dtype=torch.float32)
    cams = random_cameras(4, torch.Generator().manual_seed(2))
    bg = torch.rand(4, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batch = render(grid, cams, 6, 5, n_samples=16, background=bg, need_depth=True)
        chunked = render(grid, cams, 6, 5, n_samples=16, background=bg, need_depth=True, chunk_cameras=3)
        for i in range(4):
            one = render(grid, cams[i], 6, 5, n_samples=16, background=bg[i], need_depth=True)
            torch.testing.assert_close(batch.rgb[i:i + 1], one.rgb)
            torch.testing.assert_close(batch.opacity[i:i + 1], one.opacity)
            torch.testing.assert_close(batch.depth[i:i + 1], one.depth)
    torch.testing.assert_close(chunked.rgb, batch.rgb)
    assert batch.rgb.shape == (4, 3, 6, 5) and batch.opacity.shape == (4, 1, 6, 5)


def test_stratified_samples_are_reproducible_and_unbiased_on_average():
    grid = _random_grid(res=6, dtype=torch.float64)
    cams = random_cameras(1, torch.Generator().manual_seed(5), dtype=torch.float64)
    a = render(grid, cams, 4, n_samples=8, generator=torch.Generator().manual_seed(9))
    b = render(grid, cams, 4, n_samples=8, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.rgb, b.rgb)
    fine = render(grid, cams, 4, n_samples=512)
    reps = torch.stack([render(grid, cams, 4, n_samples=32, generator=torch.Generator().manual_seed(s)).opacity
                        for s in range(40)])
    se = reps.std(0) / 40**0.5
    # jittered 32-sample estimates average to the fine-quadrature value (5 standard errors + quadrature slack)
    assert ((reps.mean(0) - fine.opacity).abs() <= 5 * se + 2e-3).all()


def test_supersampling_averages_subpixels():
    grid = _random_grid(res=6, dtype=torch.float64)
    cams = random_cameras(1, torch.Generator().manual_seed(6), dtype=torch.float64)
    hi = render(grid, cams, 8, n_samples=16)
    ss = render(grid, cams, 4, n_samples=16, supersample=2)
    torch.testing.assert_close(ss.rgb, torch.nn.functional.avg_pool2d(hi.rgb, 2))


def test_bake_matches_field_on_voxel_centres():
    scene = get_scene("a snowman")
    grid = VoxelGrid.from_field(scene, resolution=9)
    pts = grid.voxel_centers().reshape(-1, 3)
    s1, c1 = grid(pts)
    s2, c2 = scene(pts)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c1, c2, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- scenes
def test_registry_has_eight_prompts_and_accepts_variations():
    assert len(PROMPTS) >= 8 and set(PROMPTS) == set(SCENES)
    assert get_scene("  A   Yellow Rubber DUCK ").prompt == "a yellow rubber duck"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_scene_renders_non_empty_from_every_side(prompt):
    scene = get_scene(prompt)
    cams = cameras_from_angles([0.0, 90.0, 180.0, -135.0], [0.0, 20.0, 40.0, 10.0])
    out = scene.render(cams, 24, n_samples=32, bound=scene.aabb)
    coverage = out.opacity.mean(dim=(1, 2, 3))
    assert ((coverage > 0.1) & (coverage < 0.6)).all(), coverage
    # the object fits in the frame of the default cameras: at most a faint fringe on the border pixels
    border = torch.cat([out.opacity[..., 0, :], out.opacity[..., -1, :], out.opacity[..., :, 0],
                        out.opacity[..., :, -1]], -1)
    assert border.max() < 0.15, border.amax(-1)


@pytest.mark.parametrize("prompt", [p for p in PROMPTS if SCENES[p].front_point is not None])
def test_front_camera_sees_the_front(prompt):
    """The scene's front point is the first surface seen from azimuth 0 and hidden from azimuth 180."""
    scene = get_scene(prompt)
    pt = torch.tensor(scene.front_point, dtype=torch.float64)
    cams = cameras_from_angles([0.0, 180.0], [15.0, 15.0], dtype=torch.float64)
    d = pt - cams.position
    dist = d.norm(dim=-1)
    _, op, depth = render_rays(scene, cams.position, d / dist[:, None], 256, scene.aabb,
                               torch.zeros(3, dtype=torch.float64), need_depth=True)
    assert (op > 0.98).all()
    assert abs(depth[0] - dist[0]) < 0.05  # front: the ray ends at the front point
    assert depth[1] < dist[1] - 0.2  # back: something else is in the way


def test_front_and_back_views_differ():
    scene = get_scene("a yellow rubber duck")
    out = scene.render(cameras_from_angles([0.0, 180.0], [15.0, 15.0]), 24, n_samples=32, bound=scene.aabb)
    r, g, b = out.rgb.unbind(1)
    orange = (r - g > 0.3) & (b < 0.2)  # the yellow body has r - g of about 0.1
    assert orange[0].sum() >= 3 and orange[1].sum() == 0, orange.sum((1, 2))  # beak: seen from the front only


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, names",
    [
        (lambda: get_scene("a flying car"), ["prompt", "a flying car", "a snowman"]),
        (lambda: random_cameras(4, torch.Generator(), elevation_range=(0.0, 95.0)), ["elevation_range", "95"]),
        (lambda: random_cameras(4, torch.Generator(), elevation_range=(30.0, 10.0)), ["elevation_range"]),
        (lambda: random_cameras(0, torch.Generator()), ["n", "0"]),
        (lambda: cameras_from_angles(0.0, 0.0, radius=-1.0), ["radius", "-1"]),
        (lambda: cameras_from_angles(0.0, 0.0, fov_deg=180.0), ["fov_deg", "180"]),
        (lambda: cameras_from_angles(0.0, 90.0), ["elevation_deg", "90"]),
        (lambda: cameras_from_angles(float("nan"), 0.0), ["azimuth_deg", "nan"]),
        (lambda: turntable_cameras(-2), ["n", "-2"]),
        (lambda: render(VoxelGrid(4), turntable_cameras(1), 8, n_samples=0), ["n_samples", "0"]),
        (lambda: render(VoxelGrid(4), turntable_cameras(1), 0), ["height", "0"]),
        (lambda: render(VoxelGrid(4), turntable_cameras(1), 8, bound=-1.0), ["bound", "-1"]),
        (lambda: render(VoxelGrid(4), turntable_cameras(2), 8, background=torch.zeros(3, 3)),
         ["background", "[3]"]),
        (lambda: VoxelGrid(1), ["resolution", "1"]),
        (lambda: VoxelGrid(4, density_activation="tanh"), ["density_activation", "tanh", "softplus"]),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, names):
    with pytest.raises(ValueError) as info:
        call()
    for name in names:
        assert name in str(info.value)


def test_opacity_regularisers_compute_their_formulas():
    from carv.render import opaque_loss, sparsity_loss

    op = torch.tensor([[0.0, 0.25], [0.5, 1.0]]).reshape(1, 1, 2, 2).requires_grad_(True)
    assert float(sparsity_loss(op.detach())) == pytest.approx(0.4375)
    sparsity_loss(op).backward()
    torch.testing.assert_close(op.grad, torch.full_like(op, 0.25))  # 1 / n_pixels everywhere
    # binary entropy: log 2 at 0.5, ~0 at 0 and 1 (clamped to [1e-3, 1 - 1e-3]), H(0.25) in between
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    want = (h(1e-3) + h(0.25) + math.log(2) + h(1 - 1e-3)) / 4
    assert float(opaque_loss(op.detach())) == pytest.approx(want, rel=1e-6)
    x = torch.tensor([0.3, 0.5, 0.7], requires_grad=True)
    opaque_loss(x).backward()  # dH/dp = log((1 - p) / p): pushes p < 0.5 down and p > 0.5 up
    torch.testing.assert_close(x.grad, torch.log((1 - x.detach()) / x.detach()) / 3)


@pytest.mark.parametrize("density_activation, color_activation",
                         [("softplus", "sigmoid"), ("exp", "sigmoid"), ("relu", "clamp")])
def test_raw_values_invert_the_activations(density_activation, color_activation):
    """raw_density / raw_color give the raw parameters whose activations are the asked densities and colours,
    across the softplus's two branches (s below and above 20)."""
    g = VoxelGrid(4, density_activation=density_activation, density_bias=-6.0 if density_activation != "relu" else 0.0,
                  color_activation=color_activation)
    sigma = torch.tensor([1e-3, 0.025, 1.0, 60.0, 199.0, 201.0, 500.0], dtype=torch.float64)
    torch.testing.assert_close(g.activate_density(g.raw_density(sigma)), sigma, rtol=1e-9, atol=0)
    rgb = torch.tensor([0.02, 0.3, 0.5, 0.98], dtype=torch.float64)
    torch.testing.assert_close(g.activate_color(g.raw_color(rgb)), rgb, rtol=1e-12, atol=0)
